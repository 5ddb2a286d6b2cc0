"""Leave-one-subject-out training of AMAN on cached features: honest by default, the authors' epoch rule on request.

Features sit in one tensor [N, F, K, 256, 14, 14] (on the GPU when they fit); batches are index slices.
Each run lives in a folder keyed by its features, clip table and settings (amanlib.cache); every finished
fold is written atomically, so a re-run skips it and ends with the same numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .cache import Entry, file_digest, tensor_digest
from .executors import as_executor
from .checkpoints import read_state_dict
from .features import FeatureCache, magnified_slots
from .metrics import megc_scores, uar, uf1
from .model import AMAN, LAYER4_BN, AMANHead
from .results import LOSOResult
from .runtime import (PRECISIONS, autocast, native_bf16, progress_bar, resolve_device, resolve_precision,
                      torch_save_atomic)

log = logging.getLogger(__name__)

EPOCH_SELECTIONS = ("fixed", "inner_val", "paper")
OPTIMIZERS = ("rmsprop", "adamw")
SCHEDULES = ("step", "cosine")
LAYER4_INITS = ("random", "backbone")
INDEX_COLUMNS = ("dataset", "subject", "clip", "label")


def range_text(f: dataclasses.Field) -> str:
    """A bounded field's range in words: "an integer >= 1", "a finite number > 0"."""
    kind = "an integer" if f.type == "int" else "a finite number"
    return f"{kind} {'>' if f.metadata.get('exclusive') else '>='} {f.metadata['min']:g}"


@dataclass
class TrainConfig:
    """Defaults are the authors' (main/train.py): RMSprop 1e-3, StepLR(30, 0.2), 50 epochs, batch 4. frozen_layer4
    'auto' is resolved here: frozen on a CPU, the full model on an accelerator."""

    lr: float = field(default=1e-3, metadata={"min": 0, "exclusive": True})
    eps: float = field(default=1e-8, metadata={"min": 0})
    weight_decay: float = field(default=1e-4, metadata={"min": 0})
    step_size: int = field(default=30, metadata={"min": 1})
    gamma: float = field(default=0.2, metadata={"min": 0})
    optimizer: str = "rmsprop"  # rmsprop (the authors') | adamw; lr, eps and weight_decay apply to either
    schedule: str = "step"  # step: StepLR(step_size, gamma), the authors' | cosine: CosineAnnealingLR over the epochs
    epochs: int = field(default=50, metadata={"min": 1})
    batch_size: int = field(default=4, metadata={"min": 1})
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # runtime.PRECISIONS, of the full model's training; the frozen-layer4 head is always fp32
    channels_last: bool = True
    num_workers: int = 0  # CPU threads for torch (0 keeps torch's default); batches need no loader workers
    epoch_selection: str = "fixed"  # fixed: last epoch | inner_val: one training subject picks it | paper
    frozen_layer4: bool | str = False  # True: the CPU fast path (layer4 pre-trained, frozen, pooled once) | "auto"
    layer4_bn: str = "per_slice"  # per_slice: BatchNorm statistics per (frame, factor), as the authors | joint
    layer4_init: str = "random"  # random: as the authors' train.py | backbone: from init_layer4_from
    init_layer4_from: str | None = None  # ResNet-18 checkpoint (FER+ or the kit's own), with layer4_init backbone
    factor_slots: tuple[int, ...] | None = None  # slots along K to use (None: all); values are in the features
    use_alpha: bool = True
    use_beta: bool = True
    num_classes: int | None = None  # None: from the labels

    def __post_init__(self):
        if self.epoch_selection not in EPOCH_SELECTIONS:
            raise ValueError(f"TrainConfig.epoch_selection must be one of {EPOCH_SELECTIONS}, "
                             f"got {self.epoch_selection!r}")
        for f in dataclasses.fields(self):  # the ranges, declared once in the fields (params.py reads them too)
            if "min" in f.metadata:
                value, bound = getattr(self, f.name), range_text(f)
                number = (int, np.integer) if f.type == "int" else (int, float)
                if isinstance(value, bool) or not isinstance(value, number) or not np.isfinite(value) \
                        or value < f.metadata["min"] or (f.metadata.get("exclusive") and value == f.metadata["min"]):
                    raise ValueError(f"TrainConfig.{f.name} must be {bound}, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.frozen_layer4 == "auto":
            self.frozen_layer4 = resolve_device(self.device).type == "cpu"
        elif not isinstance(self.frozen_layer4, bool):
            raise ValueError(f"TrainConfig.frozen_layer4 must be True, False or 'auto', got {self.frozen_layer4!r}")
        for name, allowed in (("layer4_bn", LAYER4_BN), ("layer4_init", LAYER4_INITS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if (self.layer4_init == "backbone") != bool(self.init_layer4_from):
            raise ValueError("TrainConfig.init_layer4_from names the checkpoint layer4 starts from with "
                             f"layer4_init='backbone', and only then; got layer4_init={self.layer4_init!r}, "
                             f"init_layer4_from={self.init_layer4_from!r}")
        if self.factor_slots is not None:
            self.factor_slots = tuple(int(k) for k in self.factor_slots)
            if not self.factor_slots:
                raise ValueError("TrainConfig.factor_slots is empty: AMAN needs at least one factor")

    @property
    def optimistic(self) -> bool:
        return self.epoch_selection == "paper"


def loso_folds(index: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(fold name 'dataset/subject', test rows, train rows) for each subject, in order of first appearance."""
    missing = [c for c in INDEX_COLUMNS if c not in index]
    if missing:
        raise ValueError(f"clip index lacks columns {missing} (has {list(index.columns)})")
    key = index["dataset"].astype(str) + "/" + index["subject"].astype(str)
    return [(name, np.flatnonzero(key == name), np.flatnonzero(key != name)) for name in key.unique()]


def _as_tensor(features) -> torch.Tensor:
    """Accept a tensor or a NumPy array/memmap of shape [N, F, K, C, H, W] (or pooled [N, F, K, 512])."""
    if isinstance(features, torch.Tensor):
        t = features
    else:
        with warnings.catch_warnings():  # a read-only memmap is fine: features are only ever read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.asarray(features))
    if t.dim() not in (4, 6):
        raise ValueError(f"features must be [N, F, K, C, H, W] (or pooled [N, F, K, 512]), got {tuple(t.shape)}")
    return t


def place_features(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the whole feature tensor to the device when it fits in 80% of free memory, else keep it on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if features.numel() * features.element_size() < 0.8 * free:
            return features.to(device)
        log.warning("features (%.1f GB) do not fit on %s; batches are copied from pinned host memory",
                    features.numel() * features.element_size() / 1e9, device)
        return features.pin_memory()
    return features


CONSTANT_CHANNEL = 1e-3
"""A channel whose standard deviation over a fold's training maps is below this share of the mean one is taken as
constant there (e.g. a ReLU channel that never fires): it is centred but not divided, since dividing by ~0 would blow
a test clip's value of it up by up to 1e6 and with it the logits and the loss."""


def standardisation(fit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel shift and scale of the frozen-layer4 path from one fold's training maps fit [n, 512]: the mean,
    and the standard deviation where the channel varies (CONSTANT_CHANNEL), else 1."""
    std = fit.std(0)
    return fit.mean(0), torch.where(std > CONSTANT_CHANNEL * std.mean(), std, torch.ones_like(std))


def make_optimizer(params, cfg: TrainConfig):
    """cfg's optimiser and its per-epoch schedule over `params` -> (optimizer, scheduler)."""
    kind = torch.optim.RMSprop if cfg.optimizer == "rmsprop" else torch.optim.AdamW
    optimizer = kind(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.schedule == "step":
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)


def make_head(head, cfg: TrainConfig, num_classes: int, n_frames: int, n_factors: int, seed: int) -> nn.Module:
    """A fresh head drawn from `seed`: head(num_classes, n_frames, n_factors) (None: AMANHead) with cfg's attention
    switches, which a custom head must define as use_alpha / use_beta to be ablated."""
    torch.manual_seed(seed)
    module = (head or AMANHead)(num_classes, n_frames, n_factors)
    for name in ("use_alpha", "use_beta"):
        if hasattr(module, name):
            setattr(module, name, getattr(cfg, name))
        elif not getattr(cfg, name):
            raise ValueError(f"{name}=False, but the head {type(module).__name__} has no switch {name}")
    if isinstance(module, AMANHead):
        module.zero_unused_attention(n_factors)
    return module


def uses_channels_last(cfg: TrainConfig, device) -> bool:
    """Whether the full model feeds layer4 channels_last: cfg's choice, on an accelerator only."""
    return cfg.channels_last and torch.device(device).type != "cpu"


def make_model(head, cfg: TrainConfig, num_classes: int, features_shape, seed: int, device="cpu") -> nn.Module:
    """The model a fold trains, drawn from `seed`: on pooled features [N, F, K, 512] (frozen layer4) the head alone
    (make_head), on trunk maps [N, F, K, C, H, W] AMAN with its layer4 (started from cfg.init_layer4_from)."""
    n_frames, n_factors = features_shape[1], len(cfg.factor_slots or range(features_shape[2]))
    if len(features_shape) == 4:
        return make_head(head, cfg, num_classes, n_frames, n_factors, seed).to(device)
    torch.manual_seed(seed)
    model = AMAN(num_classes, in_channels=features_shape[3], use_alpha=cfg.use_alpha, use_beta=cfg.use_beta,
                 layer4_bn=cfg.layer4_bn, channels_last=uses_channels_last(cfg, device))
    model.zero_unused_attention(n_factors)
    if cfg.init_layer4_from:
        model.load_layer4(cfg.init_layer4_from)
    return model.to(device)


def make_loss(reduction: str = "mean") -> nn.Module:
    """The training loss of both engines: cross-entropy of the logits, a batch's loss its mean over clips."""
    return nn.CrossEntropyLoss(reduction=reduction)


def head_key(head) -> str | None:
    """What names a custom head in a run's key (None: AMAN's): its qualified name and a digest of its source code, so
    editing the head's class or factory makes a new run. Code it calls elsewhere is not read: after changing only
    that, give the head a new name or use a new runs_dir."""
    if head is None or head is AMANHead:
        return None
    try:
        source = inspect.getsource(head)
    except (OSError, TypeError):  # e.g. typed into a console: its name alone
        source = ""
    name = f"{getattr(head, '__module__', '')}.{getattr(head, '__qualname__', repr(head))}"
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"


class _Fold:
    """One fold's training: a fresh model, cfg's optimiser and schedule, predictions on the test rows after every
    epoch. On pooled features the model is the head alone (`head`, None: AMAN's)."""

    def __init__(self, cfg: TrainConfig, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: torch.device, seed: int, fit_rows: np.ndarray | None = None, head=None):
        self.cfg, self.features, self.labels, self.device = cfg, features, labels, device
        self.pooled = features.dim() == 4
        self.shift, self.scale = 0.0, 1.0
        if self.pooled:  # frozen layer4: standardise each of the 512 channels with this fold's training clips
            fit = features[torch.as_tensor(fit_rows if fit_rows is not None else np.arange(len(features)))]
            self.shift, self.scale = standardisation(fit.to(device, torch.float32).flatten(0, 2))  # n*F*K, 512
        self.generator = torch.Generator().manual_seed(seed)
        self.model = make_model(head, cfg, num_classes, features.shape, seed, device)
        self.optimizer, self.scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.dtype = None if self.pooled else training_dtype(cfg, device)  # a head on pooled features: fp32
        self.criterion = make_loss()

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.features[rows.to(self.features.device)]
        if self.cfg.factor_slots is not None:
            x = x[:, :, list(self.cfg.factor_slots)]
        return (x.to(self.device, torch.float32, non_blocking=True) - self.shift) / self.scale

    def logits(self, x: torch.Tensor):
        with autocast(self.device, self.dtype):
            return self.model(x) if self.pooled else self.model(x, return_attention=True)

    def train_epoch(self, rows: np.ndarray) -> tuple[float, float]:
        self.model.train()
        order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=self.generator)]
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        total_loss = torch.zeros((), dtype=wide, device=self.device)  # summed on the device: one sync an epoch
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            y = self.labels[idx].to(self.device)
            logits = self.logits(self.batch(idx))[0].float()
            loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.detach().to(wide) * len(idx)
            correct += (logits.argmax(1) == y).sum()
        self.scheduler.step()
        return total_loss.item() / len(rows), correct.item() / len(rows)

    @torch.inference_mode()
    def predict(self, rows: np.ndarray, chunk: int = 32):
        """Predicted classes, alpha [n, F, K] and beta [n, F] for the given rows, in eval mode."""
        self.model.eval()
        preds, alphas, betas = [], [], []
        for start in range(0, len(rows), chunk):
            logits, alpha, beta = self.logits(self.batch(torch.from_numpy(rows[start:start + chunk])))
            preds.append(logits.float().argmax(1).cpu())
            alphas.append(alpha.float().cpu())
            betas.append(beta.float().cpu())
        return torch.cat(preds).numpy(), torch.cat(alphas).numpy(), torch.cat(betas).numpy()


def inner_val_subject(index: pd.DataFrame, train_rows: np.ndarray, seed: int) -> np.ndarray:
    """Rows of one training subject (drawn with the fold's seed) held out to choose the epoch."""
    key = (index["dataset"].astype(str) + "/" + index["subject"].astype(str)).to_numpy()
    subjects = sorted(set(key[train_rows]))
    chosen = subjects[np.random.default_rng(seed).integers(len(subjects))]
    return train_rows[key[train_rows] == chosen]


def authors_epoch(test_acc) -> int:
    """The authors' pick (main/train.py): the first epoch reaching the best held-out accuracy, or the last epoch
    when no clip of the subject is ever classified right."""
    acc = np.asarray(test_acc, float)
    return int(np.argmax(acc)) if acc.max() > 0 else len(acc) - 1


def stops(epoch_selection: str, test_acc: float) -> bool:
    """The authors stop a fold once its held-out accuracy is 100%; only the `paper` rule copies that."""
    return epoch_selection == "paper" and test_acc == 1.0


def choose_epoch(history: list[dict], epoch_selection: str) -> tuple[int, int, int]:
    """(the epoch whose predictions count, the authors' pick on the held-out subject, the epochs that count).

    fixed: the last epoch; paper: the authors' pick, and the fold ends at the first epoch with 100%
    held-out accuracy; inner_val: the first epoch reaching the best UF1 on the held-out training subject.
    A history trained past the paper rule's stop is cut there, so a batched run reports what a stopped one does."""
    test_acc = [h["test_acc"] for h in history]
    kept = next((e + 1 for e, a in enumerate(test_acc) if stops(epoch_selection, a)), len(history))
    best_test = authors_epoch(test_acc[:kept])
    if epoch_selection == "inner_val":
        return int(np.argmax([h["val_uf1"] for h in history])), best_test, kept
    return (best_test if epoch_selection == "paper" else kept - 1), best_test, kept


class TrainingDiverged(RuntimeError):
    """A run whose loss, parameters or outputs became non-finite: never a result, nothing of it is cached. `cfg` and
    `fold` say which run (a sweep adds the variant's name)."""

    def __init__(self, message: str, cfg: TrainConfig | None = None, fold: str | None = None):
        super().__init__(message)
        self.cfg, self.fold = cfg, fold


def diverged(cfg: TrainConfig, fold: str, epoch: int, what: str) -> TrainingDiverged:
    """The error for a run that diverged at `epoch` of `fold` (what: e.g. 'the training loss is nan')."""
    slots = "all factor slots" if cfg.factor_slots is None else f"factor slots {list(cfg.factor_slots)}"
    return TrainingDiverged(
        f"training diverged (seed {cfg.seed}, {slots}, alpha {'on' if cfg.use_alpha else 'off'}, beta "
        f"{'on' if cfg.use_beta else 'off'}; fold {fold}, epoch {epoch}): {what}. Likely cause: a learning rate too "
        f"large for these features (lr {cfg.lr:g}; try a tenth) or features with extreme values. Nothing of this run "
        "is cached; fix the cause and run again", cfg, fold)


def _finite_state(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_fold(cfg: TrainConfig, features: torch.Tensor, labels: torch.Tensor, index: pd.DataFrame,
               test_rows: np.ndarray, train_rows: np.ndarray, num_classes: int, device: torch.device,
               seed: int, head=None) -> dict:
    """Train one fold from scratch; return the chosen epoch's predictions and attention plus the history."""
    val_rows = inner_val_subject(index, train_rows, seed) if cfg.epoch_selection == "inner_val" else np.array([], int)
    fit_rows = np.setdiff1d(train_rows, val_rows)
    fold = _Fold(cfg, features, labels, num_classes, device, seed, fit_rows, head)
    gt = labels[test_rows].numpy()
    history, per_epoch = [], []
    for epoch in range(cfg.epochs):
        lr = fold.optimizer.param_groups[0]["lr"]
        loss, acc = fold.train_epoch(fit_rows)
        if not np.isfinite(loss) or not _finite_state(fold.model):
            name = f"{index['dataset'].iloc[test_rows[0]]}/{index['subject'].iloc[test_rows[0]]}"
            raise diverged(cfg, name, epoch, f"the training loss is {loss:.4g}" if not np.isfinite(loss)
                           else "a parameter became non-finite")
        pred, alpha, beta = fold.predict(test_rows)
        per_epoch.append((pred, alpha, beta))
        row = {"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "test_acc": float((pred == gt).mean())}
        if len(val_rows):
            row["val_uf1"] = uf1(labels[val_rows].numpy(), fold.predict(val_rows)[0])
        history.append(row)
        if stops(cfg.epoch_selection, row["test_acc"]):
            break
    chosen, best_test, _ = choose_epoch(history, cfg.epoch_selection)
    pred, alpha, beta = per_epoch[chosen]
    return {"rows": test_rows, "pred": pred, "alpha": alpha, "beta": beta, "epoch": chosen,
            "pred_last": per_epoch[-1][0], "pred_best_test": per_epoch[best_test][0],
            "history": history, "val_subject_rows": val_rows}


@dataclass(frozen=True)
class Keyed:
    """Features in memory (e.g. pooled [N, F, K, 512]) with the key of what made them and their factor values."""

    features: torch.Tensor
    key: str
    factors: list[float] | None = None
    fix: str = "check the features passed in"  # what to do when they turn out corrupt


def repair_advice(features) -> str:
    """What to do when these features hold NaN or inf."""
    if isinstance(features, FeatureCache):
        return (f"the feature cache is corrupt: delete it (rm -r {features.path}) and build it again "
                "(amanlib.features.build_feature_cache; notebook 03_feature_extraction)")
    return features.fix if isinstance(features, Keyed) else "check the features passed in"


def unpack_features(features) -> tuple[torch.Tensor, str, list[float] | None]:
    """(tensor, key, factor values or None) of a FeatureCache, Keyed, tensor or array (keyed by its bytes)."""
    if isinstance(features, FeatureCache):
        return _as_tensor(features.features), features.key, features.factors
    if isinstance(features, Keyed):
        return features.features, features.key, features.factors
    tensor = _as_tensor(features)
    return tensor, tensor_digest(tensor), None


def _layer4_weights(path: str | Path | None, seed: int) -> dict:
    """What layer4 starts from: a checkpoint's layer4 weights (by content) or a random init from `seed`."""
    if not path:
        return {"random_seed": seed}
    if not Path(path).is_file():
        read_state_dict(path, "layer4 checkpoint")  # its error names the file
    stat = os.stat(path)
    return {"digest": _layer4_digest(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)}


@functools.lru_cache(maxsize=16)
def _layer4_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """The digest of a checkpoint's layer4 weights, read once per version of the file (a sweep asks per run)."""
    state = {k: v for k, v in read_state_dict(path, "layer4 checkpoint").items() if k.startswith("layer4.")}
    return tensor_digest(state) if state else file_digest(path)


@torch.inference_mode()
def pool_features(features: torch.Tensor, layer4_from: str | Path | None, device="auto", chunk: int = 64,
                  progress: bool = True, seed: int = 0, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Frozen-layer4 fast path: pre-trained layer4 + average pooling once for all clips -> [N, F, K, 512] float32.
    Without a checkpoint layer4 is random, drawn from `seed`. With `autocast_dtype` (bf16) layer4 computes under
    autocast, as the trunk that made the features did."""
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = AMAN(num_classes=1, in_channels=features.shape[3]).to(device).eval()
    if layer4_from:
        model.load_layer4(layer4_from)
    else:
        log.warning("frozen layer4 with RANDOM weights (seed %d): no init_layer4_from checkpoint was given", seed)
    starts = progress_bar(range(0, len(features), chunk), desc="layer4 (frozen)", disable=not progress, leave=False)
    with autocast(device, autocast_dtype):
        out = [model.pool(features[s:s + chunk].to(device, torch.float32)).float().cpu() for s in starts]
    return torch.cat(out)


def trunk_dtype(features) -> torch.dtype | None:
    """The autocast dtype the trunk of a feature cache computed in (None: fp32, or not a feature cache)."""
    recorded = features.inputs["trunk"].get("dtype") if isinstance(features, FeatureCache) else None
    return torch.bfloat16 if recorded == str(torch.bfloat16) else None


def prepare_features(features, cfg: TrainConfig, runs_dir: str | Path, progress: bool = True):
    """With frozen_layer4, the pooled features (layer4 in the trunk's compute dtype, fp32 where bf16 is not native
    here, e.g. a results folder made on another machine), cached under runs_dir/pooled
    by the features' key, the layer4 weights and that dtype; else the features as they are (a tensor or array
    comes back as Keyed, by its bytes)."""
    tensor, key, factors = unpack_features(features)
    if not (cfg.frozen_layer4 and tensor.dim() == 6):  # keyed once: the caller need not hash the bytes again
        return features if isinstance(features, (FeatureCache, Keyed)) else Keyed(tensor, key, factors)
    layer4, dtype = _layer4_weights(cfg.init_layer4_from, cfg.seed), trunk_dtype(features)
    device = resolve_device(cfg.device)
    if dtype is not None and not native_bf16(device):
        log.warning("these features were made in bf16, which %s would emulate (several times slower than fp32): "
                    "frozen layer4 pools them in fp32 here", device)
        dtype = None
    entry = Entry(Path(runs_dir) / "pooled", {"features": key, "layer4": layer4, "dtype": str(dtype)},
                  "pooled features")
    if not entry.done:
        with entry.writing():
            if not entry.done:
                pooled = pool_features(tensor, cfg.init_layer4_from, device, progress=progress, seed=cfg.seed,
                                       autocast_dtype=dtype)
                clips = features.clips if isinstance(features, FeatureCache) else None
                check_finite(pooled, clips, repair_advice(features), "pooled features")
                torch_save_atomic(pooled, entry.path / "pooled.pt")
                entry.finish({"shape": list(pooled.shape)})
    return Keyed(torch.load(entry.path / "pooled.pt", weights_only=True), entry.key, factors, repair_advice(features))


def check_finite(features: torch.Tensor, clips: list[str] | None, fix: str, what: str = "features") -> None:
    """Raise naming the clips whose features hold NaN or inf, and `fix` (checked in chunks: memmaps stay on disk)."""
    bad = []
    for start in range(0, len(features), 64):
        chunk = features[start:start + 64].float()
        bad += (start + torch.nonzero(~torch.isfinite(chunk.flatten(1)).all(1)).flatten()).tolist()
    if bad:
        names = [clips[i] if clips is not None else f"row {i}" for i in bad[:5]]
        raise ValueError(f"{what} of {len(bad)} clip(s) hold NaN or inf, e.g. {names}: {fix}")


def clip_names(index: pd.DataFrame) -> list[str]:
    """'dataset/subject/clip' per row."""
    return index[["dataset", "subject", "clip"]].astype(str).agg("/".join, axis=1).tolist()


def check_index(index: pd.DataFrame) -> torch.Tensor:
    """The labels of a clip table fit for LOSO, or an error naming what is wrong."""
    missing = [c for c in INDEX_COLUMNS if c not in index]
    if missing:
        raise ValueError(f"clip index lacks columns {missing} (has {list(index.columns)})")
    unlabelled = index.loc[index["label"].isna(), "clip"].tolist()
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} clips have no label (select them with a label protocol first): "
                         f"{unlabelled[:5]}")
    if (index["dataset"].astype(str) + "/" + index["subject"].astype(str)).nunique() < 2:
        raise ValueError("leave-one-subject-out needs clips of at least 2 subjects")
    labels = torch.tensor(np.ascontiguousarray(index["label"].to_numpy(dtype=np.int64)))
    if labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    return labels


ENGINE = 3
"""The version of the training arithmetic, part of every run's key: 2 made the attention means finite when every
sigmoid underflows (model.attention_weights) and stopped dividing constant channels by ~0 (standardisation); 3 is
one engine, the head's Linear layers applied before its attention means (model.attend) in run_loso and run_sweep."""


def run_inputs(features_key: str, index: pd.DataFrame, cfg: TrainConfig, head=None) -> dict:
    """What decides a run's numbers: the features, the clip table's rows in order, the settings, the head (head_key)
    and the engine."""
    record = dataclasses.asdict(cfg)
    for name in ("device", "num_workers"):  # where it runs, not what it computes
        record.pop(name)
    record["precision"] = str(training_dtype(cfg) or torch.float32)  # as resolved on this machine
    record["init_layer4_from"] = _layer4_weights(cfg.init_layer4_from, cfg.seed) if cfg.init_layer4_from else None
    rows = index[list(INDEX_COLUMNS)].astype(str).agg("/".join, axis=1).tolist()
    return {"features": features_key, "index": rows, "config": record, "head": head_key(head), "engine": ENGINE}


def run_loso(features, index: pd.DataFrame, *, cfg: TrainConfig | None = None,
             runs_dir: str | Path = "results/work/runs", progress: bool = True, bar=None,
             executor="local", head=None) -> LOSOResult:
    """Leave-one-subject-out over `index` (columns dataset, subject, clip, label) with features [N, F, K, ...]
    (a FeatureCache, Keyed features, or a tensor/array).

    The run goes into runs_dir/<key> (key: features, clip rows in order, settings), written under a lock:
    folds/<fold>.pt as each finishes, then predictions.csv, attention.npz, history.csv, scores.csv,
    config.json and megc_log.txt. A re-run skips finished folds. `bar`, an outer progress bar, is advanced
    once per fold instead of showing a bar of its own. `executor` ('local', 'ray' or an amanlib.executors
    Executor) runs the folds; this process writes every result, so either resumes the other's run. `head`: on pooled
    features (frozen_layer4) a callable head(num_classes, n_frames, n_factors) -> nn.Module mapping [B, F, K, 512] to
    (logits, alpha, beta), trained in place of AMAN's (model.AMANHead; None).
    """
    cfg = cfg or TrainConfig()
    index = index.reset_index(drop=True)
    labels = check_index(index)
    features = prepare_features(features, cfg, runs_dir, progress)
    tensor, key, factors = unpack_features(features)
    if len(tensor) != len(index):
        raise ValueError(f"features hold {len(tensor)} clips but the index has {len(index)} rows")
    check_head(head, tensor)
    slots = list(cfg.factor_slots) if cfg.factor_slots is not None else list(range(tensor.shape[2]))
    if max(slots) >= tensor.shape[2] or min(slots) < 0:
        raise ValueError(f"factor_slots {slots} do not exist in features with {tensor.shape[2]} factors")
    folds = loso_folds(index)
    entry = Entry(runs_dir, run_inputs(key, index, cfg, head), "LOSO run")
    own = bar is None
    bar = progress_bar(total=len(folds), desc="LOSO folds", disable=not progress) if own else bar
    try:
        if not entry.done:
            with entry.writing(), as_executor(executor) as ex:
                if not entry.done:
                    _train_folds(entry, cfg, tensor, labels, index, folds, factors, slots, bar,
                                 repair_advice(features), ex, head)
        else:
            bar.update(len(folds))
    finally:
        if own:
            bar.close()
    return LOSOResult.load(entry.path)


def fold_seed(cfg: TrainConfig, fold: int) -> int:
    """The seed fold number `fold` trains with (its head, shuffles and inner validation subject)."""
    return cfg.seed * 100_003 + fold


def check_head(head, tensor: torch.Tensor) -> None:
    """A custom head replaces AMAN's on pooled features only (the frozen-layer4 path)."""
    if head is not None and tensor.dim() != 4:
        raise ValueError("a custom head trains on pooled features [N, F, K, 512]: set frozen_layer4=True")


def _fold_task(fold: tuple, cfg, tensor, labels, index, num_classes, head=None) -> dict:
    """One fold, wherever it runs: (position, test rows, training rows) -> train_fold's result."""
    i, test_rows, train_rows = fold[0], np.array(fold[1]), np.array(fold[2])  # writable copies (Ray's are not)
    device = resolve_device(cfg.device)
    return train_fold(cfg, place_features(tensor, device), labels, index, test_rows, train_rows, num_classes,
                      device, seed=fold_seed(cfg, i), head=head)


def _train_folds(entry, cfg, tensor, labels, index, folds, factors, slots, bar, fix: str, ex, head=None) -> None:
    check_finite(tensor, clip_names(index), fix)
    num_classes = cfg.num_classes or int(labels.max()) + 1
    if cfg.num_workers:
        torch.set_num_threads(cfg.num_workers)
    if ex.name == "local":
        tensor = place_features(tensor, resolve_device(cfg.device))  # once for all folds
    paths = [entry.path / "folds" / f"{name.replace('/', '_')}.pt" for name, _, _ in folds]
    results = {i: torch.load(p, weights_only=False) for i, p in enumerate(paths) if p.exists()}
    todo = [(i, test, train) for i, (_, test, train) in enumerate(folds) if i not in results]
    bar.update(len(results))
    shared = {"cfg": cfg, "tensor": tensor, "labels": labels, "index": index, "num_classes": num_classes,
              "head": head}
    for position, result in ex.map(_fold_task, todo, shared):
        i = todo[position][0]
        torch_save_atomic(result, paths[i])
        results[i] = result
        rows = np.concatenate([r["rows"] for r in results.values()])
        gt, pred = labels[rows].numpy(), np.concatenate([r["pred"] for r in results.values()])
        bar.update()
        bar.set_postfix(uf1=f"{uf1(gt, pred):.3f}", uar=f"{uar(gt, pred):.3f}")
    done = [(name, results[i]) for i, (name, _, _) in enumerate(folds)]  # fold order, whatever ran them
    finish_run(entry, cfg, done, index, labels, factors, slots, num_classes)


def finish_run(entry, cfg, done, index, labels, factors, slots, num_classes) -> None:
    """Collect the folds' results, write the run's files, then its stamp."""
    config = {**entry.inputs["config"], "key": entry.key, "features_key": entry.inputs["features"],
              "factors": [factors[k] for k in slots] if factors else None, "num_classes": num_classes}
    result = _collect(done, index, labels, cfg, entry.path, config)
    result.save()
    entry.finish(result.scores.loc["full"].to_dict())


def _collect(done, index, labels, cfg, out_dir, config) -> LOSOResult:
    frames = []
    for name, r in done:
        part = index.loc[r["rows"], ["dataset", "subject", "clip"]].copy()
        part["gt"] = labels.numpy()[r["rows"]]
        part["pred"], part["fold"], part["epoch"] = r["pred"], name, r["epoch"]
        part["pred_last"], part["pred_best_test"] = r["pred_last"], r["pred_best_test"]
        part["alpha"], part["beta"] = list(r["alpha"]), list(r["beta"])
        frames.append(part)
    predictions = pd.concat(frames)
    predictions["epoch_selection"] = cfg.epoch_selection
    history = pd.DataFrame([{"fold": name, **h} for name, r in done for h in r["history"]])
    table = megc_scores(predictions)
    table["epoch_selection"] = cfg.epoch_selection + (" (optimistic)" if cfg.optimistic else "")
    return LOSOResult(predictions, history, table, out_dir, config)


@dataclass(frozen=True)
class Variant:
    """One ablation: which factor slots are used and which attention is on."""

    name: str
    factor_slots: tuple[int, ...]
    use_alpha: bool = True
    use_beta: bool = True

    def __post_init__(self):
        if not self.factor_slots:
            raise ValueError(f"variant {self.name!r} uses no factor slot: AMAN needs at least one factor")


VARIANT_NAMES = ("AMAN", "magnification attention only", "frame attention only", "no magnification")
SINGLE_FACTOR = re.compile(r"single factor [0-9]+(\.[0-9]+)?")  # "single factor F", F as ablation_variants writes it


def select_variants(factors, names=None) -> list[Variant]:
    """The variants of ablation_variants(factors) named in `names`, in that order (None: all of them); a name that is
    not among them is an error listing those that are."""
    variants = ablation_variants(factors)
    if names is None:
        return variants
    known = {v.name: v for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"variants {unknown} are not variants of these features (factors "
                         f"{[float(f) for f in factors]}); the variants are {list(known)}")
    return [known[n] for n in names]


def ablation_variants(factors) -> list[Variant]:
    """The paper's ablations over the factor values of the features (factor 1 = the unmagnified frame)."""
    factors = [float(f) for f in factors]
    magnified = tuple(magnified_slots(factors))
    if not magnified:
        raise ValueError(f"factors {factors} hold no magnified factor (1 is the unmagnified frame): AMAN would be "
                         "left without factors; extract features with factors > 1")
    aman, alpha_only, beta_only, unmagnified = VARIANT_NAMES
    variants = [Variant(aman, magnified), Variant(alpha_only, magnified, use_beta=False),
                Variant(beta_only, magnified, use_alpha=False)]
    if 1.0 in factors:
        variants.append(Variant(unmagnified, (factors.index(1.0),)))
    variants += [Variant(f"single factor {factors[k]:g}", (k,)) for k in magnified]
    return variants


def training_dtype(cfg: TrainConfig, device=None, **machine) -> torch.dtype | None:
    """The autocast dtype of training (None: fp32): cfg.precision resolved on the device (runtime.resolve_precision;
    `machine` passes its cpuinfo, env and capability) for the full model; never bf16 for the frozen-layer4 head, a
    few thousand weights that bf16 would only round."""
    if cfg.frozen_layer4:
        return None
    return resolve_precision(cfg.precision, resolve_device(device if device is not None else cfg.device), **machine)


def model_name(cfg: TrainConfig) -> str:
    return "AMAN, frozen layer4" if cfg.frozen_layer4 else "AMAN"


def describe(cfg: TrainConfig, index: pd.DataFrame, cache: FeatureCache) -> str:
    """One Markdown line naming what is trained on what, and under which fidelity preset."""
    from .fidelity import name_of
    optimistic = " (OPTIMISTIC)" if cfg.optimistic else ""
    random_frozen = ", **layer4 frozen at random weights**" if cfg.frozen_layer4 and cfg.layer4_init == "random" else ""
    return (f"**{model_name(cfg)}**, epoch selection `{cfg.epoch_selection}`{optimistic}, {len(index)} clips, "
            f"{len(loso_folds(index))} folds, features {tuple(cache.features.shape)} (factors {cache.factors}), "
            f"backbone: {cache.backbone['name']}, fidelity "
            f"{name_of(cache.inputs['trunk']['bn'], cfg.layer4_bn, cfg.layer4_init)}{random_frozen}, "
            f"device {resolve_device(cfg.device)}")
