"""Lagrangian motion magnification (Liu et al., SIGGRAPH 2005) for an onset/frame pair: track, then move pixels.

Unlike the Eulerian methods (Wadhwa et al. 2013 contrast the two), the motion is estimated explicitly: `prepare`
computes dense optical flow between the onset and each frame with OpenCV (DIS, Kroeger et al. 2016, or
Farneback 2003) on 8-bit luminance, once per pair, from the frame back to the onset, so that the motion m(x) of
the content at x since the onset lives on the frame's grid. `render` moves that content on to
x + (a - 1) * m(x), a times its displacement from the onset; factor 1 is the frame itself (its blinks and
lighting stay as they are: only motion is magnified, not intensity).

The forward warp is inverted, not splatted (faces.forward_warp): output(z) = frame(z - t(z)), where
t(z) = (a - 1) * m(z - t(z)) is the displacement arriving at z, found by a few Newton steps from
t = (a - 1) * m(z); they converge unless the magnified motion folds the face over itself (then the last step is
kept). Backward sampling leaves no holes: uncovered regions are filled by stretching their neighbours
(bilinear), and samples from outside the image take the nearest border pixel (border clamp, as for the flow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch

from amanlib.data.faces import forward_warp
from amanlib.magnify.base import Magnifier
from amanlib.magnify.phase import LUMA

FLOWS = ("dis", "farneback")
DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


@dataclass(frozen=True)
class LagrangianConfig:
    flow: str = "dis"  # dense optical flow: dis or farneback
    dis_preset: str = "medium"  # ultrafast | fast | medium (medium: about 0.01 px on a 0.4 px shift of a texture)
    dis_finest_scale: int = 0  # level DIS stops at: 0 full size (the presets' half size reads facial motion short)
    farneback_levels: int = 3  # pyramid levels (scale 0.5 between them)
    farneback_window: int = 15  # averaging window in pixels
    inverse_steps: int = 5  # Newton steps that invert the magnified flow (0: first order, the flow at z)


class _PairState(NamedTuple):
    frames: torch.Tensor  # B, 3, H, W
    motion: torch.Tensor  # B, 2 (dx, dy), H, W: displacement since the onset of the frame's content, px, frame grid


def luminance_u8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W] uint8 luminance, what OpenCV's flow methods take."""
    y = torch.einsum("bchw,c->bhw", images, images.new_tensor(LUMA))
    return y.mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


class LagrangianMagnifier(Magnifier):
    """Optical flow once per pair (OpenCV, on the CPU), then a warp per factor on the inputs' device."""

    def __init__(self, config: LagrangianConfig | None = None, chunk_size: int | None = None, **overrides):
        super().__init__(chunk_size)
        self.config = LagrangianConfig(**{**vars(config or LagrangianConfig()), **overrides})
        if self.config.flow not in FLOWS:
            raise ValueError(f"flow must be one of {FLOWS}, got {self.config.flow!r}")
        if self.config.dis_preset not in DIS_PRESETS:
            raise ValueError(f"dis_preset must be one of {tuple(DIS_PRESETS)}, got {self.config.dis_preset!r}")

    def optical_flow(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Dense flow [H, W, 2 (dx, dy)] float32 from one uint8 image to another: source(x) ~ target(x + flow(x))."""
        cfg = self.config
        if cfg.flow == "dis":
            dis = cv2.DISOpticalFlow_create(DIS_PRESETS[cfg.dis_preset])
            dis.setFinestScale(cfg.dis_finest_scale)
            return dis.calc(source, target, None)
        return cv2.calcOpticalFlowFarneback(source, target, None, pyr_scale=0.5, levels=cfg.farneback_levels,
                                            winsize=cfg.farneback_window, iterations=3, poly_n=5, poly_sigma=1.1,
                                            flags=0)

    def prepare(self, onset: torch.Tensor, frames: torch.Tensor) -> _PairState:
        onsets, grey = luminance_u8(onset), luminance_u8(frames)  # Bo, H, W and B, H, W
        back = [self.optical_flow(g, onsets[i % len(onsets)]) for i, g in enumerate(grey)]  # one onset or B
        # frame content at x came from onset x + back(x): its motion since the onset is -back(x)
        motion = -torch.from_numpy(np.stack(back)).permute(0, 3, 1, 2).to(frames.device)  # B, 2, H, W
        return _PairState(frames, motion)

    def render(self, state: _PairState, factors: torch.Tensor) -> torch.Tensor:
        (B, _, H, W), k = state.frames.shape, factors.numel()
        a = factors.repeat(B).view(B * k, 1, 1, 1)  # factor of each output image, B*k in (frame, factor) order
        each = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731  B -> B*k
        out = forward_warp(each(state.frames), (a - 1) * each(state.motion), self.config.inverse_steps)
        return out.view(B, k, 3, H, W).clamp(0, 1)  # B, k, 3, H, W
