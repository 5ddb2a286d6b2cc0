"""Every LOSO fold x variant x seed trained as batched programs: the frozen-layer4 path's heads, and the full models.

Model m is the model `run_loso` trains for its (variant, seed) and fold: the same initial weights (drawn from the
fold's seed), the same shuffles, the same optimiser and schedule (torch.optim over the parameters stacked over
models), up to float rounding (the same sums are taken in another order; tests/test_sweep.py bounds the difference).
Gradients are autograd's. AMAN's head runs on projections: it only ever needs 2 + C projections of each (frame, slot)
feature vector, so each step gathers feature rows chunk by chunk into cache for one matmul (_Project, whose gradient
is the matmul's), each fold's standardisation folded into its models' weights; models that read the same rows (a
seed's variants over the same slots) gather them once. A custom head (`head=`) runs vmapped over the gathered
features. Full models (trunk maps [N, F, K, C, H, W]) run their layer4s side by side as one module of grouped
convolutions (model.side_by_side; _FullProgram), one program per number of training clips so that BatchNorm sees
each model's own batches. Finished (variant, seed) runs go into the keyed folders `run_loso` uses, so a re-run (with
either engine) skips them.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .cache import Entry, key_of
from .executors import as_executor
from .metrics import uf1
from .batchnorm import batch_groups
from .model import AMANHead, attend, head_projection, load_copy, side_by_side
from .oracle import ORACLE_TARGET_PX, oracle_choice, oracle_name
from .results import LOSOResult
from .runtime import autocast, progress_bar, resolve_device
from .train import (Keyed, TrainConfig, TrainingDiverged, Variant, ablation_variants, check_finite, check_head,
                    check_index, choose_epoch, clip_names, diverged, finish_run, fold_seed, inner_val_subject,
                    loso_folds, make_head, make_loss, make_model, make_optimizer, model_name, prepare_features,
                    place_features, repair_advice, run_inputs, standardisation, training_dtype, unpack_features,
                    uses_channels_last)

PROGRAM_MODELS = 1024  # models of one batched program at most (bounds its memory; a killed sweep keeps the finished)
# Full models of one program at most, and trunk maps through their layer4s per call (about 1.5 MB each in training).
# Each model keeps layer4's 8.4M weights with their gradients and optimiser state (about 0.1 GB). A CPU loses by
# putting models side by side (bench/side_by_side.py, the synthetic default's shape, bf16 on AVX512-BF16: a model's
# step took 159 ms alone, 183 ms among 4, 191 ms among 8), so it trains one at a time; an accelerator gains one
# launch of each kernel for all models instead of one per model: 320 models hold all 10 one-slot configs of 5 seeds
# (no magnification and a single factor, 32 folds: about 40 GB with their optimiser state), 2 ** 13 maps about 12 GB
# of activations.
FULL_MODELS, FULL_MAPS = 1, 2 ** 8
ACCELERATOR_FULL_MODELS, ACCELERATOR_FULL_MAPS = 320, 2 ** 13
CHUNK_ELEMENTS = 2 ** 20  # floats of gathered features per matmul on a CPU (4 MB: stays in cache; measured)
ACCELERATOR_CHUNK_ELEMENTS = 2 ** 26  # the same on an accelerator, where fewer and larger matmuls win


@dataclass
class SweepResult:
    """All (variant, seed) runs: predictions and history with variant and seed columns, scores per run."""

    predictions: pd.DataFrame
    history: pd.DataFrame
    scores: pd.DataFrame  # variant, seed, subset, uf1, uar, accuracy, n
    runs: dict[tuple[str, int], LOSOResult]
    oracle: pd.DataFrame | None = None  # the oracle's choice per clip (oracle.oracle_choice) when it was trained


def _seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a seed")
    return [int(s) for s in seeds]


def run_sweep(features, index: pd.DataFrame, *, cfg: TrainConfig | None = None, variants: list[Variant] | None = None,
              seeds=(0,), runs_dir: str | Path = "results/work/runs", factors=None,
              progress: bool = True, executor="local", head=None) -> SweepResult:
    """Train every variant (default: the paper's ablations) with every seed under LOSO; one progress bar.

    Pooled features (the frozen-layer4 path) and 6-D trunk maps (the full model) train as batched programs of
    (variant, seed, fold) models. `cfg.seed` is replaced by each seed. `executor` ('local', 'ray' or an
    amanlib.executors Executor) runs the programs; this process writes every run. `head`: a custom head as run_loso
    takes it (pooled features only; None: AMAN's), trained by torch.func over the stacked copies; run_loso with the
    same head gives the same predictions.
    """
    cfg = cfg or TrainConfig()
    seeds = _seeds(seeds)
    index = index.reset_index(drop=True)
    labels = check_index(index)
    features = prepare_features(features, cfg, runs_dir, progress)
    tensor, key, known = unpack_features(features)
    factors = [float(f) for f in factors] if factors is not None else known
    if factors is None and variants is None:
        raise ValueError("run_sweep: pass the factor values of these features (factors=...)")
    if factors is not None and len(factors) != tensor.shape[2]:
        raise ValueError(f"{len(factors)} factor values given for features with {tensor.shape[2]} factor slots")
    if len(tensor) != len(index):
        raise ValueError(f"features hold {len(tensor)} clips but the index has {len(index)} rows")
    check_head(head, tensor)
    variants = variants or ablation_variants(factors)
    jobs = [(v, s, dataclasses.replace(cfg, seed=s, factor_slots=v.factor_slots, use_alpha=v.use_alpha,
                                       use_beta=v.use_beta)) for v in variants for s in seeds]
    folds = loso_folds(index)
    with progress_bar(total=len(jobs) * len(folds), desc="training (variants x seeds x folds)",
                      disable=not progress) as bar, as_executor(executor) as ex:
        try:
            runs = _run_batched(tensor, key, factors, labels, index, folds, jobs, runs_dir, bar,
                                repair_advice(features), ex, head)
        except TrainingDiverged as e:  # name the variant, which a run's config does not hold
            variant = next((v.name for v, _, c in jobs if c == e.cfg), None)
            if variant is None:
                raise
            raise TrainingDiverged(f"{variant}: {e}", e.cfg, e.fold) from None
    return _gather(runs)


def run_ablations(features, index: pd.DataFrame, *, factors=None, cfg: TrainConfig | None = None,
                  runs_dir: str | Path = "results/work/runs", variants: list[Variant] | None = None,
                  seeds=None, progress: bool = True, executor="local", truth: pd.DataFrame | None = None,
                  oracle_target_px=ORACLE_TARGET_PX, head=None) -> tuple[pd.DataFrame, SweepResult]:
    """run_sweep over the paper's ablations (default seeds: cfg.seed alone) and the table of UF1 / UAR /
    accuracy per variant, seed and subset. With the synthetic truth (data.truth_for(index); None on real data)
    and single factors among the variants, the oracle too (run_oracle at oracle_target_px): a positive control
    whose runs join the sweep's as variant `oracle factor (truth)`, never a method."""
    cfg = cfg or TrainConfig()
    seeds = seeds if seeds is not None else [cfg.seed]
    result = run_sweep(features, index, cfg=cfg, variants=variants, seeds=seeds, runs_dir=runs_dir, factors=factors,
                       progress=progress, executor=executor, head=head)
    if truth is not None and any(_single_factor(r.config) for r in result.runs.values()):
        oracle = run_oracle(features, index, truth=truth, factors=factors, cfg=cfg, runs_dir=runs_dir, seeds=seeds,
                            target_px=oracle_target_px, progress=progress, executor=executor, head=head)
        result = dataclasses.replace(_gather({**result.runs, **oracle.runs}), oracle=oracle.oracle)
    table = result.scores.drop(columns="epoch_selection")[["variant", "seed", "subset", "uf1", "uar", "accuracy", "n"]]
    table = table.assign(model=model_name(cfg), epoch_selection=cfg.epoch_selection
                         + (" (optimistic)" if cfg.optimistic else ""))
    return table, result


def _single_factor(config: dict) -> bool:
    """Whether a run's config is a single magnified factor with both attentions, as the single-factor variants."""
    return len(config.get("factors") or []) == 1 and config["factors"][0] > 1 and config["use_alpha"] \
        and config["use_beta"]


def run_oracle(features, index: pd.DataFrame, *, truth: pd.DataFrame, factors=None, cfg: TrainConfig | None = None,
               runs_dir: str | Path = "results/work/runs", seeds=(0,), target_px=ORACLE_TARGET_PX,
               progress: bool = True, executor="local", head=None) -> SweepResult:
    """The oracle (amanlib.oracle), a positive control: each clip's features at the factor slot chosen from the
    synthetic truth alone (never labels) for target_px, gathered into a one-slot tensor (pooled [N, F, 1, 512] on
    the frozen-layer4 path, [N, F, 1, C, H, W] for the full model) keyed by the upstream key, the chosen slots and
    the target, and trained by run_sweep like a single factor: the same folds, seeds and settings, batched and
    cached. Its standardisation is over its own slot (a single factor's is over every slot of its features).
    A list of targets trains one oracle per target (variant oracle.oracle_name(target); one target: always
    `oracle factor (truth)`). `.oracle` holds the choice per clip."""
    cfg = cfg or TrainConfig()
    index = index.reset_index(drop=True)
    prepared = prepare_features(features, cfg, runs_dir, progress)
    tensor, key, known = unpack_features(prepared)
    factors = [float(f) for f in factors] if factors is not None else known
    if factors is None or len(factors) != tensor.shape[2]:
        raise ValueError(f"run_oracle: pass the factor values of these features ({tensor.shape[2]} slots), got "
                         f"{factors}")
    if len(tensor) != len(index):
        raise ValueError(f"features hold {len(tensor)} clips but the index has {len(index)} rows")
    clips = index[["subject", "clip"]].astype(str)
    aligned = clips.merge(truth[["subject", "clip", "peak_px"]].astype({"subject": str, "clip": str}),
                          on=["subject", "clip"], how="left", validate="1:1")
    if aligned["peak_px"].isna().any():
        raise ValueError(f"run_oracle: the truth lacks {int(aligned['peak_px'].isna().sum())} clips of the index")
    choice = oracle_choice(aligned, factors, target_px)
    primary = float(target_px) if np.ndim(target_px) == 0 else ORACLE_TARGET_PX  # the one named ORACLE_VARIANT
    name = lambda t: oracle_name(t, primary)  # noqa: E731
    runs = {}
    for target, part in choice.groupby("target_px", sort=False):
        slots = part["slot"].to_numpy()
        one = tensor[torch.arange(len(slots)), :, torch.tensor(slots)].unsqueeze(2)  # N, F, 1, ...: the chosen slots
        keyed = Keyed(one, key_of({"oracle": key, "slots": slots.tolist(), "target_px": float(target)}), None,
                      repair_advice(prepared))
        runs.update(run_sweep(keyed, index, cfg=cfg, variants=[Variant(name(target), (0,))], seeds=seeds,
                              runs_dir=runs_dir, factors=None, progress=progress, executor=executor,
                              head=head).runs)
    choice.insert(0, "variant", choice["target_px"].map(name))
    choice.insert(1, "dataset", np.tile(index["dataset"].astype(str).to_numpy(), choice["target_px"].nunique()))
    return dataclasses.replace(_gather(runs), oracle=choice)


def _gather(runs: dict[tuple[str, int], LOSOResult]) -> SweepResult:
    tag = lambda df, v, s: df.assign(variant=v, seed=s)  # noqa: E731
    predictions = pd.concat([tag(r.predictions, v, s) for (v, s), r in runs.items()], ignore_index=True)
    history = pd.concat([tag(r.history, v, s) for (v, s), r in runs.items()], ignore_index=True)
    scores = pd.concat([tag(r.scores.rename_axis("subset").reset_index(), v, s) for (v, s), r in runs.items()],
                       ignore_index=True)
    first = ["variant", "seed"]
    return SweepResult(predictions[first + [c for c in predictions if c not in first]],
                       history[first + [c for c in history if c not in first]],
                       scores[first + [c for c in scores if c not in first]], runs)


def _run_batched(tensor, key, factors, labels, index, folds, jobs, runs_dir, bar, fix: str, ex, head) -> dict:
    entries = [Entry(runs_dir, run_inputs(key, index, c, head), "LOSO run") for _, _, c in jobs]
    todo = [i for i, e in enumerate(entries) if not e.done]
    bar.update((len(jobs) - len(todo)) * len(folds))
    if todo:
        check_finite(tensor, clip_names(index), fix)
        cfg = jobs[todo[0]][2]
        device = resolve_device(cfg.device)
        num_classes = cfg.num_classes or int(labels.max()) + 1
        if cfg.num_workers:  # as run_loso does
            torch.set_num_threads(cfg.num_workers)
        with ExitStack() as stack:
            for i in sorted(todo, key=lambda i: entries[i].key):  # one lock order: no deadlock between sweeps
                stack.enter_context(entries[i].writing())
            todo = [i for i in todo if not entries[i].done]  # another run may have finished some meanwhile
            place = device if ex.name == "local" else torch.device("cpu")  # a Ray task places its own copy
            full_models, maps_per_call = (FULL_MODELS, FULL_MAPS) if device.type == "cpu" else \
                (ACCELERATOR_FULL_MODELS, ACCELERATOR_FULL_MAPS)
            if tensor.dim() == 6:  # the full models read the trunk maps as they are
                source = place_features(tensor, place)
            else:
                fits = [fit for i in todo for _, fit in _splits(index, folds, jobs[i][2])]
                source = _source(tensor, fits, place) if todo else None
            programs = _programs(todo, jobs, tensor.shape, len(folds), head not in (None, AMANHead), full_models,
                                 maps_per_call)
            shared = {"source": source, "labels": labels, "index": index, "folds": folds, "num_classes": num_classes,
                      "head": head, "full_models": full_models, "maps_per_call": maps_per_call}
            ticks = _EpochTicks(bar)
            if ex.name == "local":  # the bar moves every epoch, so its ETA shows early (a Ray task cannot reach it)
                shared["on_epoch"] = ticks
            for position, results in ex.map(_program_task, [[jobs[i][2] for i in p] for p in programs], shared):
                program = programs[position]
                ticks.finish(len(program) * len(folds))
                for i, done in zip(program, results):
                    cfg_i = jobs[i][2]
                    finish_run(entries[i], cfg_i, done, index, labels, factors, _slots(cfg_i, tensor.shape[2]),
                                num_classes)
    return {(v.name, s): LOSOResult.load(e.path) for (v, s, _), e in zip(jobs, entries)}


class _EpochTicks:
    """Moves the sweep's bar (units: runs x folds) by whole units as a program's epochs pass, and by the rest when
    the program ends."""

    def __init__(self, bar):
        self.bar, self.ticked = bar, 0

    def __call__(self, epochs_done: int, epochs: int, units: int) -> None:
        reached = units * epochs_done // epochs
        self.bar.update(reached - self.ticked)
        self.ticked = reached

    def finish(self, units: int) -> None:
        self.bar.update(units - self.ticked)
        self.ticked = 0


def _slots(cfg: TrainConfig, n_factors: int) -> list[int]:
    return list(cfg.factor_slots) if cfg.factor_slots is not None else list(range(n_factors))


def _splits(index: pd.DataFrame, folds, cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold, (its inner validation rows, the rows it trains on), drawn as train_fold draws them."""
    out = []
    for i, (_, _, train_rows) in enumerate(folds):
        val = inner_val_subject(index, train_rows, fold_seed(cfg, i)) if cfg.epoch_selection == "inner_val" \
            else np.array([], int)
        out.append((val, np.setdiff1d(train_rows, val)))
    return out


def _programs(todo: list[int], jobs, shape, n_folds: int, custom: bool, full_models: int = 0,
              maps_per_call: int = 0) -> list[list[int]]:
    """The jobs to train together: as many factor slots each (so every model gathers as many feature rows), with a
    custom head the same attention switches too (they are its attributes), a seed's configs next to each other; at
    most PROGRAM_MODELS heads, or full_models full models (features of shape [N, F, K, C, H, W]) sending at most
    maps_per_call maps a step through layer4."""
    groups: dict[tuple, list[int]] = {}
    for i in sorted(todo, key=lambda i: jobs[i][2].seed):  # a seed's variants side by side: they can share rows
        cfg = jobs[i][2]
        switches = (cfg.use_alpha, cfg.use_beta) if custom else ()
        groups.setdefault((len(_slots(cfg, shape[2])), *switches), []).append(i)
    out = []
    for (slots, *_), members in groups.items():
        models = PROGRAM_MODELS if len(shape) == 4 else \
            _full_size(jobs[members[0]][2], full_models, maps_per_call, shape[1], slots)
        per_program = max(1, models // n_folds)
        out += [members[start:start + per_program] for start in range(0, len(members), per_program)]
    return out


@dataclass
class _Source:
    """The features as every program reads them: one centred copy x - mean (the mean over every clip; small
    enough to stay in cache) and, after it, one row per distinct training set with the rest of its shift: its
    standardisation is (x - mean - offset) / scale, which the programs fold into their weights."""

    rows: torch.Tensor  # N*F*K + G, 512: x - mean, then the offsets
    groups: dict[bytes, int]  # training rows -> their standardisation
    scale: torch.Tensor  # G, 512: each training set's channel standard deviations, as run_loso computes them
    shape: tuple[int, int, int]  # N, F, K


def _source(tensor: torch.Tensor, fits: list[np.ndarray], device) -> _Source:
    """The centred features and the standardisation of every distinct training set (over every factor slot, as
    run_loso computes it)."""
    x = tensor.to(device, torch.float32)  # N, F, K, 512
    groups, shift, scale = {}, [], []
    for fit in fits:
        if fit.tobytes() not in groups:
            groups[fit.tobytes()] = len(groups)
            fit_shift, fit_scale = standardisation(x[torch.as_tensor(fit, device=device)].flatten(0, 2))  # n*F*K, 512
            shift.append(fit_shift)
            scale.append(fit_scale)
    mean = x.flatten(0, 2).mean(0)  # 512: near every training set's mean, so the offsets are small
    rows = torch.cat([(x - mean).view(-1, x.shape[-1]), torch.stack(shift) - mean])
    return _Source(rows, groups, torch.stack(scale), tuple(x.shape[:3]))


class _Gather:
    """Projections w.x of source rows on stacked weights, chunk by chunk: each chunk's rows are gathered into a buffer
    that stays in cache, for one matmul. Models that read the same rows (`share` consecutive ones) are one matmul:
    their gathered rows against their stacked weights."""

    def __init__(self, source: _Source, share: int, chunk_elements: int):
        self.source, self.share, self.chunk_elements = source, share, chunk_elements
        self.buffer = self.folded = None  # the gathered rows of a chunk; the folded weights (_Project)

    def project(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """weights M, J, 512 and rows M, R -> w.x M, J, R."""
        M, J, V = *weights.shape[:2], self.share
        out = weights.new_empty(M, J, rows.shape[1])
        shared_w, shared_out = weights.view(M // V, V * J, -1), out.view(M // V, V * J, -1)
        for s, e, x in self._chunks(rows[::V]):
            torch.bmm(shared_w[s:e], x.transpose(1, 2), out=shared_out[s:e])
        return out

    def weight_grad(self, d_out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The gradient of project's weights from its output's d_out M, J, R: d_out @ x, M, J, 512."""
        M, J, V = *d_out.shape[:2], self.share
        grad = d_out.new_empty(M, J, 512)
        shared_d, shared_grad = d_out.contiguous().view(M // V, V * J, -1), grad.view(M // V, V * J, -1)
        for s, e, x in self._chunks(rows[::V]):
            torch.bmm(shared_d[s:e], x, out=shared_grad[s:e])
        return grad

    def _chunks(self, rows: torch.Tensor):
        """(start, end, features M', R, 512) of the rows of M' (groups of) models, chunk_elements floats at a time."""
        per_model = rows.shape[1]
        step = max(1, self.chunk_elements // (per_model * 512))
        for s in range(0, len(rows), step):
            e = min(len(rows), s + step)
            flat = rows[s:e].reshape(-1)
            if self.buffer is None or len(self.buffer) < len(flat):
                self.buffer = self.source.rows.new_empty(max(len(flat), step * per_model), 512)
            x = torch.index_select(self.source.rows, 0, flat, out=self.buffer[:len(flat)])
            yield s, e, x.view(e - s, per_model, 512)


class _Project(torch.autograd.Function):
    """The projections (w / scale).x of gathered rows (_Gather.project), with the one hand-written gradient of the
    engine, a matmul's: d_w = (d_out @ x) / scale. The rows are gathered again for it instead of being kept, and the
    folded weights go to a buffer kept between steps (a fresh tensor of this size each step costs page faults)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, gather: _Gather) -> torch.Tensor:
        ctx.save_for_backward(scale, rows)
        ctx.gather = gather
        if gather.folded is None or gather.folded.shape != weights.shape:
            gather.folded = torch.empty_like(weights)
        return gather.project(torch.div(weights, scale, out=gather.folded), rows)

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        scale, rows = ctx.saved_tensors
        return ctx.gather.weight_grad(d_out, rows).div_(scale), None, None, None


class _Heads:
    """M stacked copies of a head for torch.optim: each state-dict parameter stacked over models (M, ...; AMAN's
    head as its projection, weight M, J, 512 and bias M, J), one leaf per step group (consecutive models with as many
    batches per epoch). Past a group's last batch of an epoch its gradient is dropped, so torch.optim leaves its
    parameters and state alone (AdamW's step count too): the models without a batch do not move."""

    def __init__(self, modules: list[nn.Module], steps: np.ndarray, projected: bool, device):
        state = stack_module_state(modules)[0]  # name -> M, ...
        state = dict(zip(("weight", "bias"), head_projection(state))) if projected else state
        ends = np.flatnonzero(np.diff(steps, append=np.inf)) + 1  # steps ascend over models
        self.last = steps[ends - 1]  # per group: its batches per epoch
        self.groups = [{n: p[s:e].detach().to(device).requires_grad_() for n, p in state.items()}
                       for s, e in zip(np.r_[0, ends[:-1]], ends)]

    def params(self) -> dict[str, torch.Tensor]:
        """name -> M, ...: every model's parameters."""
        if len(self.groups) == 1:
            return self.groups[0]
        return {n: torch.cat([g[n] for g in self.groups]) for n in self.groups[0]}

    def leaves(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g.values()]

    def step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """optimizer.step() for the groups with a batch at this step of the epoch, then clear the gradients."""
        for g, last in zip(self.groups, self.last):
            if step >= last:
                for p in g.values():
                    p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class _Program:
    """M stacked heads and the feature rows they read: each model's standardisation is folded in, (x - mean - offset)
    / scale, the offset being one more row each model gathers. AMAN's head (module None) only ever needs the J = 2 +
    C projections w.x of each (frame, slot) vector, and those are linear in x: the weights are folded instead,
    w.(x - mean - offset) / scale = (w / scale).(x - mean) - (w / scale).offset, and the projections come from
    _Project's chunked matmul. A custom head (module) runs as torch.func.functional_call, vmapped over models, on the
    gathered and standardised vectors M, L, F, K', 512."""

    heads: _Heads
    module: nn.Module | None  # a custom head (its parameters come from heads); None: AMAN's on projections
    alpha_on: torch.Tensor  # M, 1, 1, 1 bool
    beta_on: torch.Tensor  # M, 1, 1 bool
    base: torch.Tensor  # M, 1, F, K': each model's source rows of clip 0 over its K' factor slots
    offset_row: torch.Tensor  # M: the source row of each model's offset
    scale: torch.Tensor  # M, 1, 512
    gather: _Gather

    def train(self, mode: bool) -> None:
        """A custom head's train or eval mode (e.g. for dropout)."""
        if self.module is not None:
            self.module.train(mode)

    def rows(self, clips: torch.Tensor) -> torch.Tensor:
        """clips ..., M, L (clip numbers) -> source rows ..., M, L*F*K' + 1: the clips' frames and slots, then the
        model's offset."""
        _, frames, k = self.gather.source.shape
        rows = (self.base + clips[..., None, None] * (frames * k)).flatten(-3)
        return torch.cat([rows, self.offset_row.expand(rows.shape[:-1])[..., None]], -1)

    def __call__(self, clips: torch.Tensor):
        """clips M, L -> logits M, L, C, alpha M, L, F, K', beta M, L, F, as each model's head gives them."""
        rows, params = self.rows(clips), self.heads.params()
        shape = (*clips.shape, *self.base.shape[2:])  # M, L, F, K'
        if self.module is not None:
            x = self.gather.source.rows[rows]  # M, R + 1, 512
            x = ((x[:, :-1] - x[:, -1:]) / self.scale).view(*shape, -1)  # M, L, F, K', 512: standardised
            call = lambda p, x: functional_call(self.module, p, (x,))  # noqa: E731
            return vmap(call, randomness="different")(params, x)
        out = _Project.apply(params["weight"], self.scale, rows, self.gather)  # M, J, R + 1
        z = out[..., :-1].view(*out.shape[:2], *shape[1:]).permute(0, 2, 3, 4, 1)  # M, L, F, K', J
        return attend(z + (params["bias"] - out[..., -1])[:, None, None, None], self.alpha_on, self.beta_on)


def _padded(rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row lists of different lengths -> index M, L (padded with row 0) and mask M, L."""
    width = max(1, max(len(r) for r in rows))
    index = np.zeros((len(rows), width), np.int64)
    for m, r in enumerate(rows):
        index[m, :len(r)] = r
    mask = np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]
    return torch.from_numpy(index).to(device), torch.from_numpy(mask).to(device)


def _models(index, folds, cfgs) -> list[dict]:
    """One model per fold and config: its seed (run_loso's for the fold), test, inner validation and training rows."""
    splits = [_splits(index, folds, cfg) for cfg in cfgs]
    return [{"cfg": cfg, "fold": fold, "i": i, "j": j, "seed": fold_seed(cfg, i), "test": test_rows, "fit": fit,
             "val": val, "steps": -(-len(fit) // cfg.batch_size)}
            for i, (fold, test_rows, _) in enumerate(folds) for j, (cfg, split) in enumerate(zip(cfgs, splits))
            for val, fit in [split[i]]]


def _build(source: _Source, index, folds, cfgs, num_classes, device, head):
    """Per model, its rows, initial head (drawn as run_loso draws it for the fold's seed), attention switches and
    standardisation, ordered by batches per epoch (_Heads' step groups) -> (models, program)."""
    n_frames, n_factors = source.shape[1:]
    models, modules = _models(index, folds, cfgs), {}
    for d in models:
        cfg, seed = d["cfg"], d["seed"]
        if (seed, cfg.use_alpha, cfg.use_beta) not in modules:
            modules[seed, cfg.use_alpha, cfg.use_beta] = make_head(head, cfg, num_classes, n_frames,
                                                                   len(_slots(cfg, n_factors)), seed)
        d["head"], d["group"] = modules[seed, cfg.use_alpha, cfg.use_beta], source.groups[d["fit"].tobytes()]
    models.sort(key=lambda d: d["steps"])  # stable: models that read the same rows stay side by side
    projected = head in (None, AMANHead)
    heads = _Heads([d["head"] for d in models], np.array([d["steps"] for d in models]), projected, device)
    slots = torch.tensor([_slots(d["cfg"], n_factors) for d in models])  # M, K'
    base = torch.arange(n_frames)[None, :, None] * n_factors + slots[:, None]  # M, F, K'
    group = torch.tensor([d["group"] for d in models], device=device)
    chunk = CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    program = _Program(heads, None if projected else models[0]["head"].to(device),
                       _switch(models, "use_alpha", device)[:, None, None, None],
                       _switch(models, "use_beta", device)[:, None, None], base[:, None].to(device),
                       int(np.prod(source.shape)) + group, source.scale[group][:, None],
                       _Gather(source, _sharing(models, n_factors), chunk))
    return models, program


def _switch(models, name: str, device) -> torch.Tensor:
    """An attention switch of every model: M bool."""
    return torch.tensor([getattr(d["cfg"], name) for d in models], device=device)


class _Stack:
    """The parameters of M full models for torch.optim: layer4 side by side (model.side_by_side) and the head's
    projection stacked over models (weight M, J, 512 and bias M, J). The models of a full program train on as many
    clips, so every one takes every step."""

    def __init__(self, layer4: nn.Module, weight: torch.Tensor, bias: torch.Tensor, steps: int):
        self.layer4, self.head, self.last = layer4, {"weight": weight, "bias": bias}, np.array([steps])

    def params(self) -> dict[str, torch.Tensor]:
        """name -> M, ...: every model's parameters."""
        M = len(self.head["weight"])
        return {**{n: p.view(M, -1) for n, p in self.layer4.named_parameters()}, **self.head}

    def leaves(self) -> list[torch.Tensor]:
        return [*self.layer4.parameters(), *self.head.values()]

    def step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class _FullProgram:
    """M full models (AMAN with its layer4, as run_loso trains it on trunk maps) as one program: each call gathers
    every model's clips at its factor slots into one tensor [L*F*K', M*C, 14, 14] for the side-by-side layer4, pools,
    and applies each model's head to the projections of its pooled vectors (model.attend). The models of one program
    train on as many clips, so their batches have one size and BatchNorm sees exactly the clips run_loso's sees."""

    heads: _Stack
    maps: torch.Tensor  # N, F, K, C, H, W
    slots: torch.Tensor  # M, K' (on the maps' device)
    alpha_on: torch.Tensor  # M, 1, 1, 1 bool
    beta_on: torch.Tensor  # M, 1, 1 bool
    bn_groups: int  # BatchNorm batches per call: the F*K' slices (per_slice) or 1 (joint)
    dtype: torch.dtype | None  # autocast (train.training_dtype)
    channels_last: bool
    maps_per_call: int  # in eval, clips are taken in chunks of at most this many maps

    def train(self, mode: bool) -> None:
        self.heads.layer4.train(mode)

    def __call__(self, clips: torch.Tensor):
        """clips M, L -> logits M, L, C, alpha M, L, F, K', beta M, L, F."""
        per_clip = clips.shape[0] * self.maps.shape[1] * self.slots.shape[1]
        step = clips.shape[1] if self.heads.layer4.training else max(1, self.maps_per_call // per_clip)
        parts = [self._forward(clips[:, s:s + step]) for s in range(0, clips.shape[1], step)]
        return parts[0] if len(parts) == 1 else tuple(torch.cat(p, 1) for p in zip(*parts))

    def _forward(self, clips: torch.Tensor):
        (M, L), (F, K) = clips.shape, (self.maps.shape[1], self.slots.shape[1])
        on = self.maps.device
        x = self.maps[clips.T.to(on)[:, None, None], torch.arange(F, device=on)[None, :, None, None],
                      self.slots.T[None, None]]  # L, F, K', M, C, H, W: model m's maps are channels m*C..(m+1)*C
        device = self.alpha_on.device
        x = x.to(device, torch.float32, non_blocking=True).flatten(0, 2).flatten(1, 2)  # L*F*K', M*C, H, W
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = self.heads.head["weight"], self.heads.head["bias"]
        with autocast(device, self.dtype), batch_groups(self.heads.layer4, self.bn_groups):
            f = self.heads.layer4(x).mean((2, 3)).view(L * F * K, M, -1).transpose(0, 1)  # M, L*F*K', 512
            z = torch.baddbmm(bias[:, None], f, weight.transpose(1, 2))  # M, L*F*K', J
        return attend(z.view(M, L, F, K, -1), self.alpha_on, self.beta_on)


def _full_size(cfg: TrainConfig, full_models: int, maps_per_call: int, n_frames: int, slots: int) -> int:
    """Full models per program: at most full_models, and at most maps_per_call maps through layer4 per step."""
    return max(1, min(full_models, maps_per_call // (cfg.batch_size * n_frames * slots)))


def _full_groups(index, folds, cfgs, full_models: int, maps_per_call: int, n_frames: int,
                 n_factors: int) -> list[list[dict]]:
    """The full models of these configs' folds, in programs: models that train on as many clips (so that their batches
    have one size), _full_size of them at most."""
    size = _full_size(cfgs[0], full_models, maps_per_call, n_frames, len(_slots(cfgs[0], n_factors)))
    models, out = _models(index, folds, cfgs), []
    for n_fit in sorted({len(d["fit"]) for d in models}):
        alike = [d for d in models if len(d["fit"]) == n_fit]
        out += [alike[start:start + size] for start in range(0, len(alike), size)]
    return out


def _full_program(group: list[dict], maps: torch.Tensor, num_classes: int, device,
                  maps_per_call: int) -> _FullProgram:
    """The program of these full models, each drawn as run_loso's make_model draws it for the fold's seed."""
    cfg, n_factors, layer4, weights, biases = group[0]["cfg"], maps.shape[2], None, [], []
    for m, d in enumerate(group):
        model = make_model(None, d["cfg"], num_classes, maps.shape, d["seed"])
        if layer4 is None:
            layer4 = side_by_side(model.layer4, len(group), device)
        load_copy(layer4, m, model.layer4)
        weight, bias = head_projection(dict(model.named_parameters()))
        weights.append(weight.detach())
        biases.append(bias.detach())
    stack = _Stack(layer4, torch.stack(weights).to(device).requires_grad_(),
                   torch.stack(biases).to(device).requires_grad_(), group[0]["steps"])
    slots = torch.tensor([_slots(d["cfg"], n_factors) for d in group], device=maps.device)
    return _FullProgram(stack, maps, slots, _switch(group, "use_alpha", device)[:, None, None, None],
                        _switch(group, "use_beta", device)[:, None, None],
                        maps.shape[1] * slots.shape[1] if cfg.layer4_bn == "per_slice" else 1,
                        training_dtype(cfg, device), uses_channels_last(cfg, device), maps_per_call)


def _sharing(models, n_factors: int) -> int:
    """How many consecutive models read the same source rows at every step: the same fold seed (so the same
    shuffles), training rows and factor slots, e.g. AMAN and its attention ablations under one seed. The largest
    V such that models m*V .. m*V + V - 1 all agree for every m."""
    keys = [(d["seed"], d["fit"].tobytes(), d["test"].tobytes(), d["val"].tobytes(),
             tuple(_slots(d["cfg"], n_factors))) for d in models]
    runs, start = [], 0
    for m in range(1, len(keys) + 1):
        if m == len(keys) or keys[m] != keys[start]:
            runs.append(m - start)
            start = m
    return math.gcd(*runs)


def _shuffled(models, generators, steps: int, batch: int, device) -> torch.Tensor:
    """One epoch's batches of every model, drawn as train_epoch draws them -> clip numbers steps, M, batch
    (clip 0 past a model's end)."""
    order = np.zeros((len(models), steps * batch), np.int64)
    for m, (d, g) in enumerate(zip(models, generators)):
        order[m, :len(d["fit"])] = d["fit"][torch.randperm(len(d["fit"]), generator=g).numpy()]
    return torch.from_numpy(order.reshape(len(models), steps, batch).transpose(1, 0, 2).copy()).to(device)


def _program_task(cfgs, source, labels, index, folds, num_classes, on_epoch=None, head=None, full_models: int = 0,
                  maps_per_call: int = 0) -> list[list]:
    """One program wherever it runs: its configs -> per config its folds' results. source: the pooled path's _Source
    or the full models' trunk maps. `on_epoch(done, epochs, units)` hears of every finished epoch (units: the
    program's runs x folds)."""
    device = resolve_device(cfgs[0].device)
    if isinstance(source, _Source):
        source = dataclasses.replace(source, rows=source.rows.to(device), scale=source.scale.to(device))
    else:
        source = place_features(source, device)
    return _train_models(source, labels, index, folds, cfgs, num_classes, device, on_epoch, head, full_models,
                         maps_per_call)


def _train_models(source, labels, index, folds, cfgs, num_classes, device, on_epoch=None, head=None,
                  full_models: int = 0, maps_per_call: int = 0) -> list[list]:
    """Train the folds of every config at once (full models: one program per number of training clips, one after
    another); per config the fold results run_loso's train_fold returns, in fold order."""
    cfg0, n_factors = cfgs[0], source.shape[2]
    alike = lambda c: dataclasses.replace(c, seed=0, use_alpha=True, use_beta=True, factor_slots=None)  # noqa: E731
    if any(alike(c) != alike(cfg0) for c in cfgs) or len({len(_slots(c, n_factors)) for c in cfgs}) > 1:
        raise ValueError("run_sweep: the configs of one batch may differ only in seed, attention and factor slots "
                         "(as many slots each)")
    if isinstance(source, _Source):
        groups = [None]
        build = lambda _: _build(source, index, folds, cfgs, num_classes, device, head)  # noqa: E731
    else:  # each program built when its turn comes: one program's layer4s in memory at a time
        groups = _full_groups(index, folds, cfgs, full_models, maps_per_call, *source.shape[1:3])
        build = lambda group: (group, _full_program(group, source, num_classes, device, maps_per_call))  # noqa: E731
    out, epochs = [[] for _ in cfgs], cfg0.epochs * len(groups)
    for g, group in enumerate(groups):
        models, program = build(group)
        tick = (lambda done, g=g: on_epoch(g * cfg0.epochs + done, epochs, len(cfgs) * len(folds))) if on_epoch \
            else None
        log = _train(program, models, labels.to(device), cfg0, device, tick)
        for j, runs in enumerate(_fold_results(models, cfgs, folds, labels, log)):
            out[j] += runs
    position = {name: i for i, (name, _, _) in enumerate(folds)}
    return [sorted(runs, key=lambda run: position[run[0]]) for runs in out]


def _train(program: _Program | _FullProgram, models, labels, cfg: TrainConfig, device, tick=None) -> dict:
    """Every epoch of every model: shuffled batches, cfg's optimiser and schedule (train.make_optimizer), then
    predictions on the test (and inner validation) rows; tick(epochs done) after each. -> per epoch predictions,
    attention and history."""
    B = cfg.batch_size
    n_fit = np.array([len(d["fit"]) for d in models])
    mask = torch.from_numpy(np.arange(program.heads.last[-1] * B).reshape(-1, 1, B) < n_fit[:, None]).to(device)
    weight = mask / mask.sum(2, keepdim=True).clamp(min=1)  # S, M, B: a batch's loss is its mean
    # a full model's step takes only the clips of its batch, which its BatchNorm sees (its program's models train on
    # as many clips); heads take B columns, the padded ones with loss weight 0
    width = np.minimum(B, n_fit.max() - np.arange(len(mask)) * B) if isinstance(program, _FullProgram) \
        else np.full(len(mask), B)
    generators = [torch.Generator().manual_seed(d["seed"]) for d in models]
    test_idx, test_mask = _padded([d["test"] for d in models], device)
    val_idx, val_mask = _padded([d["val"] for d in models], device)
    optimizer, scheduler = make_optimizer(program.heads.leaves(), cfg)
    criterion = make_loss(reduction="none")
    log = {"pred": [], "alpha": [], "beta": [], "val_pred": [], "history": []}
    for epoch in range(cfg.epochs):
        lr = optimizer.param_groups[0]["lr"]
        order = _shuffled(models, generators, len(mask), B, device)  # S, M, B
        y = labels[order]  # S, M, B
        losses, correct = torch.zeros(mask.shape[:2], device=device), torch.zeros_like(mask[:, :, 0], dtype=int)
        program.train(True)
        for step, w in enumerate(width):
            logits = program(order[step, :, :w])[0].float()  # M, w, C
            loss = (criterion(logits.transpose(1, 2), y[step, :, :w]) * weight[step, :, :w]).sum(1)  # M: batch means
            loss.sum().backward()
            program.heads.step(optimizer, step)
            losses[step] = loss.detach()
            correct[step] = ((logits.argmax(2) == y[step, :, :w]) & mask[step, :, :w]).sum(1)
        scheduler.step()
        loss_sum = (losses.cpu().double() * mask.sum(2).cpu()).sum(0)  # M, in float64 on the CPU (MPS has none)
        _check_diverged(program, models, loss_sum, epoch)
        log["history"].append({"lr": lr, "train_loss": loss_sum.cpu(), "train_acc": correct.sum(0).cpu()})
        program.train(False)
        with torch.no_grad():
            logits, alpha, beta = program(test_idx)
            if val_mask.any():
                log["val_pred"].append(program(val_idx)[0].argmax(2).cpu())
        pred = logits.argmax(2)
        log["pred"].append(pred.cpu())
        log["alpha"].append(alpha.float().cpu())
        log["beta"].append(beta.float().cpu())
        log["history"][-1]["test_acc"] = ((pred == labels[test_idx]) & test_mask).sum(1).cpu().double() \
            / test_mask.sum(1).cpu()
        if tick:
            tick(epoch + 1)
    return log


def _check_diverged(program: _Program | _FullProgram, models, loss_sum: torch.Tensor, epoch: int) -> None:
    """Raise TrainingDiverged for the first model whose epoch loss or parameters are not finite (one check per
    epoch; the loss is read back anyway)."""
    finite = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in program.heads.params().values()]).all(0)  # M
    bad = (~torch.isfinite(loss_sum) | ~finite.cpu()).nonzero().flatten()  # loss_sum: float64 on the CPU
    if len(bad):
        m = int(bad[0])
        what = (f"the training loss is {float(loss_sum[m]):.4g}" if not torch.isfinite(loss_sum[m])
                else "a parameter became non-finite")
        raise diverged(models[m]["cfg"], models[m]["fold"], epoch, f"{what} ({len(bad)} of {len(models)} models of "
                                                                   "this batch diverged)")


def _fold_results(models, cfgs, folds, labels, log) -> list[list]:
    """Per config, its folds' results in train_fold's format, with the epoch chosen by its rule."""
    history = {k: torch.stack([h[k] for h in log["history"]]).double().numpy()
               for k in ("train_loss", "train_acc", "test_acc")}  # E, M
    pred = torch.stack(log["pred"]).numpy()  # E, M, T
    val_pred = torch.stack(log["val_pred"]).numpy() if log["val_pred"] else None  # E, M, V
    memo: dict = {}
    out = [[] for _ in cfgs]
    for m in np.argsort([d["i"] for d in models], kind="stable"):  # fold order
        d, i, j = models[m], models[m]["i"], models[m]["j"]
        n_test, n_val, n_fit = len(d["test"]), len(d["val"]), len(d["fit"])
        rows = []
        for e, h in enumerate(log["history"]):
            row = {"epoch": e, "lr": h["lr"], "train_loss": float(history["train_loss"][e, m] / n_fit),
                   "train_acc": float(history["train_acc"][e, m] / n_fit), "test_acc": float(history["test_acc"][e, m])}
            if n_val:
                row["val_uf1"] = _uf1(labels[d["val"]].numpy(), val_pred[e, m, :n_val], memo)
            rows.append(row)
        chosen, best_test, kept = choose_epoch(rows, cfgs[j].epoch_selection)
        rows = rows[:kept]  # the paper rule's fold ends at its first 100% epoch
        out[j].append((folds[i][0], {
            "rows": d["test"], "pred": pred[chosen, m, :n_test], "alpha": log["alpha"][chosen][m, :n_test].numpy(),
            "beta": log["beta"][chosen][m, :n_test].numpy(), "epoch": chosen, "pred_last": pred[kept - 1, m, :n_test],
            "pred_best_test": pred[best_test, m, :n_test], "history": rows, "val_subject_rows": d["val"]}))
    return out


def _uf1(gt: np.ndarray, pred: np.ndarray, memo: dict) -> float:
    """metrics.uf1, once per distinct (labels, predictions): epochs and models often predict alike."""
    key = (gt.tobytes(), pred.tobytes())
    if key not in memo:
        memo[key] = uf1(gt, pred)
    return memo[key]
