"""Every LOSO fold x variant x seed of the frozen-layer4 path trained as one batched program.

Model m is the model `run_loso` trains for its (variant, seed) and fold: the same initial head (drawn from
the fold's seed), the same shuffles, the same RMSprop + StepLR updates, up to float rounding (the same sums
are taken in another order; tests/test_sweep.py bounds the difference). Parameters are stacked over
models; a model without a batch at a step (folds differ in size) is left untouched; the attention switches
are masks, and models with as many factor slots train together, each gathering its own slots (models that read
the same rows, a seed's variants over the same slots, gather them once). The heads
only ever need 2 + C projections of each (frame, slot) feature vector (w_alpha.x, w_beta.x, W_fc.x), so
each step gathers feature rows chunk by chunk into cache for one matmul forward and one for the weights'
gradient; the rest (attention, loss, its gradient by hand) works on the projections. Each fold's
standardisation is folded into its models' weights, so every model reads one centred feature tensor. Finished
(variant, seed) runs go into the keyed folders `run_loso` uses, so a re-run (with either engine) skips them.
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
import torch.nn.functional as F

from .cache import Entry, key_of
from .executors import as_executor
from .metrics import uf1
from .model import AMAN, attention_weights
from .oracle import ORACLE_TARGET_PX, oracle_choice, oracle_name
from .results import LOSOResult
from .runtime import progress_bar, resolve_device
from .train import (Keyed, TrainConfig, TrainingDiverged, Variant, _check_index, _finish_run, _fix,
                    _inner_val_subject, _unpack, ablation_variants, check_finite, choose_epoch, clip_names, diverged,
                    fold_seed, loso_folds, model_name, prepare_features, run_inputs, run_loso, standardisation)

RMS_ALPHA = 0.99  # torch.optim.RMSprop's default smoothing, as the authors use it
PROGRAM_MODELS = 1024  # models of one batched program at most (bounds its memory; a killed sweep keeps the finished)
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


def run_sweep(features, index: pd.DataFrame, cfg: TrainConfig | None = None, variants: list[Variant] | None = None,
              seeds=(0,), runs_dir: str | Path = "results/work/runs", factors=None,
              progress: bool = True, executor="local") -> SweepResult:
    """Train every variant (default: the paper's ablations) with every seed under LOSO; one progress bar.

    Pooled features (the frozen-layer4 path) train as batched programs of (variant, seed) models; 6-D features
    (the full model) go through run_loso per (variant, seed). `cfg.seed` is replaced by each seed. `executor`
    ('local', 'ray' or an amanlib.executors Executor) runs the programs, or run_loso's folds; this process
    writes every run.
    """
    cfg = cfg or TrainConfig()
    seeds = _seeds(seeds)
    index = index.reset_index(drop=True)
    labels = _check_index(index)
    features = prepare_features(features, cfg, runs_dir, progress)
    tensor, key, known = _unpack(features)
    factors = [float(f) for f in factors] if factors is not None else known
    if factors is None and variants is None:
        raise ValueError("run_sweep: pass the factor values of these features (factors=...)")
    if factors is not None and len(factors) != tensor.shape[2]:
        raise ValueError(f"{len(factors)} factor values given for features with {tensor.shape[2]} factor slots")
    if len(tensor) != len(index):
        raise ValueError(f"features hold {len(tensor)} clips but the index has {len(index)} rows")
    variants = variants or ablation_variants(factors)
    jobs = [(v, s, dataclasses.replace(cfg, seed=s, factor_slots=v.factor_slots, use_alpha=v.use_alpha,
                                       use_beta=v.use_beta)) for v in variants for s in seeds]
    folds = loso_folds(index)
    with progress_bar(total=len(jobs) * len(folds), desc="training (variants x seeds x folds)",
                      disable=not progress) as bar, as_executor(executor) as ex:
        try:
            if tensor.dim() == 6:  # the full model: layer4 trains, one fold at a time
                keyed = Keyed(tensor, key, factors, _fix(features))
                runs = {(v.name, s): run_loso(keyed, index, c, runs_dir, progress=progress, bar=bar, executor=ex)
                        for v, s, c in jobs}
            else:
                runs = _run_batched(tensor, key, factors, labels, index, folds, jobs, runs_dir, bar, _fix(features),
                                    ex)
        except TrainingDiverged as e:  # name the variant, which a run's config does not hold
            variant = next((v.name for v, _, c in jobs if c == e.cfg), None)
            if variant is None:
                raise
            raise TrainingDiverged(f"{variant}: {e}", e.cfg, e.fold) from None
    return _gather(runs)


def run_ablations(features, index: pd.DataFrame, factors=None, cfg: TrainConfig | None = None,
                  runs_dir: str | Path = "results/work/runs", variants: list[Variant] | None = None,
                  seeds=None, progress: bool = True, executor="local", truth: pd.DataFrame | None = None,
                  oracle_target_px=ORACLE_TARGET_PX) -> tuple[pd.DataFrame, SweepResult]:
    """run_sweep over the paper's ablations (default seeds: cfg.seed alone) and the table of UF1 / UAR /
    accuracy per variant, seed and subset. With the synthetic truth (data.truth_for(index); None on real data)
    and single factors among the variants, the oracle too (run_oracle at oracle_target_px): a positive control
    whose runs join the sweep's as variant `oracle factor (truth)`, never a method."""
    cfg = cfg or TrainConfig()
    seeds = seeds if seeds is not None else [cfg.seed]
    result = run_sweep(features, index, cfg, variants, seeds, runs_dir, factors, progress, executor)
    if truth is not None and any(_single_factor(r.config) for r in result.runs.values()):
        oracle = run_oracle(features, index, truth, factors, cfg, runs_dir, seeds, oracle_target_px, progress, executor)
        result = dataclasses.replace(_gather({**result.runs, **oracle.runs}), oracle=oracle.oracle)
    table = result.scores.drop(columns="epoch_selection")[["variant", "seed", "subset", "uf1", "uar", "accuracy", "n"]]
    table = table.assign(model=model_name(cfg), epoch_selection=cfg.epoch_selection
                         + (" (optimistic)" if cfg.optimistic else ""))
    return table, result


def _single_factor(config: dict) -> bool:
    """Whether a run's config is a single magnified factor with both attentions, as the single-factor variants."""
    return len(config.get("factors") or []) == 1 and config["factors"][0] > 1 and config["use_alpha"] \
        and config["use_beta"]


def run_oracle(features, index: pd.DataFrame, truth: pd.DataFrame, factors=None, cfg: TrainConfig | None = None,
               runs_dir: str | Path = "results/work/runs", seeds=(0,), target_px=ORACLE_TARGET_PX,
               progress: bool = True, executor="local") -> SweepResult:
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
    tensor, key, known = _unpack(prepared)
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
                      _fix(prepared))
        runs.update(run_sweep(keyed, index, cfg, [Variant(name(target), (0,))], seeds, runs_dir, None,
                              progress, executor).runs)
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


def _run_batched(tensor, key, factors, labels, index, folds, jobs, runs_dir, bar, fix: str, ex) -> dict:
    entries = [Entry(runs_dir, run_inputs(key, index, c), "LOSO run") for _, _, c in jobs]
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
            fits = [fit for i in todo for _, fit in _splits(index, folds, jobs[i][2])]
            source = _source(tensor, fits, device if ex.name == "local" else "cpu") if todo else None
            programs = _programs(todo, jobs, tensor.shape[2], len(folds))
            shared = {"source": source, "labels": labels, "index": index, "folds": folds, "num_classes": num_classes}
            ticks = _EpochTicks(bar)
            if ex.name == "local":  # the bar moves every epoch, so its ETA shows early (a Ray task cannot reach it)
                shared["on_epoch"] = ticks
            for position, results in ex.map(_program_task, [[jobs[i][2] for i in p] for p in programs], shared):
                program = programs[position]
                ticks.finish(len(program) * len(folds))
                for i, done in zip(program, results):
                    cfg_i = jobs[i][2]
                    _finish_run(entries[i], cfg_i, done, index, labels, factors, _slots(cfg_i, tensor.shape[2]),
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
        val = _inner_val_subject(index, train_rows, fold_seed(cfg, i)) if cfg.epoch_selection == "inner_val" \
            else np.array([], int)
        out.append((val, np.setdiff1d(train_rows, val)))
    return out


def _programs(todo: list[int], jobs, n_factors: int, n_folds: int) -> list[list[int]]:
    """The jobs to train together: as many factor slots each (so every model gathers as many feature rows), at
    most PROGRAM_MODELS models, a seed's configs next to each other."""
    groups: dict[int, list[int]] = {}
    for i in sorted(todo, key=lambda i: jobs[i][2].seed):  # a seed's variants side by side: they can share rows
        groups.setdefault(len(_slots(jobs[i][2], n_factors)), []).append(i)
    per_program = max(1, PROGRAM_MODELS // n_folds)
    return [members[start:start + per_program] for members in groups.values()
            for start in range(0, len(members), per_program)]


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


@dataclass
class _Program:
    """M stacked heads. The weights only ever meet the features as projections w.x per (clip, frame, slot): one
    matmul over feature rows gathered chunk by chunk (a chunk stays in cache), after which the heads work on
    J = 2 + C numbers per row instead of 512. Each model's standardisation is folded into its weights:
    w.(x - mean - offset) / scale = (w / scale).(x - mean) - (w / scale).offset, the offset being one more row
    each model gathers and the last term joining the bias."""

    theta: torch.Tensor  # M*J*512 + M*J: weights of alpha, beta and the C classes, then their biases
    n_out: int  # J
    alpha_on: torch.Tensor  # M, 1, 1, 1 bool
    beta_on: torch.Tensor  # M, 1, 1 bool
    base: torch.Tensor  # M, 1, F, K': each model's source rows of clip 0 over its K' factor slots
    offset_row: torch.Tensor  # M: the source row of each model's offset
    scale: torch.Tensor  # M, 1, 512
    source: _Source
    chunk_elements: int
    share: int = 1  # runs of this many consecutive models read the same rows at every step (_sharing)
    buffer: torch.Tensor | None = None  # the gathered features of a chunk
    folded: torch.Tensor | None = None  # M, J, 512: the weights on centred features

    @property
    def weights(self) -> torch.Tensor:  # M, J, 512 (a view of theta)
        return _split(self.theta, self.n_out)[0]

    @property
    def bias(self) -> torch.Tensor:  # M, J (a view of theta)
        return _split(self.theta, self.n_out)[1]

    def rows(self, clips: torch.Tensor) -> torch.Tensor:
        """clips ..., M, L (clip numbers) -> source rows ..., M, L*F*K' + 1: the clips' frames and slots, then the
        model's offset."""
        _, frames, k = self.source.shape
        rows = (self.base + clips[..., None, None] * (frames * k)).flatten(-3)
        return torch.cat([rows, self.offset_row.expand(rows.shape[:-1])[..., None]], -1)

    def forward(self, rows: torch.Tensor):
        """rows M, R + 1 -> logits M, L, C and what _backward needs."""
        if self.folded is None:  # kept: a fresh tensor of this size each step costs page faults
            self.folded = torch.empty_like(self.weights)
        weights = torch.div(self.weights, self.scale, out=self.folded)  # M, J, 512: on centred features
        out = self.project(rows, weights)  # M, J, R + 1
        P = out[..., :-1].view(*out.shape[:2], -1, *self.base.shape[2:])  # M, J, L, F, K'
        return _forward(P, self.bias - out[..., -1], self.alpha_on, self.beta_on)

    def attend(self, rows: torch.Tensor):
        """rows M, R + 1 -> logits M, L, C, alpha M, L, F, K', beta M, L, F, as AMAN.attend gives them."""
        logits, saved = self.forward(rows)
        return logits, saved[1], saved[4]

    def project(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Source rows M, R and weights M, J, 512 -> the projections w.x of every row on every weight, M, J, R.
        Models that share rows are one matmul: their gathered rows against their V*J stacked weights."""
        M, J, V = *weights.shape[:2], self.share
        out = weights.new_empty(M, J, rows.shape[1])
        shared_w, shared_out = weights.view(M // V, V * J, -1), out.view(M // V, V * J, -1)
        for s, e, x in self._chunks(rows[::V]):
            torch.bmm(shared_w[s:e], x.transpose(1, 2), out=shared_out[s:e])
        return out

    def gradient(self, rows: torch.Tensor, d_out: torch.Tensor, d_bias: torch.Tensor, grad: torch.Tensor) -> None:
        """theta's gradient into grad (like theta) from the gradients of the projections d_out M, J, R + 1 (its last
        column, the offsets', is filled here) and of the folded biases d_bias M, J: sum over rows of x times
        dloss/dprojection, unfolded."""
        grad_w, grad_b = _split(grad, self.n_out)
        torch.neg(d_bias, out=d_out[..., -1])
        M, J, V = *grad_w.shape[:2], self.share
        shared_d, shared_grad = d_out.view(M // V, V * J, -1), grad_w.view(M // V, V * J, -1)
        for s, e, x in self._chunks(rows[::V]):
            torch.bmm(shared_d[s:e], x, out=shared_grad[s:e])
        grad_w.div_(self.scale)
        grad_b.copy_(d_bias)

    def _chunks(self, rows: torch.Tensor):
        """(start, end, features M', R, 512) of the rows of M' (groups of) models, CHUNK_ELEMENTS floats at a time."""
        per_model = rows.shape[1]
        step = max(1, self.chunk_elements // (per_model * 512))
        for s in range(0, len(rows), step):
            e = min(len(rows), s + step)
            flat = rows[s:e].reshape(-1)
            if self.buffer is None or len(self.buffer) < len(flat):
                self.buffer = self.source.rows.new_empty(max(len(flat), step * per_model), 512)
            x = torch.index_select(self.source.rows, 0, flat, out=self.buffer[:len(flat)])
            yield s, e, x.view(e - s, per_model, 512)


def _split(flat: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat parameter-shaped tensor -> its views weights M, J, 512 and biases M, J."""
    M = len(flat) // (n_out * 513)
    return flat[:M * n_out * 512].view(M, n_out, 512), flat[M * n_out * 512:].view(M, n_out)


def _forward(P: torch.Tensor, bias: torch.Tensor, alpha_on: torch.Tensor, beta_on: torch.Tensor):
    """AMAN.attend on projections: P M, J, L, F, K (w.x of alpha, beta and the C classes per frame and slot), bias
    M, J -> logits M, L, C and what the backward needs. v_frame's projections are the alpha-weighted means of P."""
    a, w_a = attention_weights(P[:, 0] + bias[:, 0, None, None, None], alpha_on, 3)  # M, L, F, K
    r = (w_a[:, None] * P[:, 1:]).sum(4)  # M, 1+C, L, F: w_beta.v_frame, W_fc.v_frame
    b, w_b = attention_weights(r[:, 0] + bias[:, 1, None, None], beta_on, 2)  # M, L, F
    v = (w_b[:, None] * r[:, 1:]).sum(3)  # M, C, L: W_fc.v
    return v.transpose(1, 2) + bias[:, None, 2:], (P, a, w_a, r, b, w_b, v)


def _backward(g: torch.Tensor, saved, alpha_on: torch.Tensor, beta_on: torch.Tensor, out=None):
    """_forward's gradients by hand (autograd's graph would cost more than the head): g = dloss/dlogits M, L, C ->
    dloss/dP M, J, L, F, K (into `out` if given) and dloss/dbias M, J. A weighted mean sum_k w_k x_k with
    w = sigmoid(s) / sum(sigmoid(s)) has d/ds_k = w_k (1 - sigmoid(s_k)) (x_k - mean)."""
    P, a, w_a, r, b, w_b, v = saved
    g = g.transpose(1, 2)  # M, C, L
    d_b = ((r[:, 1:] - v[..., None]) * g[..., None]).sum(1)  # M, L, F
    d_beta_in = torch.where(beta_on, d_b * w_b * (1 - b), 0.0)  # M, L, F
    d_r = torch.cat([d_beta_in[:, None], w_b[:, None] * g[..., None]], 1)  # M, 1+C, L, F
    d_a = ((P[:, 1:] - r[..., None]) * d_r[..., None]).sum(1)  # M, L, F, K
    d_alpha_in = torch.where(alpha_on, d_a * w_a * (1 - a), 0.0)  # M, L, F, K
    d_P = torch.cat([d_alpha_in[:, None], w_a[:, None] * d_r[..., None]], 1, out=out)  # M, J, L, F, K
    d_bias = torch.cat([d_alpha_in.sum((1, 2, 3))[:, None], d_beta_in.sum((1, 2))[:, None], g.sum(2)], 1)  # M, J
    return d_P, d_bias


def _padded(rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row lists of different lengths -> index M, L (padded with row 0) and mask M, L."""
    width = max(1, max(len(r) for r in rows))
    index = np.zeros((len(rows), width), np.int64)
    for m, r in enumerate(rows):
        index[m, :len(r)] = r
    mask = np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]
    return torch.from_numpy(index).to(device), torch.from_numpy(mask).to(device)


def _build(source: _Source, index, folds, cfgs, num_classes, device):
    """Per model (fold-major): rows, initial head, attention switches and standardisation, as run_loso has them."""
    splits = [_splits(index, folds, cfg) for cfg in cfgs]
    models, heads = [], {}
    for i, (fold, test_rows, _) in enumerate(folds):
        for cfg, split in zip(cfgs, splits):
            seed = fold_seed(cfg, i)
            if seed not in heads:  # the head run_loso draws for this fold's seed
                torch.manual_seed(seed)
                heads[seed] = AMAN(num_classes, layer4=False).state_dict()
            val, fit = split[i]
            models.append({"cfg": cfg, "fold": fold, "seed": seed, "test": test_rows, "fit": fit, "val": val,
                           "head": heads[seed], "group": source.groups[fit.tobytes()]})
    names = ("alpha.0", "beta.0", "pred_fc")
    weights = torch.stack([torch.cat([d["head"][f"{n}.weight"] for n in names]) for d in models])  # M, J, 512
    biases = torch.stack([torch.cat([d["head"][f"{n}.bias"] for n in names]) for d in models])  # M, J
    n_frames, n_factors = source.shape[1:]
    slots = torch.tensor([_slots(d["cfg"], n_factors) for d in models])  # M, K'
    base = torch.arange(n_frames)[None, :, None] * n_factors + slots[:, None]  # M, F, K'
    group = torch.tensor([d["group"] for d in models], device=device)
    on = lambda name: torch.tensor([getattr(d["cfg"], name) for d in models], device=device)  # noqa: E731
    chunk = CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    program = _Program(torch.cat([weights.flatten(), biases.flatten()]).to(device), weights.shape[1],
                       on("use_alpha")[:, None, None, None], on("use_beta")[:, None, None], base[:, None].to(device),
                       int(np.prod(source.shape)) + group, source.scale[group][:, None], source, chunk,
                       _sharing(models, n_factors))
    return models, program


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


def _rmsprop(theta: torch.Tensor, grad: torch.Tensor, square: torch.Tensor, lr: float, cfg: TrainConfig,
             on: torch.Tensor | None, work: torch.Tensor) -> None:
    """torch.optim.RMSprop's update (weight decay, no momentum) of flat parameters; where `on` (like theta,
    bool; None: everywhere) is False, parameters and state stay. `grad` and `work` (like theta) are used up."""
    if cfg.weight_decay != 0:
        grad.add_(theta, alpha=cfg.weight_decay)
    if on is None:
        square.mul_(RMS_ALPHA).addcmul_(grad, grad, value=1 - RMS_ALPHA)
        theta.addcdiv_(grad, torch.sqrt(square, out=work).add_(cfg.eps), value=-lr)
        return
    updated = square.mul(RMS_ALPHA).addcmul_(grad, grad, value=1 - RMS_ALPHA)
    stepped = theta.addcdiv(grad, updated.sqrt().add_(cfg.eps), value=-lr)
    square.copy_(torch.where(on, updated, square))
    theta.copy_(torch.where(on, stepped, theta))


def _shuffled(models, generators, steps: int, batch: int, device) -> torch.Tensor:
    """One epoch's batches of every model, drawn as train_epoch draws them -> clip numbers steps, M, batch
    (clip 0 past a model's end)."""
    order = np.zeros((len(models), steps * batch), np.int64)
    for m, (d, g) in enumerate(zip(models, generators)):
        order[m, :len(d["fit"])] = d["fit"][torch.randperm(len(d["fit"]), generator=g).numpy()]
    return torch.from_numpy(order.reshape(len(models), steps, batch).transpose(1, 0, 2).copy()).to(device)


def _program_task(cfgs, source: _Source, labels, index, folds, num_classes, on_epoch=None) -> list[list]:
    """One program wherever it runs: its configs -> per config its folds' results. `on_epoch(done, epochs, units)`
    hears of every finished epoch (units: the program's runs x folds)."""
    device = resolve_device(cfgs[0].device)
    source = dataclasses.replace(source, rows=source.rows.to(device), scale=source.scale.to(device))
    return _train_models(source, labels, index, folds, cfgs, num_classes, device, on_epoch)


def _train_models(source: _Source, labels, index, folds, cfgs, num_classes, device, on_epoch=None) -> list[list]:
    """Train the folds of every config at once; per config the fold results run_loso's train_fold returns."""
    cfg0, n_factors = cfgs[0], source.shape[2]
    alike = lambda c: dataclasses.replace(c, seed=0, use_alpha=True, use_beta=True, factor_slots=None)  # noqa: E731
    if any(alike(c) != alike(cfg0) for c in cfgs) or len({len(_slots(c, n_factors)) for c in cfgs}) > 1:
        raise ValueError("run_sweep: the configs of one batch may differ only in seed, attention and factor slots "
                         "(as many slots each)")
    models, program = _build(source, index, folds, cfgs, num_classes, device)
    with torch.inference_mode():  # gradients are by hand: no autograd
        tick = (lambda done: on_epoch(done, cfg0.epochs, len(cfgs) * len(folds))) if on_epoch else None
        log = _train(program, models, labels.to(device), cfg0, num_classes, device, tick)
    return _fold_results(models, cfgs, folds, labels, log)


def _train(program: _Program, models, labels, cfg: TrainConfig, num_classes: int, device, tick=None) -> dict:
    """Every epoch of every model: shuffled batches, RMSprop + StepLR, then predictions on the test (and inner
    validation) rows; tick(epochs done) after each. -> per epoch predictions, attention and history."""
    B = cfg.batch_size
    n_fit = np.array([len(d["fit"]) for d in models])
    steps = -(-n_fit // B)  # M: batches per epoch of each model
    mask = torch.from_numpy(np.arange(steps.max() * B).reshape(-1, 1, B) < n_fit[:, None]).to(device)  # S, M, B
    generators = [torch.Generator().manual_seed(d["seed"]) for d in models]
    test_idx, test_mask = _padded([d["test"] for d in models], device)
    val_idx, val_mask = _padded([d["val"] for d in models], device)
    state, has_val = _State(program, mask, int(steps.min())), bool(val_mask.any())
    lr = cfg.lr
    log = {"pred": [], "alpha": [], "beta": [], "val_pred": [], "history": []}
    for epoch in range(cfg.epochs):
        order = _shuffled(models, generators, len(mask), B, device)  # S, M, B
        loss_sum, correct = state.epoch(order, labels, num_classes, lr, cfg)
        _check_diverged(program, models, loss_sum, epoch)
        log["history"].append({"lr": lr, "train_loss": loss_sum.cpu(), "train_acc": correct.cpu()})
        if (epoch + 1) % cfg.step_size == 0:
            lr = lr * cfg.gamma  # StepLR(step_size, gamma), stepped once per epoch
        logits, alpha, beta = program.attend(program.rows(test_idx))
        pred = logits.argmax(2)
        log["pred"].append(pred.cpu())
        log["alpha"].append(alpha.cpu())
        log["beta"].append(beta.cpu())
        log["history"][-1]["test_acc"] = (((pred == labels[test_idx]) & test_mask).sum(1).double()
                                          / test_mask.sum(1)).cpu()
        if has_val:
            log["val_pred"].append(program.attend(program.rows(val_idx))[0].argmax(2).cpu())
        if tick:
            tick(epoch + 1)
    return log


def _check_diverged(program: _Program, models, loss_sum: torch.Tensor, epoch: int) -> None:
    """Raise TrainingDiverged for the first model whose epoch loss or parameters are not finite (one check per
    epoch; the loss is read back anyway)."""
    weights, biases = _split(program.theta, program.n_out)
    finite_theta = torch.isfinite(weights).all(2).all(1) & torch.isfinite(biases).all(1)  # M
    bad = (~torch.isfinite(loss_sum.to(finite_theta.device)) | ~finite_theta).nonzero().flatten()
    if len(bad):
        m = int(bad[0])
        what = (f"the training loss is {float(loss_sum[m]):.4g}" if not torch.isfinite(loss_sum[m])
                else "a parameter became non-finite")
        raise diverged(models[m]["cfg"], models[m]["fold"], epoch, f"{what} ({len(bad)} of {len(models)} models of "
                                                                   "this batch diverged)")


class _State:
    """The optimiser's state over a program's models and one epoch's training steps."""

    def __init__(self, program: _Program, mask: torch.Tensor, all_active: int):
        self.program, self.mask, self.all_active = program, mask, all_active  # mask S, M, B
        self.weight = mask / mask.sum(2, keepdim=True).clamp(min=1)  # S, M, B: a batch's loss is its mean
        self.square = torch.zeros_like(program.theta)
        self.grad, self.work = torch.empty_like(program.theta), torch.empty_like(program.theta)
        self.losses = torch.zeros(mask.shape[:2], device=mask.device)  # S, M
        self.correct = torch.zeros(mask.shape[:2], dtype=torch.long, device=mask.device)

    def epoch(self, order: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, cfg: TrainConfig):
        """Train on batches order S, M, B (clip numbers) -> per model the summed loss (float64) and hits."""
        y = labels[order]  # S, M, B
        onehot = F.one_hot(y, num_classes).to(self.program.theta.dtype)  # S, M, B, C
        for step in range(len(order)):
            logits = self.step(self.program.rows(order[step]), onehot[step], self.weight[step], lr, cfg,
                               None if step < self.all_active else self._on(self.mask[step].any(1)), self.losses[step])
            torch.sum((logits.argmax(2) == y[step]) & self.mask[step], 1, out=self.correct[step])
        return (self.losses.double() * self.mask.sum(2)).sum(0), self.correct.sum(0)

    def step(self, rows, onehot, weight, lr: float, cfg: TrainConfig, on, loss_out) -> torch.Tensor:
        """One RMSprop step of every model on source rows M, B*F*K' + 1 (labels onehot M, B, C; weight M, B:
        1 / batch size, 0 past a model's end) -> the logits M, B, C; the batch losses M go to loss_out."""
        program = self.program
        logits, saved = program.forward(rows)
        log_p = torch.log_softmax(logits, 2)  # M, B, C
        torch.sum((log_p * onehot).sum(2).neg_().mul_(weight), 1, out=loss_out)
        d_out = saved[0].new_empty(*saved[0].shape[:2], rows.shape[1])  # M, J, R + 1
        _, d_bias = _backward((log_p.exp_() - onehot) * weight[..., None], saved, program.alpha_on, program.beta_on,
                              out=d_out[..., :-1].view(saved[0].shape))
        program.gradient(rows, d_out, d_bias, self.grad)
        _rmsprop(program.theta, self.grad, self.square, lr, cfg, on, self.work)
        return logits

    def _on(self, active: torch.Tensor) -> torch.Tensor:
        """Which models have a batch, M bool -> which parameters update, like theta."""
        J = self.program.n_out
        return torch.cat([active.repeat_interleave(J * 512), active.repeat_interleave(J)])


def _fold_results(models, cfgs, folds, labels, log) -> list[list]:
    """Per config, its folds' results in train_fold's format, with the epoch chosen by its rule."""
    n_jobs = len(cfgs)
    history = {k: torch.stack([h[k] for h in log["history"]]).double().numpy()
               for k in ("train_loss", "train_acc", "test_acc")}  # E, M
    pred = torch.stack(log["pred"]).numpy()  # E, M, T
    val_pred = torch.stack(log["val_pred"]).numpy() if log["val_pred"] else None  # E, M, V
    memo: dict = {}
    out = [[] for _ in cfgs]
    for m, d in enumerate(models):
        i, j = divmod(m, n_jobs)
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
