"""Motion magnification of frames against the onset: magnifier(onset, frames, factors) -> [B, K, 3, H, W].

Four methods behind one interface, picked by name with `load_magnifier`: the AMAN authors'
learning-based network ("learning"), linear Eulerian ("eulerian"), phase-based ("phase") and Lagrangian
("lagrangian": optical flow, then a warp along it).
"""
from __future__ import annotations

import logging
from pathlib import Path

from amanlib.runtime import resolve_precision

from amanlib.magnify.base import Magnifier
from amanlib.magnify.checkpoint import (
    MAGNET_SHA256,
    MAGNET_URL,
    WHERE_TO_GET,
    default_checkpoint_path,
    download_magnet_checkpoint,
    verify_checkpoint,
)
from amanlib.magnify.eulerian import EulerianConfig, EulerianMagnifier
from amanlib.magnify.lagrangian import LagrangianConfig, LagrangianMagnifier
from amanlib.magnify.learning import LearningBasedMagnifier
from amanlib.magnify.phase import PhaseConfig, PhaseMagnifier

METHODS = ("learning", "eulerian", "phase", "lagrangian")
log = logging.getLogger(__name__)


def load_magnifier(name: str, **kwargs) -> Magnifier:
    """Build a magnifier by name.

    learning: kwargs of `LearningBasedMagnifier.from_checkpoint` (checkpoint path as `checkpoint` or
    `path`, `device`, `chunk_size`, `channels_last`, `autocast_dtype`); eulerian / phase / lagrangian: config
    fields (e.g. `lambda_c`, `sigma`, `flow`), `chunk_size`, and `device` (ignored: they run where the inputs are).
    """
    if name == "learning":
        path = kwargs.pop("checkpoint", None)
        path = kwargs.pop("path", path)
        return LearningBasedMagnifier.from_checkpoint(path, **kwargs)
    kwargs.pop("device", None)
    if name == "eulerian":
        return EulerianMagnifier(**kwargs)
    if name == "phase":
        return PhaseMagnifier(**kwargs)
    if name == "lagrangian":
        return LagrangianMagnifier(**kwargs)
    raise ValueError(f"unknown magnifier {name!r}; choose one of {', '.join(METHODS)}")


def magnifier_for(method: str, checkpoint=None, download: bool = True, device="auto",
                  precision: str = "auto") -> Magnifier:
    """A magnifier by name; for 'learning' the authors' checkpoint (default_checkpoint_path() when None),
    downloaded and verified first when it is absent and `download` allows, run in `precision` (runtime.PRECISIONS;
    auto: bf16 where the device has it natively, else fp32). The classic magnifiers always run in fp32."""
    dtype = resolve_precision(precision, device)
    if method != "learning":
        return load_magnifier(method)
    path = Path(checkpoint) if checkpoint else default_checkpoint_path()
    if not path.exists() and download:
        log.warning("magnification checkpoint %s is absent: downloading the authors' file", path)
        try:
            download_magnet_checkpoint(path)
        except OSError as e:
            raise RuntimeError(f"could not download the magnification checkpoint to {path} ({e}); {WHERE_TO_GET}, "
                               "and pass its path as magnet_checkpoint (or set AMANLIB_MAGNET_CHECKPOINT)") from e
    return load_magnifier("learning", checkpoint=path, device=device, autocast_dtype=dtype)


__all__ = [
    "METHODS",
    "MAGNET_SHA256",
    "MAGNET_URL",
    "EulerianConfig",
    "EulerianMagnifier",
    "LagrangianConfig",
    "LagrangianMagnifier",
    "LearningBasedMagnifier",
    "Magnifier",
    "PhaseConfig",
    "PhaseMagnifier",
    "default_checkpoint_path",
    "download_magnet_checkpoint",
    "load_magnifier",
    "magnifier_for",
    "verify_checkpoint",
]
