"""Every LOSO fold x variant x seed of the frozen-layer4 path trained as one batched program.

Model m is exactly the model `run_loso` trains for its (variant, seed) and fold: the same initial head (drawn
from the fold's seed), the same shuffles, the same RMSprop + StepLR updates. Parameters are stacked over
models; a model without a batch at a step (folds differ in size) is left untouched; the attention switches
are masks, and models of one variant train together on that variant's factor slots only. Finished
(variant, seed) runs go into the keyed folders `run_loso` uses, so a re-run (with either engine) skips them.
"""
from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .cache import Entry
from .metrics import uf1
from .model import AMAN
from .results import LOSOResult
from .runtime import progress_bar, resolve_device
from .train import (Keyed, TrainConfig, Variant, _check_index, _finish_run, _fix, _inner_val_subject, _unpack,
                    ablation_variants, check_finite, choose_epoch, clip_names, loso_folds, model_name,
                    prepare_features, run_inputs, run_loso)

RMS_ALPHA = 0.99  # torch.optim.RMSprop's default smoothing, as the authors use it
CHUNK_ELEMENTS = 2 ** 23  # floats of one step's gathered batch per chunk of models (32 MB: measured fastest)
STANDARDISED_BYTES = 2 * 10 ** 9  # features standardised once per fold up to this size, else per batch


@dataclass
class SweepResult:
    """All (variant, seed) runs: predictions and history with variant and seed columns, scores per run."""

    predictions: pd.DataFrame
    history: pd.DataFrame
    scores: pd.DataFrame  # variant, seed, subset, uf1, uar, accuracy, n
    runs: dict[tuple[str, int], LOSOResult]


def _seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds} repeat a seed")
    return [int(s) for s in seeds]


def run_sweep(features, index: pd.DataFrame, cfg: TrainConfig | None = None, variants: list[Variant] | None = None,
              seeds=(0,), runs_dir: str | Path = "results/work/runs", factors=None,
              progress: bool = True) -> SweepResult:
    """Train every variant (default: the paper's ablations) with every seed under LOSO; one progress bar.

    Pooled features (the frozen-layer4 path) train as one batched program; 6-D features (the full model)
    go through run_loso per (variant, seed). `cfg.seed` is replaced by each seed.
    """
    cfg = cfg or TrainConfig()
    seeds = _seeds(seeds)
    index = index.reset_index(drop=True)
    labels = _check_index(index)
    features = prepare_features(features, cfg, runs_dir, progress)
    tensor, key, known = _unpack(features)
    factors = [float(f) for f in factors] if factors is not None else known
    if factors is None:
        raise ValueError("run_sweep: pass the factor values of these features (factors=...)")
    if len(factors) != tensor.shape[2]:
        raise ValueError(f"{len(factors)} factor values given for features with {tensor.shape[2]} factor slots")
    if len(tensor) != len(index):
        raise ValueError(f"features hold {len(tensor)} clips but the index has {len(index)} rows")
    variants = variants or ablation_variants(factors)
    jobs = [(v, s, dataclasses.replace(cfg, seed=s, factor_slots=v.factor_slots, use_alpha=v.use_alpha,
                                       use_beta=v.use_beta)) for v in variants for s in seeds]
    folds = loso_folds(index)
    with progress_bar(total=len(jobs) * len(folds), desc="training (variants x seeds x folds)",
                      disable=not progress) as bar:
        if tensor.dim() == 6:  # the full model: layer4 trains, one fold at a time
            keyed = Keyed(tensor, key, factors, _fix(features))
            runs = {(v.name, s): run_loso(keyed, index, c, runs_dir, progress=progress, bar=bar) for v, s, c in jobs}
        else:
            runs = _run_batched(tensor, key, factors, labels, index, folds, jobs, runs_dir, bar, _fix(features))
    return _gather(runs)


def run_ablations(features, index: pd.DataFrame, factors=None, cfg: TrainConfig | None = None,
                  runs_dir: str | Path = "results/work/runs", variants: list[Variant] | None = None,
                  seeds=None, progress: bool = True) -> tuple[pd.DataFrame, SweepResult]:
    """run_sweep over the paper's ablations (default seeds: cfg.seed alone) and the table of UF1 / UAR /
    accuracy per variant, seed and subset."""
    cfg = cfg or TrainConfig()
    result = run_sweep(features, index, cfg, variants, seeds if seeds is not None else [cfg.seed], runs_dir, factors,
                       progress)
    table = result.scores.drop(columns="epoch_selection")[["variant", "seed", "subset", "uf1", "uar", "accuracy", "n"]]
    table = table.assign(model=model_name(cfg), epoch_selection=cfg.epoch_selection
                         + (" (optimistic)" if cfg.optimistic else ""))
    return table, result


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


def _run_batched(tensor, key, factors, labels, index, folds, jobs, runs_dir, bar, fix: str) -> dict:
    entries = [Entry(runs_dir, run_inputs(key, index, c), "LOSO run") for _, _, c in jobs]
    todo = [i for i, e in enumerate(entries) if not e.done]
    bar.update((len(jobs) - len(todo)) * len(folds))
    if todo:
        check_finite(tensor, clip_names(index), fix)
        cfg = jobs[todo[0]][2]
        device = resolve_device(cfg.device)
        num_classes = cfg.num_classes or int(labels.max()) + 1
        tensor = tensor.to(device)
        with ExitStack() as stack:
            for i in sorted(todo, key=lambda i: entries[i].key):  # one lock order: no deadlock between sweeps
                stack.enter_context(entries[i].writing())
            todo = [i for i in todo if not entries[i].done]  # another run may have finished some meanwhile
            for chunk in _chunks(todo, jobs, tensor.shape, cfg.batch_size, len(folds)):
                results = _train_models(tensor, labels, index, folds, [jobs[i][2] for i in chunk],
                                        num_classes, device, bar)
                for i, done in zip(chunk, results):
                    cfg_i = jobs[i][2]
                    _finish_run(entries[i], cfg_i, done, index, labels, factors, _slots(cfg_i, len(factors)),
                                num_classes)
    return {(v.name, s): LOSOResult.load(e.path) for (v, s, _), e in zip(jobs, entries)}


def _slots(cfg: TrainConfig, n_factors: int) -> list[int]:
    return list(cfg.factor_slots) if cfg.factor_slots is not None else list(range(n_factors))


def _chunks(todo: list[int], jobs, shape, batch_size: int, n_folds: int) -> list[list[int]]:
    """The jobs to train together: the same factor slots (so only those are read), at most CHUNK_ELEMENTS
    floats per step's gathered batch."""
    groups: dict[tuple, list[int]] = {}
    for i in todo:
        groups.setdefault(tuple(_slots(jobs[i][2], shape[2])), []).append(i)
    chunks = []
    for slots, members in groups.items():
        per_model = max(1, CHUNK_ELEMENTS // (batch_size * shape[1] * len(slots) * shape[3]))
        per_job = max(1, per_model // n_folds)
        chunks += [members[start:start + per_job] for start in range(0, len(members), per_job)]
    return chunks


@dataclass
class _Models:
    """The stacked heads of M models and what differs between them."""

    params: dict[str, torch.Tensor]  # Wa [M, 512], ba [M], Wb [M, 512], bb [M], Wc [M, C, 512], bc [M, C]
    alpha_on: torch.Tensor  # M bool
    beta_on: torch.Tensor  # M bool
    features: torch.Tensor  # N, F, K, 512 raw pooled features, the chunk's factor slots only
    group: torch.Tensor  # M: which fold standardisation each model uses
    shift: torch.Tensor  # G, 512: the standardisation of each group (its fold's training clips)
    scale: torch.Tensor  # G, 512
    standardised: torch.Tensor | None  # G*N, F, K, 512 when it fits (STANDARDISED_BYTES), else None

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        """rows M, L (clip numbers) -> standardised features M, L, F, K, 512, each model with its fold's statistics."""
        if self.standardised is not None:
            return self.standardised[self.group[:, None] * len(self.features) + rows]
        shift, scale = self.shift[self.group][:, None, None, None], self.scale[self.group][:, None, None, None]
        return (self.features[rows].float() - shift) / scale

    def logits(self, x: torch.Tensor):
        """x M, B, F, K, 512 (standardised) -> logits M, B, C, alpha M, B, F, K, beta M, B, F."""
        p = self.params
        a = torch.sigmoid(torch.einsum("mbfkc,mc->mbfk", x, p["Wa"]) + p["ba"][:, None, None, None])
        a = torch.where(self.alpha_on[:, None, None, None], a, torch.ones_like(a))
        v_frame = torch.matmul(a.unsqueeze(-2), x).squeeze(-2) / a.sum(3)[..., None]  # M, B, F, 512
        b = torch.sigmoid(torch.einsum("mbfc,mc->mbf", v_frame, p["Wb"]) + p["bb"][:, None, None])
        b = torch.where(self.beta_on[:, None, None], b, torch.ones_like(b))
        v = torch.einsum("mbf,mbfc->mbc", b, v_frame) / b.sum(2)[..., None]  # M, B, 512
        return torch.einsum("mbc,mkc->mbk", v, p["Wc"]) + p["bc"][:, None], a, b


def _padded(rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row lists of different lengths -> index M, L (padded with row 0) and mask M, L."""
    width = max(1, max(len(r) for r in rows))
    index = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for m, r in enumerate(rows):
        index[m, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[m, :len(r)] = True
    return index.to(device), mask.to(device)


def _build(tensor, index, folds, cfgs, num_classes, device):
    """Per model (job-major, then fold): rows, initial head, attention switches and standardisation, as run_loso
    has them; the features of the chunk's factor slots only."""
    models = []
    heads, stats = {}, {}
    for cfg in cfgs:
        for i, (_, test_rows, train_rows) in enumerate(folds):
            seed = cfg.seed * 100_003 + i
            val = _inner_val_subject(index, train_rows, seed) if cfg.epoch_selection == "inner_val" \
                else np.array([], int)
            fit = np.setdiff1d(train_rows, val)
            if seed not in heads:  # the head run_loso draws for this fold's seed
                torch.manual_seed(seed)
                heads[seed] = AMAN(num_classes, layer4=False).state_dict()
            stat_key = fit.tobytes()  # the standardisation depends on the fold's training clips only
            if stat_key not in stats:
                x = tensor[torch.as_tensor(fit)].to(device, torch.float32).flatten(0, 2)  # n*F*K, 512
                stats[stat_key] = (len(stats), x.mean(0), x.std(0).clamp(min=1e-6))
            models.append({"cfg": cfg, "seed": seed, "test": test_rows, "fit": fit, "val": val, "head": heads[seed],
                           "group": stats[stat_key][0]})
    tensor = tensor[:, :, _slots(cfgs[0], tensor.shape[2])].contiguous()  # the statistics above cover every slot
    stack = lambda name: torch.stack([d["head"][name] for d in models]).to(device)  # noqa: E731
    params = {"Wa": stack("alpha.0.weight")[:, 0], "ba": stack("alpha.0.bias")[:, 0],
              "Wb": stack("beta.0.weight")[:, 0], "bb": stack("beta.0.bias")[:, 0],
              "Wc": stack("pred_fc.weight"), "bc": stack("pred_fc.bias")}
    for p in params.values():
        p.requires_grad_(True)
    shift = torch.stack([s[1] for s in stats.values()])  # G, 512
    scale = torch.stack([s[2] for s in stats.values()])
    standardised = None
    if len(stats) * tensor[0].numel() * len(tensor) * 4 <= STANDARDISED_BYTES:
        standardised = ((tensor[None].float() - shift[:, None, None, None]) / scale[:, None, None, None]).flatten(0, 1)
    net = _Models(params, torch.tensor([d["cfg"].use_alpha for d in models], device=device),
                  torch.tensor([d["cfg"].use_beta for d in models], device=device), tensor,
                  torch.tensor([d["group"] for d in models], device=device), shift, scale, standardised)
    return models, net


@torch.no_grad()
def _rmsprop_step(params: dict, square: dict, active: torch.Tensor, lr: float, cfg: TrainConfig) -> None:
    """torch.optim.RMSprop's update (weight decay, no momentum), applied only to the models with a batch."""
    for name, p in params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        on = active.view(shape)
        g = p.grad.add(p, alpha=cfg.weight_decay)
        sq = square[name].mul(RMS_ALPHA).addcmul_(g, g, value=1 - RMS_ALPHA)
        updated = p.addcdiv(g, sq.sqrt().add_(cfg.eps), value=-lr)
        square[name] = torch.where(on, sq, square[name])
        p.copy_(torch.where(on, updated, p))
        p.grad = None


def _train_models(tensor, labels, index, folds, cfgs, num_classes, device, bar) -> list[list]:
    """Train the folds of every config at once; per config the fold results run_loso's train_fold returns."""
    cfg0 = cfgs[0]
    if any(dataclasses.replace(c, seed=0, use_alpha=True, use_beta=True)
           != dataclasses.replace(cfg0, seed=0, use_alpha=True, use_beta=True) for c in cfgs):
        raise ValueError("run_sweep: the configs of one batch may differ only in seed and attention")
    models, net = _build(tensor, index, folds, cfgs, num_classes, device)
    M, B = len(models), cfg0.batch_size
    y_all = labels.to(device)
    gens = [torch.Generator().manual_seed(d["seed"]) for d in models]
    test_idx, test_mask = _padded([d["test"] for d in models], device)
    val_idx, val_mask = _padded([d["val"] for d in models], device)
    has_val = bool(val_mask.any())
    square = {n: torch.zeros_like(p) for n, p in net.params.items()}
    lr = cfg0.lr
    n_fit = torch.tensor([len(d["fit"]) for d in models], device=device)
    log = {"pred": [], "alpha": [], "beta": [], "val_pred": [], "history": []}
    for epoch in range(cfg0.epochs):
        orders = [torch.from_numpy(d["fit"])[torch.randperm(len(d["fit"]), generator=g)] for d, g in zip(models, gens)]
        steps = max(-(-len(o) // B) for o in orders)
        loss_sum = torch.zeros(M, dtype=torch.float64, device=device)
        correct = torch.zeros(M, dtype=torch.long, device=device)
        for step in range(steps):
            idx, mask = _padded([o[step * B:(step + 1) * B].numpy() for o in orders], device)
            active = mask.any(1)
            logits = net.logits(net.batch(idx))[0]  # M, B, C
            y = y_all[idx]
            per_clip = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(M, -1) * mask
            count = mask.sum(1).clamp(min=1)
            loss = per_clip.sum(1) / count
            loss[active].sum().backward()
            _rmsprop_step(net.params, square, active, lr, cfg0)
            loss_sum += loss.detach().double() * mask.sum(1)
            correct += ((logits.detach().argmax(2) == y) & mask).sum(1)
        record_lr = lr
        if (epoch + 1) % cfg0.step_size == 0:
            lr = lr * cfg0.gamma  # StepLR(step_size, gamma), stepped once per epoch
        with torch.no_grad():
            logits, alpha, beta = net.logits(net.batch(test_idx))
            pred = logits.argmax(2)
            log["pred"].append(pred.cpu())
            log["alpha"].append(alpha.cpu())
            log["beta"].append(beta.cpu())
            test_acc = ((pred == y_all[test_idx]) & test_mask).sum(1).double() / test_mask.sum(1)
            if has_val:
                log["val_pred"].append(net.logits(net.batch(val_idx))[0].argmax(2).cpu())
        log["history"].append({"lr": record_lr, "train_loss": (loss_sum / n_fit).cpu(),
                               "train_acc": (correct / n_fit).cpu(), "test_acc": test_acc.cpu()})
    bar.update(M)
    return _fold_results(models, cfgs, folds, labels, log)


def _fold_results(models, cfgs, folds, labels, log) -> list[list]:
    """Per config, its folds' results in train_fold's format, with the epoch chosen by its rule."""
    out, n_folds = [], len(folds)
    for j, cfg in enumerate(cfgs):
        fold_results = []
        for i in range(n_folds):
            m = j * n_folds + i
            d = models[m]
            n_test, n_val = len(d["test"]), len(d["val"])
            history = []
            for e, h in enumerate(log["history"]):
                row = {"epoch": e, "lr": h["lr"], "train_loss": float(h["train_loss"][m]),
                       "train_acc": float(h["train_acc"][m]), "test_acc": float(h["test_acc"][m])}
                if n_val:
                    row["val_uf1"] = uf1(labels[d["val"]].numpy(), log["val_pred"][e][m, :n_val].numpy())
                history.append(row)
            chosen, best_test, kept = choose_epoch(history, cfg.epoch_selection)
            history = history[:kept]  # the paper rule's fold ends at its first 100% epoch
            preds = [log["pred"][e][m, :n_test].numpy() for e in range(kept)]
            alpha = log["alpha"][chosen][m, :n_test].numpy()  # ones where alpha is off
            fold_results.append((folds[i][0], {
                "rows": d["test"], "pred": preds[chosen], "alpha": alpha,
                "beta": log["beta"][chosen][m, :n_test].numpy(), "epoch": chosen, "pred_last": preds[-1],
                "pred_best_test": preds[best_test], "history": history, "val_subject_rows": d["val"]}))
        out.append(fold_results)
    return out
