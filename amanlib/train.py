"""Leave-one-subject-out training of AMAN on cached features: honest by default, the authors' protocol on request.

Features sit in one tensor [N, F, K, 256, 14, 14] (on the GPU when they fit); batches are index slices.
Every finished fold is written atomically, so a re-run skips it and ends with the same numbers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .metrics import megc_scores, scores, uar, uf1, write_megc_log
from .model import AMAN
from .runtime import atomic_write, autocast, progress_bar, resolve_device, torch_save_atomic

log = logging.getLogger(__name__)

PROTOCOLS = ("fixed", "inner_val", "paper")
OPTIMISTIC = "OPTIMISTIC: epoch chosen on the held-out subject's own accuracy (the authors' protocol)"
INDEX_COLUMNS = ("dataset", "subject", "clip", "label")


@dataclass
class TrainConfig:
    """Defaults are the authors' (main/train.py): RMSprop 1e-3, StepLR(30, 0.2), 50 epochs, batch 4."""

    lr: float = 1e-3
    eps: float = 1e-8
    weight_decay: float = 1e-4
    step_size: int = 30
    gamma: float = 0.2
    epochs: int = 50
    batch_size: int = 4
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA (bf16 where supported, else fp16), off on CPU
    channels_last: bool = True
    num_workers: int = 0  # CPU threads for torch (0 keeps torch's default); batches need no loader workers
    protocol: str = "fixed"  # fixed: last epoch | inner_val: one training subject picks the epoch | paper
    frozen_layer4: bool = False  # CPU fast path: layer4 pre-trained and frozen, pooled features computed once
    init_layer4_from: str | None = None  # ResNet-18 checkpoint (FER+ or the kit's own) for layer4
    factors: tuple[int, ...] | None = None  # indices along K to use (None: all)
    use_alpha: bool = True
    use_beta: bool = True
    num_classes: int | None = None  # None: from the labels

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.factors is not None:
            self.factors = tuple(int(k) for k in self.factors)

    @property
    def optimistic(self) -> bool:
        return self.protocol == "paper"


@dataclass
class LOSOResult:
    predictions: pd.DataFrame  # dataset, subject, clip, gt, pred, fold, epoch, pred_last, pred_best_test, alpha, beta
    history: pd.DataFrame  # fold, epoch, lr, train_loss, train_acc, test_acc, val_uf1
    scores: pd.DataFrame  # megc_scores of pred
    out_dir: Path
    config: TrainConfig = field(repr=False, default=None)


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


def _place(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the whole feature tensor to the device when it fits in 80% of free memory, else keep it on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if features.numel() * features.element_size() < 0.8 * free:
            return features.to(device)
        log.warning("features (%.1f GB) do not fit on %s; batches are copied from pinned host memory",
                    features.numel() * features.element_size() / 1e9, device)
        return features.pin_memory()
    return features


class _Fold:
    """One fold's training: a fresh model, RMSprop + StepLR, predictions on the test rows after every epoch."""

    def __init__(self, cfg: TrainConfig, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: torch.device, seed: int, fit_rows: np.ndarray | None = None):
        self.cfg, self.features, self.labels, self.device = cfg, features, labels, device
        self.pooled = features.dim() == 4
        self.shift, self.scale = 0.0, 1.0
        if self.pooled:  # frozen layer4: standardise each of the 512 channels with this fold's training clips
            fit = features[torch.as_tensor(fit_rows if fit_rows is not None else np.arange(len(features)))]
            fit = fit.to(device, torch.float32).flatten(0, 2)  # n*F*K, 512
            self.shift, self.scale = fit.mean(0), fit.std(0).clamp(min=1e-6)
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.model = AMAN(num_classes, in_channels=256 if self.pooled else features.shape[3],
                          use_alpha=cfg.use_alpha, use_beta=cfg.use_beta,
                          channels_last=cfg.channels_last and device.type != "cpu").to(device)
        if self.pooled:  # layer4 already applied (frozen): only attention and classifier train
            self.model.layer4.requires_grad_(False)
        elif cfg.init_layer4_from:
            self.model.load_layer4(cfg.init_layer4_from)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        self.amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
        fp16 = self.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.criterion = nn.CrossEntropyLoss()

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.features[rows.to(self.features.device)]
        if self.cfg.factors is not None:
            x = x[:, :, list(self.cfg.factors)]
        return (x.to(self.device, torch.float32, non_blocking=True) - self.shift) / self.scale

    def logits(self, x: torch.Tensor):
        with autocast(self.device, self.amp):
            if self.pooled:
                return self.model.attend(x)
            return self.model(x, return_attention=True)

    def train_epoch(self, rows: np.ndarray) -> tuple[float, float]:
        self.model.train()
        order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=self.generator)]
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            y = self.labels[idx].to(self.device)
            logits = self.logits(self.batch(idx))[0].float()
            loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        self.scheduler.step()
        return total_loss / len(rows), correct / len(rows)

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


def _inner_val_subject(index: pd.DataFrame, train_rows: np.ndarray, seed: int) -> np.ndarray:
    """Rows of one training subject (drawn with the fold's seed) held out to choose the epoch."""
    key = (index["dataset"].astype(str) + "/" + index["subject"].astype(str)).to_numpy()
    subjects = sorted(set(key[train_rows]))
    chosen = subjects[np.random.default_rng(seed).integers(len(subjects))]
    return train_rows[key[train_rows] == chosen]


def train_fold(cfg: TrainConfig, features: torch.Tensor, labels: torch.Tensor, index: pd.DataFrame,
               test_rows: np.ndarray, train_rows: np.ndarray, num_classes: int, device: torch.device,
               seed: int, progress: bool = True) -> dict:
    """Train one fold from scratch; return the chosen epoch's predictions and attention plus the history."""
    val_rows = _inner_val_subject(index, train_rows, seed) if cfg.protocol == "inner_val" else np.array([], int)
    fit_rows = np.setdiff1d(train_rows, val_rows)
    fold = _Fold(cfg, features, labels, num_classes, device, seed, fit_rows)
    gt = labels[test_rows].numpy()
    history, per_epoch = [], []
    best_val, best_epoch = -1.0, None
    for epoch in progress_bar(range(cfg.epochs), desc="epochs", leave=False, disable=not progress):
        lr = fold.optimizer.param_groups[0]["lr"]
        loss, acc = fold.train_epoch(fit_rows)
        pred, alpha, beta = fold.predict(test_rows)
        per_epoch.append((pred, alpha, beta))
        row = {"epoch": epoch, "lr": lr, "train_loss": loss, "train_acc": acc, "test_acc": float((pred == gt).mean())}
        if len(val_rows):
            row["val_uf1"] = uf1(labels[val_rows].numpy(), fold.predict(val_rows)[0])
            if row["val_uf1"] > best_val:
                best_val, best_epoch = row["val_uf1"], epoch
        history.append(row)
    test_acc = [h["test_acc"] for h in history]
    best_test = int(np.argmax(test_acc))  # first epoch reaching the best held-out accuracy, as the authors keep it
    chosen = {"fixed": cfg.epochs - 1, "paper": best_test, "inner_val": best_epoch}[cfg.protocol]
    pred, alpha, beta = per_epoch[chosen]
    return {"rows": test_rows, "pred": pred, "alpha": alpha, "beta": beta, "epoch": chosen,
            "pred_last": per_epoch[-1][0], "pred_best_test": per_epoch[best_test][0],
            "history": history, "val_subject_rows": val_rows}


@torch.inference_mode()
def pool_features(features: torch.Tensor, layer4_from: str | Path | None, device="auto", chunk: int = 64,
                  progress: bool = True) -> torch.Tensor:
    """Frozen-layer4 fast path: pre-trained layer4 + average pooling once for all clips -> [N, F, K, 512]."""
    device = resolve_device(device)
    model = AMAN(num_classes=1, in_channels=features.shape[3]).to(device).eval()
    if layer4_from:
        model.load_layer4(layer4_from)
    else:
        log.warning("frozen layer4 with RANDOM weights: no init_layer4_from checkpoint was given")
    starts = progress_bar(range(0, len(features), chunk), desc="layer4 (frozen)", disable=not progress, leave=False)
    out = [model.pool(features[s:s + chunk].to(device, torch.float32)).cpu() for s in starts]
    return torch.cat(out)


def _config_record(cfg: TrainConfig, index: pd.DataFrame, shape) -> dict:
    record = dataclasses.asdict(cfg)
    record.pop("device")
    record.pop("num_workers")
    record["features_shape"] = list(shape)
    record["clips"] = int(len(index))
    return record


def _check_resume(out_dir: Path, record: dict) -> None:
    """A re-run in the same folder must use the same settings, or finished folds would be mixed with new ones."""
    path = out_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != (list(v) if isinstance(v, tuple) else v)}
        if diff:
            raise ValueError(f"{out_dir} holds folds trained with other settings {diff}; "
                             f"use another out_dir or delete {out_dir}/folds to start over")
    else:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))


def run_loso(features, index: pd.DataFrame, cfg: TrainConfig | None = None, out_dir: str | Path = "results/work/loso",
             progress: bool = True, leave: bool = True) -> LOSOResult:
    """Leave-one-subject-out over `index` (columns dataset, subject, clip, label) with features [N, F, K, ...].

    Writes folds/<fold>.pt as each finishes, then predictions.csv, attention.npz, history.csv, scores.csv
    and megc_log.txt into out_dir. A re-run skips finished folds.
    """
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    index = index.reset_index(drop=True)
    features = _as_tensor(features)
    if len(features) != len(index):
        raise ValueError(f"features hold {len(features)} clips but the index has {len(index)} rows")
    folds = loso_folds(index)
    unlabelled = index.loc[index["label"].isna(), "clip"].tolist()
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} clips have no label (select them with a protocol first): {unlabelled[:5]}")
    labels = torch.tensor(index["label"].to_numpy(dtype=np.int64))
    num_classes = cfg.num_classes or int(labels.max()) + 1
    _check_resume(out_dir, _config_record(cfg, index, features.shape))
    if cfg.num_workers:
        torch.set_num_threads(cfg.num_workers)
    device = resolve_device(cfg.device)
    features = _place(prepare_features(features, cfg, out_dir, progress), device)

    done = []
    bar = progress_bar(folds, desc="LOSO folds", disable=not progress, leave=leave)
    for i, (name, test_rows, train_rows) in enumerate(bar):
        path = out_dir / "folds" / f"{name.replace('/', '_')}.pt"
        if path.exists():
            result = torch.load(path, weights_only=False)
        else:
            result = train_fold(cfg, features, labels, index, test_rows, train_rows, num_classes, device,
                                seed=cfg.seed * 100_003 + i, progress=progress)
            torch_save_atomic(result, path)
        done.append((name, result))
        rows = np.concatenate([r["rows"] for _, r in done])
        gt, pred = labels[rows].numpy(), np.concatenate([r["pred"] for _, r in done])
        bar.set_postfix(uf1=f"{uf1(gt, pred):.3f}", uar=f"{uar(gt, pred):.3f}")
    return _collect(done, index, labels, cfg, out_dir)


def prepare_features(features, cfg: TrainConfig, cache_dir: str | Path, progress: bool = True) -> torch.Tensor:
    """With frozen_layer4, the pooled features (computed once, cached in cache_dir/pooled.pt); else as they are."""
    features = _as_tensor(features)
    if not (cfg.frozen_layer4 and features.dim() == 6):
        return features
    path = Path(cache_dir) / "pooled.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    pooled = pool_features(features, cfg.init_layer4_from, resolve_device(cfg.device), progress=progress)
    torch_save_atomic(pooled, path)
    return pooled


def _collect(done, index, labels, cfg, out_dir) -> LOSOResult:
    frames = []
    for name, r in done:
        part = index.loc[r["rows"], ["dataset", "subject", "clip"]].copy()
        part["gt"] = labels[r["rows"]].numpy()
        part["pred"], part["fold"], part["epoch"] = r["pred"], name, r["epoch"]
        part["pred_last"], part["pred_best_test"] = r["pred_last"], r["pred_best_test"]
        part["alpha"], part["beta"] = list(r["alpha"]), list(r["beta"])
        frames.append(part)
    predictions = pd.concat(frames)
    predictions["protocol"] = cfg.protocol
    history = pd.DataFrame([{"fold": name, **h} for name, r in done for h in r["history"]])
    table = megc_scores(predictions)
    table["protocol"] = cfg.protocol + (" (optimistic)" if cfg.optimistic else "")
    scalar = predictions.drop(columns=["alpha", "beta"])
    atomic_write(out_dir / "predictions.csv", lambda tmp: scalar.to_csv(tmp, index=False))
    atomic_write(out_dir / "history.csv", lambda tmp: history.to_csv(tmp, index=False))
    atomic_write(out_dir / "scores.csv", lambda tmp: table.to_csv(tmp))
    atomic_write(out_dir / "attention.npz", lambda tmp: np.savez(
        tmp, clip=predictions["clip"].to_numpy(str),
        alpha=np.stack(predictions["alpha"].to_list()), beta=np.stack(predictions["beta"].to_list())))
    write_megc_log(predictions, out_dir / "megc_log.txt", comment=OPTIMISTIC if cfg.optimistic else None)
    return LOSOResult(predictions, history, table, out_dir, cfg)


@dataclass(frozen=True)
class Variant:
    """One ablation: which factor slots are used and which attention is on."""

    name: str
    factors: tuple[int, ...]
    use_alpha: bool = True
    use_beta: bool = True


def ablation_variants(factors) -> list[Variant]:
    """The paper's ablations over the factor list of the features (factor 1 = the unmagnified frame)."""
    factors = [float(f) for f in factors]
    magnified = tuple(k for k, f in enumerate(factors) if f != 1.0)
    variants = [Variant("AMAN", magnified),
                Variant("magnification attention only", magnified, use_beta=False),
                Variant("frame attention only", magnified, use_alpha=False)]
    if 1.0 in factors:
        variants.append(Variant("no magnification", (factors.index(1.0),)))
    variants += [Variant(f"single factor {factors[k]:g}", (k,)) for k in magnified]
    return variants


def run_ablations(features, index: pd.DataFrame, factors, cfg: TrainConfig | None = None,
                  out_dir: str | Path = "results/work/ablations", variants: list[Variant] | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Run every variant with the same features, folds and settings; one table of UF1/UAR/accuracy per subset."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    features = prepare_features(features, cfg, out_dir, progress)  # pooled once for all variants
    tables = []
    bar = progress_bar(variants or ablation_variants(factors), desc="ablations", disable=not progress)
    for v in bar:
        vcfg = dataclasses.replace(cfg, factors=v.factors, use_alpha=v.use_alpha, use_beta=v.use_beta)
        slug = "".join(c if c.isalnum() else "_" for c in v.name.lower())
        res = run_loso(features, index, vcfg, out_dir / slug, progress=progress, leave=False)
        bar.set_postfix(last=v.name, uf1=f"{res.scores.loc['full', 'uf1']:.3f}")
        tables.append(res.scores.drop(columns="protocol").rename_axis("subset").reset_index().assign(variant=v.name))
    table = pd.concat(tables, ignore_index=True)[["variant", "subset", "uf1", "uar", "accuracy", "n"]]
    table["model"] = "AMAN, frozen layer4" if cfg.frozen_layer4 else "AMAN"
    table["protocol"] = cfg.protocol + (" (optimistic)" if cfg.optimistic else "")
    atomic_write(out_dir / "ablations.csv", lambda tmp: table.to_csv(tmp, index=False))
    return table


def summary(result: LOSOResult) -> dict:
    """Top-level numbers for metrics.json."""
    p = result.predictions
    return {"protocol": result.config.protocol, "optimistic": result.config.optimistic,
            "frozen_layer4": result.config.frozen_layer4, **scores(p["gt"], p["pred"]),
            "paper_protocol_on_same_run": scores(p["gt"], p["pred_best_test"])}
