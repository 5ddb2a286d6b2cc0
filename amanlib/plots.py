"""Figures of the notebooks (seaborn/matplotlib); each returns a Figure, `save` writes it as a PNG."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from sklearn.metrics import confusion_matrix

from .oracle import is_control

sns.set_theme(style="whitegrid", context="notebook")


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG readable on its own (title and labels included), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _image(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def dataset_overview(index: pd.DataFrame, title: str = ""):
    """Clips per class and dataset, and clips per subject."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    sns.countplot(data=index, x="label_name", hue="dataset", ax=axes[0])
    axes[0].set(title="clips per class", xlabel="", ylabel="clips")
    per_subject = index.groupby(["dataset", "subject", "label_name"]).size().rename("clips").reset_index()
    per_subject["subject"] = per_subject["dataset"] + "/" + per_subject["subject"]
    sns.barplot(data=per_subject, x="subject", y="clips", hue="label_name", ax=axes[1])
    axes[1].set(title="clips per subject and class", xlabel="")
    axes[1].tick_params(axis="x", rotation=90, labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def clip_strips(clips: list[tuple[str, torch.Tensor]], labels=("onset", "apex", "offset"), diff_gain: float = 10.0):
    """One row per clip: its key frames and |apex - onset| amplified, to see where the action is."""
    fig, axes = plt.subplots(len(clips), len(labels) + 1, figsize=(2.2 * (len(labels) + 1), 2.3 * len(clips)),
                             squeeze=False)
    for row, (name, frames) in zip(axes, clips):
        for ax, frame, label in zip(row, frames, labels):
            ax.imshow(_image(frame))
            ax.set_title(f"{name}\n{label}" if label == labels[0] else label, fontsize=8)
        row[-1].imshow(_image((frames[1] - frames[0]).abs().mean(0, keepdim=True).expand(3, -1, -1) * diff_gain))
        row[-1].set_title(f"|apex - onset| x{diff_gain:g}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def onset_apex_offset(index: pd.DataFrame, n: int = 4):
    """clip_strips of n clips of the table, one of each class first."""
    from .data import clip_frame_paths, load_clip_frames
    shown = index.groupby("label", group_keys=False).head(1)
    shown = pd.concat([shown, index.drop(shown.index)]).head(n)
    strips = []
    for _, row in shown.iterrows():
        paths = clip_frame_paths(row)
        frames = load_clip_frames([paths[0], paths[int(row.apex) - int(row.onset)], paths[-1]])
        strips.append((f"{row['subject']}/{row['clip']} ({row['label_name']})", frames))
    return clip_strips(strips)


def magnified_pair(magnified: torch.Tensor, onset: torch.Tensor, title: str, diff_gain: float = 4.0):
    """One magnified image beside |magnified - onset| x diff_gain."""
    fig, axes = plt.subplots(1, 2, figsize=(6, 3))
    axes[0].imshow(_image(magnified))
    axes[1].imshow(((magnified - onset).abs().mean(0) * diff_gain).clamp(0, 1), cmap="gray")
    axes[0].set_title(title)
    axes[1].set_title(f"|magnified - onset| x{diff_gain:g}")
    for ax in axes:
        ax.axis("off")
    return fig


def feature_energy(features: np.ndarray, factors):
    """Mean |feature| per factor slot relative to the first slot, clip by clip (memmaps stay on disk)."""
    energy = np.mean([np.abs(features[i].astype(np.float32)).mean(axis=(0, 2, 3, 4)) for i in range(len(features))],
                     axis=0)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(factors, energy / energy[0], marker="o")
    ax.set(xlabel="magnification factor", ylabel="mean |feature| / first slot", title="trunk activation vs factor")
    return fig


def per_subject_accuracy(predictions: pd.DataFrame, title: str):
    """Accuracy per held-out subject."""
    p = predictions.assign(correct=predictions["gt"] == predictions["pred"])
    per = p.groupby(["dataset", "subject"]).correct.mean().reset_index()
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(per)), 3.3))
    ax.bar(per.dataset + "/" + per.subject, per.correct)
    ax.set(title=f"accuracy per held-out subject ({title})", ylabel="accuracy", ylim=(0, 1))
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    return fig


def magnification_grid(onset: torch.Tensor, frame: torch.Tensor, outputs: dict[str, torch.Tensor], factors,
                       diff_gain: float = 4.0):
    """For each method (rows, two each): magnified frames per factor, then |magnified - onset| maps."""
    factors = list(factors)
    fig, axes = plt.subplots(2 * len(outputs), len(factors) + 1, figsize=(1.9 * (len(factors) + 1), 3.9 * len(outputs)),
                             squeeze=False)
    for m, (method, out) in enumerate(outputs.items()):
        img_row, diff_row = axes[2 * m], axes[2 * m + 1]
        img_row[0].imshow(_image(frame))
        img_row[0].set_title(f"{method}\nframe", fontsize=8)
        diff_row[0].imshow(_image((frame - onset).abs().mean(0, keepdim=True).expand(3, -1, -1) * diff_gain * 4))
        diff_row[0].set_title(f"|frame - onset| x{diff_gain * 4:g}", fontsize=8)
        for k, f in enumerate(factors):
            img_row[k + 1].imshow(_image(out[k]))
            img_row[k + 1].set_title(f"x{f:g}", fontsize=8)
            diff_row[k + 1].imshow(_image((out[k] - onset).abs().mean(0, keepdim=True).expand(3, -1, -1) * diff_gain))
            diff_row[k + 1].set_title(f"|mag - onset| x{diff_gain:g}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


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


def confusion_matrices(predictions: pd.DataFrame, class_names, pred_col: str = "pred", title: str = ""):
    """Counts and row-normalised confusion matrices, for all clips and for each dataset present."""
    groups = [("all", predictions)] + ([(d, g) for d, g in predictions.groupby("dataset", sort=False)]
                                       if predictions["dataset"].nunique() > 1 else [])
    labels = list(range(len(class_names)))
    fig, axes = plt.subplots(2, len(groups), figsize=(3.8 * len(groups), 7), squeeze=False)
    for j, (name, g) in enumerate(groups):
        cm = confusion_matrix(g["gt"], g[pred_col], labels=labels)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        for ax, data, fmt, sub in ((axes[0, j], cm, "d", "counts"), (axes[1, j], norm, ".2f", "normalised")):
            sns.heatmap(data, annot=True, fmt=fmt, cbar=False, cmap="Blues", ax=ax, square=True,
                        xticklabels=class_names, yticklabels=class_names, vmin=0)
            ax.set(title=f"{name} ({len(g)} clips), {sub}", xlabel="predicted", ylabel="true")
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


def attention_heatmap(alpha: np.ndarray, factors, groups: pd.Series, title: str):
    """Mean alpha per group (rows, e.g. subjects) and factor (columns)."""
    df = pd.DataFrame(alpha.mean(1), columns=[f"{f:g}" for f in factors]).groupby(groups.to_numpy()).mean()
    fig, ax = plt.subplots(figsize=(0.7 * len(factors) + 2, 0.28 * len(df) + 1.5))
    sns.heatmap(df, cmap="viridis", ax=ax, cbar_kws={"label": "alpha"})
    ax.set(title=title, xlabel="magnification factor", ylabel="")
    fig.tight_layout()
    return fig


def beta_over_frames(beta: np.ndarray, groups: pd.Series, title: str = "frame attention beta"):
    """Mean frame attention per frame position (onset side first), one line per group."""
    df = pd.DataFrame(beta, columns=range(1, beta.shape[1] + 1)).assign(group=groups.to_numpy())
    long = df.melt(id_vars="group", var_name="frame", value_name="beta")
    fig, ax = plt.subplots(figsize=(6, 3.3))
    sns.lineplot(data=long, x="frame", y="beta", hue="group", marker="o", seed=0, ax=ax)
    ax.set(title=title, xlabel="selected frame (1 = first after onset, last = apex)")
    fig.tight_layout()
    return fig


def score_bars(table: pd.DataFrame, x: str, title: str, metrics=("uf1", "uar")):
    """Grouped bars of UF1/UAR (or other columns) for the rows of a score table."""
    long = table.melt(id_vars=[x], value_vars=list(metrics), var_name="metric", value_name="score")
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * table[x].nunique() * len(metrics)), 3.8))
    sns.barplot(data=long, x=x, y="score", hue="metric", ax=ax)
    ax.set(title=title, xlabel="", ylim=(0, 1))
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    return fig


def ablation_ci_bars(summary: pd.DataFrame, title: str, metrics=("uf1", "uar")):
    """Mean UF1/UAR per variant over seeds with 95% CI error bars (summary: stats.bootstrap_scores)."""
    variants = list(summary.index)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(variants) * len(metrics)), 3.8))
    width = 0.8 / len(metrics)
    x = np.arange(len(variants))
    for j, metric in enumerate(metrics):
        mean = summary[metric].to_numpy()
        err = np.stack([mean - summary[f"{metric}_ci_lo"].to_numpy(), summary[f"{metric}_ci_hi"].to_numpy() - mean])
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=metric)
    ax.set_xticks(x, [_labelled(v) for v in variants], rotation=30, ha="right")
    ax.set(title=title, ylim=(0, 1), ylabel="score (mean over seeds, 95% CI)")
    ax.legend()
    fig.tight_layout()
    return fig


def _labelled(variant: str) -> str:
    """A variant's axis label: the oracle is marked as the positive control it is."""
    return f"{variant}\n[positive control]" if is_control(variant) else variant


def comparisons_forest(comparisons: pd.DataFrame, title: str):
    """Forest plot: a minus b with its 95% CI per variant and metric, and the zero line."""
    metrics = list(dict.fromkeys(comparisons["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.35 * comparisons["b"].nunique() + 1.6),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        part = comparisons[comparisons["metric"] == metric].reset_index(drop=True)
        lo, hi = np.stack(part["ci"].to_list()).T
        y = np.arange(len(part))[::-1]
        ax.errorbar(part["diff"], y, xerr=[part["diff"] - lo, hi - part["diff"]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(y, [_labelled(b) for b in part["b"]])
        ax.set(title=f"{metric}: {part['a'].iloc[0]} minus variant", xlabel="difference (95% CI)")
    fig.suptitle(title)
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
                    lw=2.5 if variant == "AMAN" else 1, label=_labelled(variant).replace("\n", " "))
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
