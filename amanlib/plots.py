"""Figures that more than one place draws (a notebook and a test, or a bench script), the helpers the notebooks' own
figures share, and `save`, which writes a figure as a PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from .oracle import is_control

sns.set_theme(style="whitegrid", context="notebook")


def image(t: torch.Tensor) -> np.ndarray:
    """A [3, H, W] frame in [0, 1] as an image matplotlib shows (H, W, 3), from any device."""
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def difference(a: torch.Tensor, b: torch.Tensor, gain: float) -> np.ndarray:
    """|a - b| averaged over colour and amplified by `gain`, as a grey image: where two frames differ."""
    return image((a.detach().cpu().float() - b.detach().cpu().float()).abs().mean(0, keepdim=True).expand(3, -1, -1)
                 * gain)


def labelled(variant: str) -> str:
    """A variant's axis label: the oracle is marked as the positive control it is."""
    return f"{variant}\n[positive control]" if is_control(variant) else variant


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG readable on its own (title and labels included), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def learning_curves(history: pd.DataFrame, title: str = "LOSO learning curves (mean over folds)"):
    """Training loss and accuracy, held-out accuracy (and inner-validation UF1 when present) per epoch."""
    cols = [c for c in ("train_loss", "train_acc", "test_acc", "val_uf1") if c in history]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.3), squeeze=False)
    for ax, col in zip(axes[0], cols):
        sns.lineplot(data=history, x="epoch", y=col, errorbar=("ci", 95), seed=0, ax=ax)
        ax.set_title(col.replace("_", " "))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_by_factor(alpha: np.ndarray, factors, groups: pd.Series, title: str):
    """Mean magnification attention alpha per factor (averaged over frames), one line per group."""
    per_clip = alpha.mean(1)  # N, K
    df = pd.DataFrame(per_clip, columns=[f"{f:g}" for f in factors]).assign(group=groups.to_numpy())
    long = df.melt(id_vars="group", var_name="factor", value_name="alpha")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.pointplot(data=long, x="factor", y="alpha", hue="group", ax=ax, dodge=0.3, errorbar=("ci", 95), seed=0)
    ax.set(title=title, xlabel="magnification factor", ylabel="alpha (mean over frames)")
    fig.tight_layout()
    return fig


def mechanism_scatter(truth_px: np.ndarray, preferred: np.ndarray, result: dict, title: str):
    """Each clip's preferred factor (alpha-weighted) against its true peak displacement, rho in the title."""
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(truth_px, preferred, s=12, alpha=0.7)
    said = (f"Spearman rho undefined: {result['undefined']}" if result.get("undefined") else
            f"Spearman rho {result['spearman_r']:.2f} (95% CI {result['ci'][0]:.2f} to {result['ci'][1]:.2f}, "
            f"p {result['p_value']:.3g}, n {result['n']})")
    ax.set(xlabel="true peak displacement (px)", ylabel="preferred factor (alpha-weighted)", title=f"{title}\n{said}")
    fig.tight_layout()
    return fig


def accuracy_by_motion(table: pd.DataFrame, title: str):
    """Accuracy per variant (one line each, dodged) over the bins of true motion, with 95% CI error bars
    (table: stats.accuracy_by_motion or report.by_motion_frame); the oracle dashed, AMAN thick."""
    bins = list(dict.fromkeys(table["bin"]))
    variants = list(dict.fromkeys(table["variant"]))
    ranges = table.drop_duplicates("bin").set_index("bin")
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(bins) + 0.25 * len(variants)), 4.2))
    width = 0.7 / max(1, len(variants) - 1)
    for j, variant in enumerate(variants):
        part = table[table["variant"] == variant].set_index("bin").reindex(bins)
        x = np.arange(len(bins)) + (j - (len(variants) - 1) / 2) * width
        err = np.stack([part["accuracy"] - part["accuracy_ci_lo"], part["accuracy_ci_hi"] - part["accuracy"]])
        ax.errorbar(x, part["accuracy"], yerr=err, marker="o", ms=4, capsize=2, ls="--" if is_control(variant) else "-",
                    lw=2.5 if variant == "AMAN" else 1, label=labelled(variant).replace("\n", " "))
    ax.set_xticks(np.arange(len(bins)), [f"{b}\n{ranges.loc[b, 'px_lo']:.2f}-{ranges.loc[b, 'px_hi']:.2f} px\n"
                                         f"({ranges.loc[b, 'n_clips']} clips)" for b in bins])
    ax.set(title=title, xlabel="true peak displacement", ylabel="accuracy (mean over seeds, 95% CI)", ylim=(0, 1))
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def oracle_vs_preferred(per_clip: pd.DataFrame, target_px: float, title: str):
    """Per clip against its true peak displacement: the factor the oracle chooses (nearest target_px / peak_px
    among the factors) and AMAN's alpha-weighted preferred factor (per_clip: stats.oracle_vs_preferred)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    peak = per_clip["peak_px"].to_numpy(float)
    ax.scatter(peak, per_clip["preferred_factor"], s=12, alpha=0.7, label="AMAN: preferred factor (alpha-weighted)")
    ax.scatter(peak, per_clip["oracle_factor"], s=16, marker="x", color="C3",
               label=f"oracle (positive control): factor nearest {target_px:g} px / peak")
    grid = np.linspace(max(peak.min(), 1e-3), peak.max(), 200)
    ax.plot(grid, target_px / grid, color="grey", lw=1, ls=":", label=f"{target_px:g} px / peak")
    factors = per_clip["oracle_factor"]
    ax.set_ylim(0, 1.15 * max(factors.max(), per_clip["preferred_factor"].max()))
    ax.set(xlabel="true peak displacement (px)", ylabel="magnification factor", title=title)
    if peak.min() > 0 and peak.max() > 10 * peak.min():  # motions over decades: a log axis
        ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def magnifiers_against_truth(by_factor: pd.DataFrame, title: str):
    """PSNR over the face and magnified displacement / the truth's per factor and magnifier, from
    magnify.truth_scores.summary(table, 'factor')."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (score, label) in zip(axes, (("psnr_face_db", "PSNR over the face (dB)"),
                                         ("displacement_vs_truth", "magnified displacement / the truth's"))):
        for method, row in by_factor[score].iterrows():
            if method != "truth":
                ax.plot(row.index.astype(float), row.to_numpy(float), marker="o", label=method)
        ax.set(xlabel="factor", ylabel=label)
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
