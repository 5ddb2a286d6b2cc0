"""Phase-based motion magnification (Wadhwa et al., SIGGRAPH 2013) for an onset/frame pair.

Complex steerable pyramid (plenoptic's SteerablePyramidFreq, FFT-based, on torch); per band the phase
difference frame vs onset (wrapped to [-pi, pi]) is smoothed with an amplitude-weighted Gaussian and
multiplied by (factor - 1). Only the change of the band coefficients is reconstructed and added to the
frame, so the residual low/high-pass bands stay the frame's and factor 1 is exactly the frame. As in
Wadhwa et al.'s released code, the luminance (Y of YIQ) is magnified by default and chroma kept. Odd heights/widths are
reflection-padded by one pixel (plenoptic reconstructs exactly only even sizes) and cropped back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import plenoptic as po
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from amanlib.magnify.base import Magnifier

LUMA = (0.299, 0.587, 0.114)  # Y row of RGB -> YIQ; its inverse adds a luminance change equally to R, G, B


@dataclass(frozen=True)
class PhaseConfig:
    order: int = 3  # steerable filter order: order + 1 orientations
    scales: int | None = None  # band-pass scales; None: plenoptic's maximum for the (padded) size
    sigma: float = 2.0  # Gaussian sigma of the amplitude-weighted phase smoothing, in pixels of each band; 0 = off
    luma_only: bool = True  # magnify luminance only (Wadhwa et al.'s choice) or each RGB channel


def amplitude_weighted_blur(phase: torch.Tensor, amplitude: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur(amplitude * phase) / Blur(amplitude): phase smoothing that trusts strong responses more."""
    if sigma <= 0:
        return phase
    h, w = phase.shape[-2:]
    size = [min(2 * int(3 * sigma + 0.5) + 1, 2 * ((n - 1) // 2) + 1) for n in (w, h)]  # reflect pad < size
    both = gaussian_blur(torch.stack([amplitude * phase, amplitude]), kernel_size=size, sigma=[sigma, sigma])
    return both[0] / (both[1] + torch.finfo(phase.dtype).eps)


def _rotate_minus_one(coeffs: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """coeffs * (exp(i * theta) - 1) for coeffs [B, C, O, h, w] and theta [B, k, C, O, h, w] -> [B*k, C, O, h, w].

    Written with real sin terms (cos - 1 = -2 sin^2(theta / 2)): exact for small theta and faster than complex expm1.
    """
    factor = torch.complex(-2 * torch.sin(theta / 2) ** 2, torch.sin(theta))
    return (coeffs[:, None] * factor).flatten(0, 1)


class _PairState(NamedTuple):
    frames: torch.Tensor  # B, 3, H, W
    coeffs: list[torch.Tensor]  # per scale: B, C, O, h, w complex band coefficients of the frame
    phase: list[torch.Tensor]  # per scale: B, C, O, h, w smoothed phase change vs onset
    pyramid: po.process.SteerablePyramidFreq
    residuals: dict[str, tuple[int, ...]]  # shapes of the residual bands (zero in the reconstruction), per image


class PhaseMagnifier(Magnifier):
    """Phase-based magnification against the onset; batched over frames and factors on the inputs' device."""

    def __init__(self, config: PhaseConfig | None = None, chunk_size: int | None = None, **overrides):
        super().__init__(chunk_size)
        self.config = PhaseConfig(**{**vars(config or PhaseConfig()), **overrides})
        self._pyramids: dict[tuple[int, int, str], po.process.SteerablePyramidFreq] = {}

    def pyramid(self, height: int, width: int, device: torch.device) -> po.process.SteerablePyramidFreq:
        """The complex steerable pyramid for a padded size, built once and cached per size and device."""
        key = (height, width, str(device))
        if key not in self._pyramids:
            height_arg = "auto" if self.config.scales is None else self.config.scales
            self._pyramids[key] = po.process.SteerablePyramidFreq(
                (height, width), height=height_arg, order=self.config.order, is_complex=True
            ).to(device)
        return self._pyramids[key]

    def _signal(self, rgb: torch.Tensor) -> torch.Tensor:  # B, 3, H, W -> B, C, H+pad, W+pad
        x = torch.einsum("bchw,c->bhw", rgb, rgb.new_tensor(LUMA))[:, None] if self.config.luma_only else rgb
        H, W = x.shape[-2:]
        return F.pad(x, (0, W % 2, 0, H % 2), mode="reflect") if (H % 2 or W % 2) else x

    def prepare(self, onset: torch.Tensor, frames: torch.Tensor) -> _PairState:
        Bo = onset.shape[0]  # 1 (one onset for all frames) or B
        x = torch.cat([self._signal(onset), self._signal(frames)])  # Bo + B, C, H', W'
        pyramid = self.pyramid(*x.shape[-2:], x.device)
        pyr = pyramid(x)
        bands = [pyr[s] for s in range(pyramid.num_scales)]  # Bo + B, C, O, h, w complex
        coeffs = [band[Bo:] for band in bands]
        phase = [
            amplitude_weighted_blur(torch.angle(band[Bo:] * band[:Bo].conj()), band[Bo:].abs(), self.config.sigma)
            for band in bands
        ]
        residuals = {k: tuple(pyr[k].shape[1:]) for k in ("residual_highpass", "residual_lowpass")}
        return _PairState(frames, coeffs, phase, pyramid, residuals)

    def render(self, state: _PairState, factors: torch.Tensor) -> torch.Tensor:
        B, k = state.frames.shape[0], factors.numel()
        alpha = (factors - 1).view(1, k, 1, 1, 1, 1)
        change = {  # coefficient change per scale, B*k, C, O, h, w
            s: _rotate_minus_one(c, alpha * p[:, None]) for s, (c, p) in enumerate(zip(state.coeffs, state.phase))
        }
        for name, shape in state.residuals.items():
            change[name] = state.frames.new_zeros(B * k, *shape)
        delta = state.pyramid.recon_pyr(change)  # B*k, C, H', W'
        H, W = state.frames.shape[-2:]
        delta = delta[..., :H, :W].unflatten(0, (B, k))  # B, k, C, H, W
        return (state.frames[:, None] + delta).clamp(0, 1)  # C = 1 broadcasts over R, G, B
