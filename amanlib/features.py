"""Magnification + trunk features per clip (224x224 -> 256x14x14 per image) into the keyed feature cache."""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbone import preprocess
from .cache import KEY_FILE, KEY_LENGTH, STAMP_FILE, Entry, damage, file_digest, tensor_digest
from .data import load_clip_frames, select_frame_numbers, select_frames
from .executors import as_executor
from .fer import FER_BLOB_SHA1, FER_URL, download_fer_checkpoint  # noqa: F401  (public here too)
from .results import save_json
from .runtime import atomic_write, autocast, progress_bar, resolve_device, resolve_precision

log = logging.getLogger(__name__)

CURRENT = "current.json"  # under the features root: the key of the cache built last
REBUILD = "build the features again (amanlib.features.build_feature_cache; notebook 03_feature_extraction)"
BACKBONE_FILE = "backbone.json"  # in a cache folder: the trunk's name and checkpoint file (not part of the key)
DEFAULT_FACTORS = [2.0, 4.5, 7.0, 9.5, 12.0]  # 5 over 2-12 (the paper has 9; README: Fidelity)


def magnified_slots(factors) -> list[int]:
    """The slots of the factors that magnify (factor 1 is the unmagnified frame itself)."""
    return [k for k, f in enumerate(factors) if float(f) != 1.0]


@torch.inference_mode()
def extract_features(images: torch.Tensor, trunk: nn.Module, batch_size: int = 64, device="auto",
                     dtype: torch.dtype = torch.float32, progress: bool = True,
                     autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run images [N, 3, H, W] in [0, 1] through preprocess + trunk in batches -> [N, 256, 14, 14] on CPU, as
    `dtype`; [G, n, 3, H, W] are G batches of n (a frame_batch trunk normalises each with its own statistics)
    -> [G, n, 256, 14, 14]. With `autocast_dtype` (bf16) the trunk computes under autocast."""
    if images.dim() not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(f"extract_features expects images [N, 3, H, W] or [G, n, 3, H, W], got {tuple(images.shape)}")
    device = resolve_device(device)
    trunk = trunk.to(device).eval()
    n = images.shape[1] if images.dim() == 5 else 1  # images per group: groups are never split
    step = max(1, batch_size // n)
    out = []
    for start in progress_bar(range(0, len(images), step), desc="features", disable=not progress, leave=False):
        chunk = images[start:start + step].to(device, torch.float32)
        batch = preprocess(chunk.flatten(0, chunk.dim() - 4)).view(*chunk.shape[:-3], 3, 224, 224)
        if batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, autocast_dtype):
            out.append(trunk(batch).to("cpu", dtype))
    return torch.cat(out) if out else torch.empty(0, *images.shape[1:-3], 256, 14, 14, dtype=dtype)


def clip_features(clip: torch.Tensor, factors: list[float], trunk: nn.Module, **kw) -> torch.Tensor:
    """Trunk features of one clip's magnified images [F, K, 3, H, W] -> [F, K, 256, 14, 14].

    A frame_batch trunk (the authors' extraction) normalises with the statistics of the batch it is given:
    each frame's magnified images form one batch, as in their extractor. The unmagnified slot (factor 1, the
    no-magnification ablation) is a batch of its own per frame, so it leaves the magnified slots' features
    exactly as the authors' extractor makes them, and it is normalised like them, by its own frame's images.
    """
    if getattr(trunk, "bn", "running") != "frame_batch":
        return extract_features(clip.flatten(0, 1), trunk, **kw).view(*clip.shape[:2], 256, 14, 14)
    magnified = magnified_slots(factors)
    plain = [k for k in range(len(factors)) if k not in magnified]
    out = torch.empty(*clip.shape[:2], 256, 14, 14, dtype=kw.get("dtype", torch.float32))
    out[:, magnified] = extract_features(clip[:, magnified], trunk, **kw)  # F batches of the K' magnified images
    if plain:
        out[:, plain] = extract_features(clip[:, plain], trunk, **kw)  # F batches of one unmagnified frame
    return out


def magnify_clip(row, magnifier, factors, n_frames: int, size: int | None = None, device="cpu") -> torch.Tensor:
    """The n_frames frames after the onset up to the apex, each magnified against the onset: [F, K, 3, H, W].

    A factor of 1 is the unmagnified frame itself (the 'no magnification' input), not a network pass.
    """
    images = load_clip_frames(select_frames(row, n_frames + 1), size).to(device)  # F+1, 3, H, W (onset first)
    frames, onset = images[1:], images[:1]  # the onset is prepared once for all frames
    factors, slots = [float(f) for f in factors], magnified_slots(factors)
    out = frames[:, None].expand(-1, len(factors), -1, -1, -1).clone()  # F, K, 3, H, W
    if slots:
        out[:, slots] = magnifier(onset, frames, [factors[k] for k in slots]).to(out.dtype)
    return out


def clip_inputs(row, n_frames: int) -> dict:
    """What decides one clip's features: its name, frame numbers and the bytes of every frame read."""
    numbers = select_frame_numbers(int(row["onset"]), int(row["apex"]), n_frames + 1)
    paths = select_frames(row, n_frames + 1)
    return {"clip": f"{row['dataset']}/{row['subject']}/{row['clip']}", "frames": [int(n) for n in numbers],
            "files": [[p.name, file_digest(p)] for p in paths]}


def magnifier_inputs(magnifier, name: str) -> dict:
    """A magnifier's identity: its name, class, config, weights' digest and compute dtype."""
    config = getattr(magnifier, "config", None)
    weights = magnifier.state_dict() if isinstance(magnifier, nn.Module) else {}
    return {"name": name, "class": type(magnifier).__name__,
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
            "weights": tensor_digest(weights) if weights else None,
            "dtype": str(getattr(magnifier, "autocast_dtype", None))}


def trunk_inputs(trunk: nn.Module, autocast_dtype: torch.dtype | None = None) -> dict:
    """A trunk's identity: its weights' digest, BatchNorm mode (running statistics or each batch's own) and
    compute dtype."""
    return {"weights": tensor_digest(trunk.state_dict()), "bn": getattr(trunk, "bn", "running"),
            "dtype": str(autocast_dtype)}


@dataclass
class FeatureCache:
    """A finished feature cache: features [N, F, K, 256, 14, 14] float16 (read-only memmap) and its key."""

    features: np.memmap
    key: str
    path: Path
    inputs: dict = field(repr=False)

    @property
    def factors(self) -> list[float]:
        return self.inputs["factors"]

    @property
    def backbone(self) -> dict:
        """name, checkpoint (where layer4 can start from; None for a random trunk) and note of the trunk. A
        checkpoint inside the same work folder is stored relative to this cache, so a moved or copied results
        folder reads its own trunk."""
        record = json.loads((self.path / BACKBONE_FILE).read_text())
        if record.get("checkpoint"):
            record["checkpoint"] = str((self.path / record["checkpoint"]).resolve())  # an absolute one stays
        return record

    @property
    def clips(self) -> list[str]:
        return [c["clip"] for c in self.inputs["clips"]]


def _where(checkpoint, folder: Path) -> str | None:
    """How a cache folder refers to a trunk checkpoint: relative to it when both lie in one work folder (the
    kit's pre-trained trunk in work/trunks), else the absolute path (e.g. the FER+ file in ~/.cache)."""
    if not checkpoint:
        return None
    checkpoint, work = Path(checkpoint).resolve(), folder.resolve().parents[1]
    return os.path.relpath(checkpoint, folder.resolve()) if checkpoint.is_relative_to(work) else str(checkpoint)


def _size(nbytes: float) -> str:
    """Bytes for a person: GB from 1 GB on, else MB (a full disk's few MB are not '0.00 GB')."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _reserve(path: Path, nbytes: int) -> None:
    """Check the free space and allocate the file's blocks now: a full disk fails here with a clear error,
    before any work, never later by SIGBUS in the middle of a memmap write."""
    allocated = path.stat().st_blocks * 512 if path.exists() else 0  # a fresh memmap file is sparse
    free = shutil.disk_usage(path.parent).free
    if nbytes - allocated > free:
        raise OSError(errno.ENOSPC, f"the feature cache needs {_size(nbytes - allocated)} more but only {_size(free)} "
                                    "are free; free some space or pass another results_dir", str(path.parent))
    if path.exists() and hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, nbytes)


def factor_set(factors=None, include_unmagnified: bool = True) -> list[float]:
    """The factors to cache: the given ones (default 5 over 2-12, the authors' demo range), with the
    unmagnified frame (factor 1) first when asked, for the no-magnification ablation."""
    chosen = DEFAULT_FACTORS if factors is None else [float(f) for f in factors]
    magnified = [f for f in chosen if f != 1.0]
    if not magnified:
        raise ValueError(f"factors {list(chosen)} hold no factor > 1: AMAN would be left without magnified factors")
    return ([1.0] if include_unmagnified else []) + magnified


def build_feature_cache(index, *, magnifier, backbone, factors, n_frames: int, root: str | Path,
                        magnifier_name: str = "", size: int | None = None, batch_size: int = 64, device="auto",
                        precision: str = "auto", progress: bool = True, executor="local") -> FeatureCache:
    """Magnify every clip and run the trunk into root/<key>/features.f16 ([N, F, K, 256, 14, 14] float16).

    The key covers every frame file read (by content), onset/apex, factors, magnifier, size and trunk, so
    changed inputs get a folder of their own. Clips already done are skipped: an interrupted run resumes.
    `backbone` is an amanlib.backbone.Backbone (its name and checkpoint are kept with the cache, for
    layer4) or a bare trunk module. `precision` is the trunk's (runtime.PRECISIONS; auto: bf16 where the
    device has it natively, else fp32); the magnifier has its own (magnify.magnifier_for). `executor` ('local',
    'ray' or an amanlib.executors Executor) computes the clips, each worker setting up magnifier and trunk once.
    """
    trunk = getattr(backbone, "trunk", backbone)
    autocast_dtype = resolve_precision(precision, device)
    factors = [float(f) for f in factors]
    if not factors or not all(np.isfinite(factors)) or min(factors) < 1:
        raise ValueError(f"build_feature_cache: factors must be finite numbers >= 1, got {factors}")
    if n_frames < 1 or batch_size < 1:
        raise ValueError(f"build_feature_cache: n_frames and batch_size must be >= 1, got {n_frames}, {batch_size}")
    rows = index.reset_index(drop=True)
    inputs = {"clips": [clip_inputs(row, n_frames) for _, row in rows.iterrows()], "factors": factors,
              "n_frames": int(n_frames), "size": size, "magnifier": magnifier_inputs(magnifier, magnifier_name),
              "trunk": {"name": getattr(backbone, "name", "unnamed"), **trunk_inputs(trunk, autocast_dtype)}}
    entry = Entry(root, inputs, "features")
    if not entry.done:
        with entry.writing():
            _fill(entry, rows, magnifier, trunk, factors, n_frames, size, batch_size, device, progress, autocast_dtype,
                  executor)
    checkpoint = getattr(backbone, "checkpoint", None)
    save_json({"name": inputs["trunk"]["name"], "checkpoint": _where(checkpoint, entry.path),
               "note": getattr(backbone, "note", "")}, entry.path / BACKBONE_FILE)
    _point_to(entry)
    return _open(entry.path, entry.key)


class ClipFeatures:
    """Magnifier and trunk set up once per worker (local or a Ray actor): clip number -> its features
    [F, K, 256, 14, 14] float16."""

    def __init__(self, rows, magnifier, trunk, factors, n_frames, size, batch_size, device, autocast_dtype):
        self.device = resolve_device(device)
        self.magnifier = magnifier.to(self.device) if hasattr(magnifier, "to") else magnifier
        self.rows, self.trunk, self.factors, self.n_frames, self.size = rows, trunk, factors, n_frames, size
        self.batch_size, self.autocast_dtype = batch_size, autocast_dtype

    def __call__(self, i: int) -> np.ndarray:
        with torch.inference_mode():
            clip = magnify_clip(self.rows.loc[i], self.magnifier, self.factors, self.n_frames, self.size,
                                self.device)  # F, K, 3, H, W
        return clip_features(clip, self.factors, self.trunk, batch_size=self.batch_size, device=self.device,
                             dtype=torch.float16, progress=False, autocast_dtype=self.autocast_dtype).numpy()


def _fill(entry: Entry, rows, magnifier, trunk, factors, n_frames, size, batch_size, device, progress,
          autocast_dtype, executor) -> None:
    """Compute the clips not done yet (here or on the executor's workers) and write each as it arrives: this
    process is the only writer of the memmap and its done flags, so a resumed or retried clip is never mixed."""
    if entry.done:  # finished by another run while we waited for the lock
        return
    shape = (len(rows), n_frames, len(factors), 256, 14, 14)
    done_path, data_path = entry.path / "done.npy", entry.path / "features.f16"
    if done_path.exists() and data_path.exists():
        done, mode = np.load(done_path), "r+"
    else:
        done, mode = np.zeros(len(rows), bool), "w+"
    _reserve(data_path, 4096 + int(np.prod(shape)) * 2)  # header (at most 4 kB) + float16 data
    data = np.lib.format.open_memmap(data_path, mode=mode, dtype=np.float16, shape=shape)
    _reserve(data_path, data.offset + data.nbytes)
    if mode == "w+":
        atomic_write(done_path, lambda tmp: np.save(tmp, done))
    todo = np.flatnonzero(~done).tolist()
    shared = {"rows": rows, "magnifier": magnifier, "trunk": trunk, "factors": factors, "n_frames": n_frames,
              "size": size, "batch_size": batch_size, "device": device, "autocast_dtype": autocast_dtype}
    with as_executor(executor) as ex:
        finished = ex.actor_map(ClipFeatures, "__call__", todo, shared)
        for position, feats in progress_bar(finished, total=len(todo), desc="magnify + features",
                                            disable=not progress or not todo):
            i = todo[position]
            if not np.isfinite(feats).all():
                raise ValueError(f"clip {entry.inputs['clips'][i]['clip']}: its features hold NaN or inf (magnified "
                                 "images out of range?); nothing of it was cached")
            data[i] = feats
            data.flush()
            done[i] = True
            atomic_write(done_path, lambda tmp: np.save(tmp, done))
    entry.finish({"shape": list(shape)})


def _open(path: Path, key: str) -> FeatureCache:
    return FeatureCache(np.lib.format.open_memmap(path / "features.f16", mode="r"), key, path,
                        json.loads((path / KEY_FILE).read_text())["inputs"])


def _point_to(entry: Entry) -> None:
    """Record which cache notebook 03 built last, for notebook 04 (which checks it against the clip table)."""
    atomic_write(entry.root / CURRENT, lambda tmp: tmp.write_text(json.dumps({"key": entry.key}) + "\n"))


def load_feature_cache(root: str | Path, index=None) -> FeatureCache:
    """The feature cache last built under root; with `index`, checked clip by clip (names, frames and frame
    bytes) against that clip table, so features are never paired with other clips or labels."""
    root = Path(root)
    pointer = root / CURRENT
    if not pointer.is_file():
        raise FileNotFoundError(f"no feature cache in {root}: build it first (notebook 03_feature_extraction, "
                                "amanlib.features.build_feature_cache)")
    key = json.loads(pointer.read_text())["key"]
    path = root / key[:KEY_LENGTH]
    if not (path / STAMP_FILE).is_file():
        raise ValueError(f"feature cache {path} is incomplete: {REBUILD}; it resumes where it stopped")
    problem = damage(path)
    if problem is not None:
        raise ValueError(f"feature cache {path} is damaged ({problem}): {REBUILD}; it replaces the damaged folder")
    cache = _open(path, key)
    if index is not None:
        check_matches(cache, index)
    return cache


def check_matches(cache: FeatureCache, index) -> None:
    """Raise when the clip table is not the one the features were built from (order, clips or frames)."""
    rows = index.reset_index(drop=True)
    n_frames = cache.inputs["n_frames"]
    if len(rows) != len(cache.inputs["clips"]):
        raise ValueError(f"the clip table has {len(rows)} clips but the features in {cache.path} were built for "
                         f"{len(cache.inputs['clips'])}: {REBUILD}")
    for i, row in rows.iterrows():
        if clip_inputs(row, n_frames) != cache.inputs["clips"][i]:
            raise ValueError(f"row {i} of the clip table ({row['dataset']}/{row['subject']}/{row['clip']}) is not "
                             f"what the features in {cache.path} were built from (clip "
                             f"{cache.inputs['clips'][i]['clip']}"
                             f"; rows reordered, frames or onset/apex changed?): {REBUILD}")
