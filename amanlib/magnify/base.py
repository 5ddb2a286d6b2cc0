"""What every magnifier shares: input checks, the once-per-pair / per-factor split, and chunking over factors."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def check_pair(onset: torch.Tensor, frames: torch.Tensor) -> None:
    """Raise a ValueError naming the argument when onset/frames are not float [B, 3, H, W] images in [0, 1]."""
    for name, x in (("onset", onset), ("frames", frames)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W], got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must have shape [B, 3, H, W], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor scaled to [0, 1], got dtype {x.dtype}")
    if onset.shape[1:] != frames.shape[1:] or onset.shape[0] not in (1, frames.shape[0]):
        raise ValueError(
            "onset must have the frames' shape, or batch 1 (one onset for all frames), got "
            f"{tuple(onset.shape)} and {tuple(frames.shape)}"
        )
    if onset.device != frames.device:
        raise ValueError(f"onset is on {onset.device} but frames is on {frames.device}")
    for name, x in (("onset", onset), ("frames", frames)):
        lo, hi = torch.aminmax(x)  # one reduction, one sync per tensor
        lo, hi = float(lo), float(hi)
        if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
            raise ValueError(f"{name} values must lie in [0, 1], found range [{lo:.4g}, {hi:.4g}]")


def check_factors(factors: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Factors as a float64 CPU tensor [K]; a ValueError for an empty, non-1-D or non-finite list."""
    f = torch.as_tensor(factors, dtype=torch.float64).cpu()
    if f.ndim == 0:
        f = f[None]
    if f.ndim != 1 or f.numel() == 0:
        raise ValueError(f"factors must be a non-empty sequence of floats, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"factors must be finite, got {f.tolist()}")
    return f


class Magnifier(nn.Module):
    """magnifier(onset, frames, factors) -> [B, K, 3, H, W] in [0, 1]; factor 1 leaves the frame unchanged.

    `onset` is [B, 3, H, W] or [1, 3, H, W]: one onset shared by all B frames of a clip is prepared once.

    Subclasses split the work into `prepare` (once per onset/frame pair) and `render` (per factor, batched),
    so the per-pair cost is paid once whatever K is; `chunk_size` bounds how many output images are
    rendered at once (B * factors per chunk, at least one factor) to cap memory; None picks a per-device default.
    """

    def __init__(self, chunk_size: int | None = None):
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def default_chunk_size(self, device: torch.device) -> int:
        return 16

    def prepare(self, onset: torch.Tensor, frames: torch.Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self, state: Any, factors: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """factors: float32 [k] on the frames' device -> [B, k, 3, H, W] in [0, 1]."""
        raise NotImplementedError

    def forward(
        self, onset: torch.Tensor, frames: torch.Tensor, factors: Sequence[float] | torch.Tensor
    ) -> torch.Tensor:
        check_pair(onset, frames)
        f = check_factors(factors).to(device=frames.device, dtype=torch.float32)
        dtype = frames.dtype
        per_chunk = max(1, (self.chunk_size or self.default_chunk_size(frames.device)) // frames.shape[0])
        with torch.inference_mode():
            state = self.prepare(onset.float(), frames.float())
            chunks = [self.render(state, fk) for fk in f.split(per_chunk)]
        # concatenated outside inference mode so the result is an ordinary tensor that autograd code can consume
        return torch.cat(chunks, dim=1).to(dtype)  # B, K, 3, H, W
