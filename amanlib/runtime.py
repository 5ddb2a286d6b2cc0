"""Small runtime helpers shared by every stage: device choice, seeding, autocast, atomic writes."""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.std import tqdm as std_tqdm


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class _TextBar(std_tqdm):
    """Plain-text bar for logs: at most one line per `mininterval`, postfix updates included."""

    def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress_bar(iterable=None, **kwargs):
    """A text tqdm bar, one line redrawn in place (in a terminal and in JupyterLab alike: never a widget, so a
    saved notebook reopens without 'Error displaying widget'); with AMANLIB_PROGRESS=text (headless papermill
    runs, logs) a plain line every 5 s for the lasting bars, transient ones (leave=False) hidden; none with
    AMANLIB_PROGRESS=off."""
    mode = os.environ.get("AMANLIB_PROGRESS", "auto")
    if mode not in ("auto", "text", "off"):
        raise ValueError(f"AMANLIB_PROGRESS={mode!r}: expected auto, text or off")
    if mode == "off" or (mode == "text" and kwargs.get("leave") is False):
        kwargs["disable"] = True
    if mode == "text":
        kwargs.setdefault("mininterval", 5.0)
        return _TextBar(iterable, **kwargs)
    return std_tqdm(iterable, **kwargs)


PRECISIONS = ("fp32", "bf16", "auto")


def native_bf16(device: str | torch.device = "cpu", cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX
    (elsewhere bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not Path(cpuinfo).is_file():
        return False
    flags = set(Path(cpuinfo).read_text().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> torch.dtype | None:
    """The autocast dtype of a precision setting: None for 'fp32', bfloat16 for 'bf16', and for 'auto' bf16
    where the device has it natively, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16(resolve_device(device)) else None
    return torch.bfloat16 if precision == "bf16" else None


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit use (shuffling, init)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
    """Mixed precision on any device: bf16 on CPU (the stand-in for CUDA in tests), fp16/bf16 on CUDA."""
    if not enabled:
        return contextlib.nullcontext()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) and move the result to path in one rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def torch_save_atomic(obj, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
