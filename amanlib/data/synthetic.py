"""Synthetic micro-expression data in CASME II's own layout, the embedded default for users without a licence.

`make_synthetic` writes root/<key>/Cropped/sub01/EP01_01/reg_imgN.jpg and a coding sheet with the columns of the
2014 CASME II sheet, then reads them back with `read_casme2` and labels them with the MEGC2019 rules. Each
class is its own facial action at the real place (see faces.action_fields), rising from onset to apex and
falling to offset, with a peak displacement of a fraction of a pixel to 2 px whose size is a property of
the subject (so no single magnification factor suits everyone). Sensor noise, head drift, blinks and
illumination flicker are added independently of the label. `make_synthetic_macro` renders the same face
model with large expressions, a stand-in for FER+ when pre-training the feature trunk.

Two regimes (`SYNTHETIC_REGIMES`) set the range of motion: `narrow` (0.3-2 px across subjects, the default) and
`wide` (0.1-8 px: motions 40x apart, as across the composite's datasets, recording set-ups and intensities).
Neither makes adapting the factor pay for the kit's pipeline, with the learning-based magnifier or the phase-based
one (README: the synthetic regimes, measured).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import openpyxl
import pandas as pd
import torch

from .. import cache
from .composite import casme2_5class, megc2019_3class
from .faces import EMOTION_AUS, FaceParams, action_fields, forward_warp, render_faces, sample_face, warp
from .readers import read_casme2

SHEET_NAME = "CASME2-coding-synthetic.xlsx"
TRUTH_NAME = "synthetic_truth.csv"
SHEET_HEADER = ["Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None, "Action Units",
                "Estimated Emotion"]  # as in CASME2-coding-20140508.xlsx, blank columns included
CLASS_EMOTIONS = {"negative": ("disgust", "repression"), "positive": ("happiness",), "surprise": ("surprise",)}
MACRO_CLASSES = ("negative", "positive", "surprise", "neutral")
SYNTHETIC_PROTOCOLS = {"megc2019_3class": megc2019_3class, "casme2_5class": casme2_5class}  # CASME II emotions


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic micro-expression set (defaults: 32 subjects x 9 clips x about 20 frames, sized so that
    the 95% CI of AMAN minus no magnification is about +-0.05 UF1 with 5 training seeds; README)."""
    n_subjects: int = 32
    clips_per_subject: int = 9
    frames: int = 20  # frames per clip, onset to offset, +- frames_jitter
    frames_jitter: int = 3
    size: int = 128
    subject_peak_px: tuple[float, float] = (0.3, 2.0)  # per-subject apex displacement, drawn log-uniformly
    clip_peak_jitter: tuple[float, float] = (0.8, 1.25)  # per-clip factor on the subject's displacement
    max_peak_px: float = 2.0
    noise_sigma: float = 1.5 / 255  # sensor noise, per pixel and frame
    drift_px: float = 0.3  # largest head drift within a clip
    blink_prob: float = 0.3
    flicker: float = 0.01  # relative illumination flicker
    jpeg_quality: int = 95


SYNTHETIC_REGIMES = {
    "narrow": {"subject_peak_px": (0.3, 2.0), "clip_peak_jitter": (0.8, 1.25), "max_peak_px": 2.0},
    "wide": {"subject_peak_px": (0.15, 6.0), "clip_peak_jitter": (0.6, 1.6), "max_peak_px": 8.0},
}
"""Named ranges of motion (SyntheticConfig fields); everything else is the same. narrow: the kit's first synthetic
set, the default. wide: subjects' apex displacements drawn log-uniformly over 0.15-6 px and clips 0.6-1.6x their
subject's, so the factor that makes one clip's motion visible magnifies another's by 50-100 px."""
REGIMES = tuple(SYNTHETIC_REGIMES)


def synthetic_config(regime: str = "narrow", **overrides) -> SyntheticConfig:
    """The SyntheticConfig of a regime, with field overrides on top (e.g. n_subjects=4)."""
    if regime not in SYNTHETIC_REGIMES:
        raise ValueError(f"synthetic regime must be one of {REGIMES}, got {regime!r}")
    return _config(SyntheticConfig, SyntheticConfig(**SYNTHETIC_REGIMES[regime]), overrides)


def resolve_config(config: SyntheticConfig | None = None, regime: str | None = None, **overrides) -> SyntheticConfig:
    """The config a set is made from: a regime's or `config` (default SyntheticConfig(), the narrow regime), with
    field overrides on top."""
    if regime is not None and config is not None:
        raise ValueError("pass a synthetic regime or a config, not both")
    return synthetic_config(regime, **overrides) if regime is not None else _config(SyntheticConfig, config, overrides)


def regime_of(cfg: SyntheticConfig) -> str:
    """The regime whose motion fields a config has, or 'custom'."""
    fields = asdict(cfg)
    return next((name for name, values in SYNTHETIC_REGIMES.items()
                 if all(fields[k] == v for k, v in values.items())), "custom")


@dataclass(frozen=True)
class MacroConfig:
    """Knobs of the macro-expression set: several intensities of each class plus neutral faces."""
    n_subjects: int = 24
    size: int = 128
    intensities_px: tuple[float, ...] = (2.5, 4.0, 6.0)
    variants: int = 2  # images per class and intensity, differing in pose jitter, blink, noise
    neutral_per_subject: int = 6
    jitter_px: float = 2.0
    blink_prob: float = 0.15
    noise_sigma: float = 1.5 / 255
    jpeg_quality: int = 95


@contextmanager
def _single_threaded():
    """Generation works on many small tensors where intra-op threads cost more than they give (and stall
    badly when the cores are busy), so it runs on one thread and restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _config(cls, config, overrides):
    config = config or cls()
    unknown = sorted(set(overrides) - set(asdict(config)))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s) {unknown}; fields are {sorted(asdict(config))}")
    return replace(config, **overrides)


def _write_jpegs(frames: torch.Tensor, paths: list[Path], quality: int) -> None:
    """frames [N, 3, H, W] in [0, 1] -> JPEG files."""
    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).flip(1).permute(0, 2, 3, 1).numpy()  # N, H, W, BGR
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)

    def write(image: np.ndarray, path: Path) -> None:
        if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"could not write {path}")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # the encoder releases the GIL
        list(pool.map(write, pixels, paths))


def _profile(n: int, apex: int) -> np.ndarray:
    """Expression intensity per frame: 0 at onset, rising smoothly to 1 at apex, falling back to 0 at offset."""
    k = np.arange(n)
    rise = np.sin(0.5 * np.pi * k / max(apex, 1)) ** 2
    fall = np.cos(0.5 * np.pi * (k - apex) / max(n - 1 - apex, 1)) ** 2
    return np.where(k <= apex, rise, fall)


def _blink(n: int, rng: np.random.Generator, prob: float) -> tuple[np.ndarray, int | None]:
    """Eyelid closure per frame (a 5-7 frame blink at a random time, or none) and its centre frame."""
    if rng.uniform() >= prob:
        return np.zeros(n), None
    centre, half = int(rng.integers(0, n)), rng.uniform(2.5, 3.5)
    return np.clip(1.6 * (1 - np.abs(np.arange(n) - centre) / half), 0, 1), centre


def _drift(n: int, rng: np.random.Generator, max_px: float) -> np.ndarray:
    """Slow head drift per frame, [n, 2] pixels: a smoothed random walk starting at 0."""
    walk = np.cumsum(rng.normal(size=(n, 2)), axis=0)
    walk = walk - walk[0]
    scale = np.abs(walk).max()
    return walk / scale * max_px * rng.uniform(0.3, 1.0) if scale > 0 else walk


def _clip_plan(rng: np.random.Generator, cfg: SyntheticConfig, subject_peak: float, emotion: str, index: int) -> dict:
    n = int(cfg.frames + rng.integers(-cfg.frames_jitter, cfg.frames_jitter + 1))
    apex = int(round(rng.uniform(0.2, 0.7) * (n - 1)))
    peak = float(min(subject_peak * rng.uniform(*cfg.clip_peak_jitter), cfg.max_peak_px))
    blink, blink_at = _blink(n, rng, cfg.blink_prob)
    t = np.arange(n)
    flicker = cfg.flicker * (0.7 * np.sin(2 * np.pi * rng.uniform(0.05, 0.25) * t + rng.uniform(0, 2 * np.pi))
                             + 0.3 * rng.normal(size=n))
    onset = int(rng.integers(1, 150))
    return {"clip": f"EP{index + 1:02d}_01", "emotion": emotion, "n": n, "onset": onset, "apex_index": apex,
            "peak_px": peak, "intensity": _profile(n, apex) * peak, "blink": blink, "blink_at": blink_at,
            "drift": _drift(n, rng, cfg.drift_px), "gain": 1 + flicker, "noise_seed": int(rng.integers(2**31))}


def _micro_face(seed: int, s: int) -> FaceParams:
    """Subject s's face in the micro-expression set of this seed."""
    return sample_face(np.random.default_rng([seed, 0, s]))


def _subject_plans(seed: int, cfg: SyntheticConfig, s: int) -> tuple[float, list[dict]]:
    """Subject s's apex displacement and clip plans, from the subject's own random stream."""
    rng = np.random.default_rng([seed, 2, s])
    subject_peak = float(np.exp(rng.uniform(*np.log(cfg.subject_peak_px))))
    classes = [list(CLASS_EMOTIONS)[(i + s) % 3] for i in range(cfg.clips_per_subject)]
    rng.shuffle(classes)
    emotions = [str(rng.choice(CLASS_EMOTIONS[c])) for c in classes]
    return subject_peak, [_clip_plan(rng, cfg, subject_peak, e, i) for i, e in enumerate(emotions)]


def _subject_motion(face: torch.Tensor, fields: dict[str, torch.Tensor],
                    plans: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame of the clips: the still face with its blink [F, 3, H, W], its motion from the onset (expression
    plus drift) [F, 2, H, W] px, and its illumination gain [F, 1, 1, 1]; a frame is warp(face, motion) * gain."""
    cat = lambda key: torch.from_numpy(np.concatenate([p[key] for p in plans])).float()  # noqa: E731
    blink, intensity, gain, drift = cat("blink"), cat("intensity"), cat("gain"), cat("drift")  # F / F / F / F,2
    field = torch.cat([fields[p["emotion"]].expand(p["n"], -1, -1, -1) for p in plans])  # F, 2, H, W
    base = torch.lerp(face[0].expand(len(blink), -1, -1, -1), face[1], blink.view(-1, 1, 1, 1))  # F, 3, H, W
    flow = intensity.view(-1, 1, 1, 1) * field + drift.view(-1, 2, 1, 1)
    return base, flow, gain.view(-1, 1, 1, 1)


def _render_subject(face: torch.Tensor, fields: dict[str, torch.Tensor], plans: list[dict],
                    noise_sigma: float) -> torch.Tensor:
    """All frames of one subject's clips in one batch: [sum of n, 3, H, W]."""
    base, flow, gain = _subject_motion(face, fields, plans)
    frames = warp(base, flow) * gain
    noise = torch.cat([torch.randn(p["n"], *frames.shape[1:], generator=torch.Generator().manual_seed(p["noise_seed"]))
                       for p in plans])
    return frames + noise_sigma * noise


def _write_sheet(path: Path, rows: list[list]) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(SHEET_HEADER)
    for row in rows:
        sheet.append(row)
    book.save(path)


def synthetic_root(root: str | Path, seed: int = 0, config: SyntheticConfig | None = None, regime: str | None = None,
                   **overrides) -> Path:
    """The folder under root that holds (or will hold) the synthetic set of this seed and config (or regime)."""
    return cache.Entry(root, _micro_inputs(seed, resolve_config(config, regime, **overrides)), "synthetic").path


def _micro_inputs(seed: int, cfg: SyntheticConfig) -> dict:
    return {"generator": "amanlib.data.make_synthetic", "version": 1, "seed": seed, "config": asdict(cfg)}


def make_synthetic(root: str | Path, seed: int = 0, config: SyntheticConfig | None = None,
                   label_protocol: str = "megc2019_3class", regime: str | None = None, **overrides) -> pd.DataFrame:
    """Write the synthetic CASME II-format set into a folder of its own under root (named by the key of seed
    and config, so other seeds sit beside it and a half-written folder is rebuilt) and return its clip table
    labelled by `label_protocol` (megc2019_3class or casme2_5class; dataset 'synthetic'). Keyword overrides
    set SyntheticConfig fields, e.g. make_synthetic(root, n_subjects=4); `regime` (narrow | wide) starts from
    that regime's config instead of `config`. The truth per clip (peak displacement, blink frame, ...) is in
    synthetic_root(...)/synthetic_truth.csv (read_truth)."""
    cfg = resolve_config(config, regime, **overrides)
    if label_protocol not in SYNTHETIC_PROTOCOLS:
        raise ValueError(f"label_protocol {label_protocol!r} cannot label the synthetic set (it has CASME II's "
                         f"emotions); use one of {sorted(SYNTHETIC_PROTOCOLS)}")
    if cfg.n_subjects < 2 or cfg.clips_per_subject < 1 or cfg.frames - cfg.frames_jitter < 3 or cfg.size < 32:
        raise ValueError(f"synthetic config too small (LOSO needs 2 subjects or more): {cfg}")

    def build(folder: Path) -> dict:
        with _single_threaded():
            _generate_micro(folder, seed, cfg)
        return {"clips": cfg.n_subjects * cfg.clips_per_subject}

    folder = cache.build_once(root, _micro_inputs(seed, cfg), "synthetic", build).path
    return SYNTHETIC_PROTOCOLS[label_protocol](read_casme2(folder / SHEET_NAME, folder / "Cropped",
                                                           dataset="synthetic"))


def _generate_micro(root: Path, seed: int, cfg: SyntheticConfig) -> None:
    faces = [_micro_face(seed, s) for s in range(cfg.n_subjects)]
    images = render_faces(faces, cfg.size)  # S, 2, 3, H, W
    fields = action_fields(faces, cfg.size)  # emotion -> S, 2, H, W

    def subject(s: int) -> tuple[list, list]:
        """Render and write subject s's clips (its own random streams, so subjects can run side by side)."""
        subject_peak, plans = _subject_plans(seed, cfg, s)
        frames = _render_subject(images[s], {e: f[s:s + 1] for e, f in fields.items()}, plans, cfg.noise_sigma)
        name = f"sub{s + 1:02d}"
        paths = [root / "Cropped" / name / p["clip"] / f"reg_img{p['onset'] + k}.jpg"
                 for p in plans for k in range(p["n"])]
        _write_jpegs(frames, paths, cfg.jpeg_quality)
        rows, truth = [], []
        for p in plans:
            offset, apex = p["onset"] + p["n"] - 1, p["onset"] + p["apex_index"]
            rows.append([s + 1, p["clip"], None, p["onset"], apex, offset, None, EMOTION_AUS[p["emotion"]],
                         p["emotion"]])
            truth.append({"subject": name, "clip": p["clip"], "emotion": p["emotion"],
                          "action_units": EMOTION_AUS[p["emotion"]], "onset": p["onset"], "apex": apex,
                          "offset": offset, "peak_px": p["peak_px"], "subject_peak_px": subject_peak,
                          "blink_frame": None if p["blink_at"] is None else p["onset"] + p["blink_at"],
                          "drift_px": float(np.abs(p["drift"]).max())})
        return rows, truth

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # torch releases the GIL: one subject per core
        done = list(pool.map(subject, range(cfg.n_subjects)))
    sheet_rows = [row for rows, _ in done for row in rows]
    truth = [row for _, rows in done for row in rows]
    _write_sheet(root / SHEET_NAME, sheet_rows)
    pd.DataFrame(truth).astype({"blink_frame": "Int64"}).to_csv(root / TRUTH_NAME, index=False)


TRUTH_STEPS = 100  # Newton steps of the truth's forward warp (faces.forward_warp): converged where it does not fold


class MagnifiedTruth(NamedTuple):
    images: torch.Tensor  # F, K, 3, H, W in [0, 1]: each frame with its motion from the onset times each factor
    motion: torch.Tensor  # F, 2 (dx, dy), H, W: displacement since the onset of each frame's content, px, frame grid
    folded: torch.Tensor  # F, K bool: the magnified motion folds the face over itself, so no single image is true


def render_magnified_truth(folder: str | Path, subject: str, clip: str, factors: Sequence[float],
                           frames: Sequence[int] | None = None) -> MagnifiedTruth:
    """What a clip of the synthetic set in `folder` (synthetic_root(...), after make_synthetic) looks like magnified:
    for each frame number (default: onset to offset) and factor a, the generator's frame (same face, action field
    and plan, rendered by its own pieces) with every point moved a times as far from the onset: its whole motion,
    expression and head drift, as a magnifier given onset and frame sees it. The generator's frame at x shows the
    onset content from x - m(x); it is moved on by (a - 1) * m with an exact forward warp (faces.forward_warp).
    Blink and illumination are not motion and stay as they are; sensor noise and JPEG are left out, so factor 1
    is the generator's frame before them. Where (a - 1) * m folds the face over itself (`folded`), the truth is
    not unique and the rendering is the warp's last iterate."""
    seed, cfg = _set_inputs(Path(folder))
    a = torch.as_tensor(factors, dtype=torch.float32).reshape(-1)  # K
    if a.numel() == 0 or not torch.isfinite(a).all():
        raise ValueError(f"factors must be a non-empty list of finite numbers, got {list(factors)}")
    names = [f"sub{s + 1:02d}" for s in range(cfg.n_subjects)]
    if subject not in names:
        raise ValueError(f"subject {subject!r} is not in the synthetic set at {folder} (sub01 to {names[-1]})")
    s = names.index(subject)
    plan = next((p for p in _subject_plans(seed, cfg, s)[1] if p["clip"] == clip), None)
    if plan is None:
        raise ValueError(f"{subject} has no clip {clip!r} in the synthetic set at {folder}")
    index = np.arange(plan["n"]) if frames is None else np.asarray(frames, dtype=int) - plan["onset"]
    if index.size == 0 or index.min() < 0 or index.max() >= plan["n"]:
        raise ValueError(f"frames must lie in {subject}/{clip}'s {plan['onset']}..{plan['onset'] + plan['n'] - 1}, "
                         f"got {None if frames is None else list(frames)}")
    with _single_threaded():
        face = _micro_face(seed, s)
        clip_motion = _subject_motion(render_faces([face], cfg.size)[0], action_fields([face], cfg.size), [plan])
        base, motion, gain = (x[torch.from_numpy(index)] for x in clip_motion)  # F, 3, H, W / F, 2, H, W / F, 1, 1, 1
        n, k = len(index), a.numel()
        each = lambda x: x.repeat_interleave(k, 0)  # noqa: E731  F -> F*K in (frame, factor) order
        moved_on = (a - 1).repeat(n).view(-1, 1, 1, 1) * each(motion)  # F*K, 2, H, W
        images = forward_warp(each(warp(base, motion)), moved_on, TRUTH_STEPS) * each(gain)  # F*K, 3, H, W
    return MagnifiedTruth(images.unflatten(0, (n, k)).clamp(0, 1), motion, _folds(motion, a - 1))


def apex_truth(row, factors: Sequence[float]) -> torch.Tensor | None:
    """A clip-table row's apex truly magnified by each factor, [K, 3, H, W] (render_magnified_truth at the apex),
    to show beside the magnifiers; None for a clip of real data."""
    if row["dataset"] != "synthetic":
        return None
    folder = Path(row["frames_dir"]).parents[2]  # <key>/Cropped/subXX/EPYY -> <key>
    return render_magnified_truth(folder, str(row["subject"]), str(row["clip"]), factors, [int(row["apex"])]).images[0]


def _folds(motion: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Whether x -> x + s * motion(x) folds over anywhere (det(I + s * grad motion) <= 0): [F, 2, H, W] and s [K]
    -> [F, K] bool."""
    (dxdy, dxdx), (dydy, dydx) = (torch.gradient(motion[:, c], dim=(1, 2)) for c in (0, 1))  # each F, H, W
    trace, det = dxdx + dydy, dxdx * dydy - dxdy * dydx
    s = scale.view(1, -1, 1, 1)
    return (1 + s * trace[:, None] + s * s * det[:, None] <= 0).flatten(2).any(dim=2)


def _set_inputs(folder: Path) -> tuple[int, SyntheticConfig]:
    """The seed and config a synthetic set was made from, as its cache folder records them."""
    key_file = folder / cache.KEY_FILE
    inputs = json.loads(key_file.read_text())["inputs"] if key_file.is_file() else {}
    made_by = {k: _micro_inputs(0, SyntheticConfig())[k] for k in ("generator", "version")}
    if {k: inputs.get(k) for k in made_by} != made_by:
        raise FileNotFoundError(f"{folder} is not a synthetic set made by this make_synthetic: pass the folder "
                                "synthetic_root(...) names")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in inputs["config"].items()}
    return int(inputs["seed"]), SyntheticConfig(**config)


def read_truth(root: str | Path) -> pd.DataFrame:
    """The per-clip truth make_synthetic wrote: emotion, action units, frames, peak_px, blink_frame, drift."""
    path = Path(root) / TRUTH_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the folder synthetic_root(...) names, after "
                                "make_synthetic")
    return pd.read_csv(path, dtype={"subject": str, "clip": str}).astype({"blink_frame": "Int64"})


def truth_for(index: pd.DataFrame) -> pd.DataFrame | None:
    """The synthetic truth of the clips of a clip table (its rows, in order), or None when it holds real data."""
    if not (index["dataset"] == "synthetic").all():
        return None
    folders = {Path(d).parents[2] for d in index["frames_dir"]}  # <key>/Cropped/subXX/EPYY -> <key>
    truth = pd.concat([read_truth(f) for f in sorted(folders)])
    merged = index[["subject", "clip"]].astype(str).merge(truth, on=["subject", "clip"], how="left", validate="1:1")
    if merged["peak_px"].isna().any():
        raise ValueError(f"synthetic truth lacks {int(merged['peak_px'].isna().sum())} clips of the clip table")
    return merged


def make_synthetic_macro(root: str | Path, seed: int = 0, config: MacroConfig | None = None,
                         **overrides) -> pd.DataFrame:
    """Write single images of large, clearly visible expressions (negative, positive, surprise at several
    intensities, plus neutral) into a keyed folder under root and return a table with columns
    path, subject, emotion, label, label_name, intensity_px (df.attrs['key'] is the set's cache key). The
    faces come from the same model as make_synthetic but are other people (as FER+ holds other people than
    the micro-expression sets)."""
    cfg = _config(MacroConfig, config, overrides)
    inputs = {"generator": "amanlib.data.make_synthetic_macro", "version": 1, "seed": seed, "config": asdict(cfg)}

    def build(folder: Path) -> dict:
        with _single_threaded():
            _generate_macro(folder, seed, cfg).to_csv(folder / "macro.csv", index=False)
        return {}

    entry = cache.build_once(root, inputs, "synthetic_macro", build)
    df = pd.read_csv(entry.path / "macro.csv", dtype={"subject": str, "path": str, "emotion": str, "label_name": str})
    df["path"] = [str(entry.path / p) for p in df["path"]]
    df.attrs["key"] = entry.key
    return df


def _generate_macro(root: Path, seed: int, cfg: MacroConfig) -> pd.DataFrame:
    faces = [sample_face(np.random.default_rng([seed, 1, s])) for s in range(cfg.n_subjects)]
    images = render_faces(faces, cfg.size)  # S, 2, 3, H, W
    fields = action_fields(faces, cfg.size)
    rows = []
    for s in range(cfg.n_subjects):
        rng = np.random.default_rng([seed, 3, s])
        items = [(c, str(rng.choice(CLASS_EMOTIONS[c])), a) for c in CLASS_EMOTIONS for a in cfg.intensities_px
                 for _ in range(cfg.variants)] + [("neutral", "neutral", 0.0)] * cfg.neutral_per_subject
        n = len(items)
        field = torch.cat([fields[e][s:s + 1] if c != "neutral" else torch.zeros_like(fields["surprise"][s:s + 1])
                           for c, e, _ in items])  # N, 2, H, W
        amp = torch.tensor([a * rng.uniform(0.85, 1.15) for *_, a in items], dtype=torch.float32)
        shift = torch.from_numpy(rng.uniform(-cfg.jitter_px, cfg.jitter_px, (n, 2))).float()
        blink = torch.from_numpy((rng.uniform(size=n) < cfg.blink_prob).astype(np.float32))
        base = torch.lerp(images[s, 0].expand(n, -1, -1, -1), images[s, 1], blink.view(-1, 1, 1, 1))
        frames = warp(base, amp.view(-1, 1, 1, 1) * field + shift.view(-1, 2, 1, 1))
        noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
        frames = frames * torch.from_numpy(rng.uniform(0.9, 1.1, (n, 1, 1, 1))).float() + cfg.noise_sigma * noise
        subject = f"m{s + 1:02d}"
        names = [f"macro/{subject}/{i:02d}_{e}.jpg" for i, (_, e, _) in enumerate(items)]
        _write_jpegs(frames, [root / p for p in names], cfg.jpeg_quality)
        rows += [{"path": p, "subject": subject, "emotion": e, "label": MACRO_CLASSES.index(c), "label_name": c,
                  "intensity_px": float(a)} for p, a, (c, e, _) in zip(names, amp.tolist(), items)]
    return pd.DataFrame(rows)
