"""Small runtime helpers shared by every stage: device choice, precision, seeding, autocast, atomic writes,
what the machine is."""
from __future__ import annotations

import contextlib
import os
import platform
import random
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm.std import tqdm as std_tqdm


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; anything else is passed to torch.device."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def mps_available() -> bool:
    """Whether this machine has Apple's MPS device."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def device_available(device: str) -> bool:
    """Whether this machine has the device 'cpu', 'mps', 'cuda' or 'cuda:N'."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.is_available() and index < torch.cuda.device_count()
    return device != "mps" or mps_available()


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


PRECISIONS = ("auto", "fp32", "bf16", "bf16_emulated")
"""auto: bf16 where the device computes it natively, else fp32 (the default everywhere); bf16: refused where it
would be emulated; bf16_emulated: bf16 anywhere, knowingly."""

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ONEDNN_BELOW_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
"""ONEDNN_MAX_CPU_ISA caps below AVX512_CORE_BF16; any other value (AVX512_CORE_BF16, AVX512_CORE_AMX, AVX10_1_512,
ALL, DEFAULT; oneDNN ignores unknown ones) leaves bf16 native where the CPU has it."""
EMULATED_BF16_COST = ("measured 8.6x (an AVX2 CPU) to 14x (bench/precision.py, AVX2 simulated) slower than fp32 "
                      "for a ResNet-18 training step")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them; empty where there is no such file (macOS, Windows)."""
    path = Path(cpuinfo)
    return set(path.read_text().split()) if path.is_file() else set()


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    path = Path(cpuinfo)
    if path.is_file():
        names = [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                 if line.startswith("model name")]
        if names:
            return names[0]
    return platform.processor() or platform.machine()


def onednn_isa(env: Mapping[str, str] | None = None) -> str | None:
    """The ISA cap oneDNN runs under: ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA), upper case; None
    when unset."""
    env = os.environ if env is None else env
    value = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value else None


def bf16_emulated_because(device: str | torch.device = "cpu", cpuinfo: str | Path = "/proc/cpuinfo",
                          env: Mapping[str, str] | None = None, capability: str | None = None) -> list[str]:
    """Why bf16 would be emulated on `device`, one reason per missing flag or ISA cap; empty where it is native.
    A CPU needs the avx512_bf16 or amx_bf16 flag, torch's CPU capability (`capability`, default what torch
    reports under ATEN_CPU_CAPABILITY) at AVX512, and oneDNN not capped below AVX512_CORE_BF16 (`env`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return [] if torch.cuda.is_bf16_supported() else ["torch.cuda.is_bf16_supported() is False"]
    if device.type != "cpu":
        return [f"no native bf16 on {device.type}"]
    reasons = []
    if not cpu_flags(cpuinfo) & set(BF16_FLAGS):
        reasons.append(f"no {'/'.join(BF16_FLAGS)} flag")
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if not capability.upper().startswith("AVX512"):
        reasons.append(f"torch's CPU capability is {capability}, not AVX512")
    isa = onednn_isa(env)
    if isa in _ONEDNN_BELOW_BF16:
        reasons.append(f"ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below AVX512_CORE_BF16")
    return reasons


def native_bf16(device: str | torch.device = "cpu", cpuinfo: str | Path = "/proc/cpuinfo",
                env: Mapping[str, str] | None = None, capability: str | None = None) -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX that
    torch and oneDNN are allowed to use (elsewhere bf16 is emulated and slower than fp32)."""
    return not bf16_emulated_because(device, cpuinfo, env, capability)


def resolve_precision(precision: str, device: str | torch.device = "cpu", cpuinfo: str | Path = "/proc/cpuinfo",
                      env: Mapping[str, str] | None = None, capability: str | None = None) -> torch.dtype | None:
    """The autocast dtype of a precision setting (PRECISIONS): None (fp32) or bfloat16. 'auto' takes bf16 only
    where the device has it natively; 'bf16' where it would be emulated is a ValueError naming why."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16_emulated":
        return torch.bfloat16
    device = resolve_device(device)
    reasons = bf16_emulated_because(device, cpuinfo, env, capability)
    if not reasons:
        return torch.bfloat16
    if precision == "auto":
        return None
    where = "this CPU" if device.type == "cpu" else str(device)
    cost = f": {EMULATED_BF16_COST}" if device.type == "cpu" else ""
    raise ValueError(f"bf16 is emulated on {where} ({'; '.join(reasons)}){cost}; use precision 'auto' or 'fp32', "
                     "or 'bf16_emulated' to run it anyway")


def machine_info(device: str | torch.device = "auto") -> dict:
    """What a run computed on, for metrics.json and timing.json: CPU model, the cores this process may use and
    torch's threads, torch's CPU capability, oneDNN's ISA cap, whether bf16 is native on `device`, GPU, torch."""
    device = resolve_device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "onednn_max_cpu_isa": onednn_isa(),
            "native_bf16": native_bf16(device), "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit use (shuffling, init)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on any device (bf16 on CPU, the stand-in for CUDA in tests); None: plain fp32."""
    if dtype is None:
        return contextlib.nullcontext()
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
