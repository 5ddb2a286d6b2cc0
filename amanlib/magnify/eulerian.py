"""Linear Eulerian motion magnification (Wu et al., SIGGRAPH 2012) for an onset/frame pair.

The temporal signal is the two-frame difference (frame - onset). Its Laplacian pyramid (plenoptic, any
H and W) is amplified per level with the paper's spatial cut-off: the amplification at a level of
representative wavelength lambda is bounded by (1 + alpha) * delta < lambda / 8 with
delta = lambda_c / (8 * (1 + alpha)), times Wu et al.'s exaggeration factor, so fine levels are
attenuated linearly towards zero. As in Wu et al.'s released MATLAB code, the finest level and the low-pass
residual are not amplified (noise and illumination, not motion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import plenoptic as po
import torch

from amanlib.magnify.base import Magnifier


@dataclass(frozen=True)
class EulerianConfig:
    lambda_c: float = 16.0  # spatial cut-off wavelength in pixels of the input frames
    exaggeration: float = 2.0  # Wu et al.'s code: lets motion exceed the bound by this factor
    levels: int | None = None  # incl. the low-pass residual; None: floor(log2(min(H, W))) - 1 (residual 4-7 px)
    skip_finest: bool = True  # leave the finest band unamplified, as Wu et al.'s code does


def level_wavelengths(n_bands: int) -> torch.Tensor:
    """Representative wavelength (px of the input) of each band-pass level: 2**(l + 1.5), fine to coarse."""
    return 2.0 ** (torch.arange(n_bands, dtype=torch.float32) + 1.5)


def level_gains(alpha: torch.Tensor, wavelengths: torch.Tensor, cfg: EulerianConfig) -> torch.Tensor:
    """Amplification per factor and level, [k, L]: alpha bounded by the lambda_c ramp (alpha <= 0 passes as is)."""
    a = alpha[:, None]  # k, 1
    bound = cfg.exaggeration * (wavelengths[None, :] * (1 + a) / cfg.lambda_c - 1)  # k, L
    gains = torch.where(a > 0, torch.minimum(bound.clamp(min=0), a), a.expand_as(bound))
    if cfg.skip_finest:
        gains[:, 0] = 0
    return gains


class _PairState(NamedTuple):
    frames: torch.Tensor  # B, 3, H, W
    bands: torch.Tensor  # B, L, 3, H, W: each band-pass level of (frame - onset) reconstructed at full size
    wavelengths: torch.Tensor  # L


class EulerianMagnifier(Magnifier):
    """Linear Eulerian magnification against the onset; works on any device the inputs live on."""

    def __init__(self, config: EulerianConfig | None = None, chunk_size: int | None = None, **overrides):
        super().__init__(chunk_size)
        self.config = EulerianConfig(**{**vars(config or EulerianConfig()), **overrides})
        if self.config.lambda_c <= 0:
            raise ValueError(f"lambda_c must be positive, got {self.config.lambda_c}")

    def n_levels(self, height: int, width: int) -> int:
        levels = self.config.levels or int(math.floor(math.log2(min(height, width)))) - 1
        if levels < 2:
            raise ValueError(f"frames of {height}x{width} are too small for a {levels}-level Laplacian pyramid")
        return levels

    def prepare(self, onset: torch.Tensor, frames: torch.Tensor) -> _PairState:
        pyramid = po.process.LaplacianPyramid(n_scales=self.n_levels(*frames.shape[-2:]))
        coeffs = pyramid(frames - onset)  # L+1 tensors [B, 3, h_l, w_l], fine to coarse, last one low-pass
        zeros = [torch.zeros_like(c) for c in coeffs]
        # the reconstruction is linear, so each level's full-size contribution is computed once per pair
        bands = torch.stack(
            [pyramid.recon_pyr(zeros[:l] + [coeffs[l]] + zeros[l + 1 :]) for l in range(len(coeffs) - 1)], dim=1
        )  # B, L, 3, H, W
        return _PairState(frames, bands, level_wavelengths(bands.shape[1]).to(frames.device))

    def render(self, state: _PairState, factors: torch.Tensor) -> torch.Tensor:
        gains = level_gains(factors - 1, state.wavelengths, self.config)  # k, L
        out = state.frames[:, None] + torch.einsum("kl,blchw->bkchw", gains, state.bands)  # B, k, 3, H, W
        return out.clamp(0, 1)
