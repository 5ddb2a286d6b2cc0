"""Learning-based motion magnification (Oh et al., ECCV 2018) with the AMAN authors' trained weights.

Attribute names follow the authors' `mag_imple/network.py` so their state dict loads strictly. The
forward pass is split so that everything independent of the factor (encoder, g(shape_b - shape_a), the
decoder's texture branch) runs once per pair and only the rest runs per factor, batched.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from amanlib.magnify.base import Magnifier
from amanlib.magnify.checkpoint import default_checkpoint_path, load_magnet_state_dict
from amanlib.runtime import autocast, resolve_device


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=k, stride=stride, bias=False)


def _pad_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Reflection padding of half the kernel, then the convolution (the network's only conv pattern)."""
    p = conv.kernel_size[0] // 2
    return conv(F.pad(x, (p, p, p, p), mode="reflect"))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.conv2 = _conv(ch, ch, 3), _conv(ch, ch, 3)

    def forward(self, x):
        return x + _pad_conv(self.conv2, F.relu(_pad_conv(self.conv1, x)))


class PadConv(nn.Module):
    """One padded convolution, optionally followed by ReLU (the manipulator's g and h convolutions)."""

    def __init__(self, c_in: int, c_out: int, k: int, relu: bool):
        super().__init__()
        self.conv1, self.relu = _conv(c_in, c_out, k), relu

    def forward(self, x):
        y = _pad_conv(self.conv1, x)
        return F.relu(y) if self.relu else y


def _resblocks(ch: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(ch) for _ in range(n)])


class Encoder(nn.Module):
    """Shared trunk at 1/2 resolution, then a texture branch (1/4) and a shape branch (1/2)."""

    def __init__(self, n_res: int = 3):
        super().__init__()
        self.conv1, self.conv2, self.resblks = _conv(3, 16, 7), _conv(16, 32, 3, stride=2), _resblocks(32, n_res)
        self.conv1_text, self.resblks_text = _conv(32, 32, 3, stride=2), _resblocks(32, 2)
        self.conv1_shape, self.resblks_shape = _conv(32, 32, 3), _resblocks(32, 2)

    def trunk(self, x):  # N, 3, H, W -> N, 32, H/2, W/2
        return self.resblks(F.relu(_pad_conv(self.conv2, F.relu(_pad_conv(self.conv1, x)))))

    def texture(self, c):  # -> N, 32, H/4, W/4
        return self.resblks_text(F.relu(_pad_conv(self.conv1_text, c)))

    def shape(self, c):  # -> N, 32, H/2, W/2
        return self.resblks_shape(F.relu(_pad_conv(self.conv1_shape, c)))


class Manipulator(nn.Module):
    """shape_b + h((amp - 1) * g(shape_b - shape_a)); g = 7x7 conv + ReLU, h = 3x3 conv + residual block."""

    def __init__(self, n_res: int = 1):
        super().__init__()
        self.convblks = nn.Sequential(PadConv(32, 32, 7, relu=True))
        self.convblks_after = nn.Sequential(PadConv(32, 32, 3, relu=False))
        self.resblks = _resblocks(32, n_res)

    def g(self, shape_a, shape_b):
        return self.convblks(shape_b - shape_a)

    def h(self, scaled):
        return self.resblks(self.convblks_after(scaled))


class Decoder(nn.Module):
    """Texture upsampled to 1/2, concatenated with shape, 9 residual blocks, upsampled to full size, 2 convs."""

    def __init__(self, n_res: int = 9):
        super().__init__()
        self.conv1_text = _conv(32, 32, 3)
        self.resblks = _resblocks(64, n_res)
        self.conv1, self.conv2 = _conv(64, 32, 3), _conv(32, 3, 7)

    def texture(self, v):  # N, 32, H/4, W/4 -> N, 32, H/2, W/2
        return F.relu(_pad_conv(self.conv1_text, F.interpolate(v, scale_factor=2.0, mode="nearest")))

    def forward(self, texture, shape):  # N, 32, H/2, W/2 each -> N, 3, H, W in [-1, 1] (roughly)
        c = self.resblks(torch.cat([texture, shape], dim=1))
        c = F.relu(_pad_conv(self.conv1, F.interpolate(c, scale_factor=2.0, mode="nearest")))
        return _pad_conv(self.conv2, c)


class MagNet(nn.Module):
    """The authors' network (same parameter names), exposed by stage rather than as one forward."""

    def __init__(self):
        super().__init__()
        self.encoder, self.manipulator, self.decoder = Encoder(), Manipulator(), Decoder()


def _repeat_factors(x: torch.Tensor, k: int) -> torch.Tensor:
    """B, C, h, w -> B*k, C, h, w with each pair's features repeated for its k factors (b-major, like the output)."""
    return x.unsqueeze(1).expand(-1, k, *x.shape[1:]).flatten(0, 1)


class _PairState(NamedTuple):
    shape_b: torch.Tensor  # B, 32, H'/2, W'/2
    motion: torch.Tensor  # B, 32, H'/2, W'/2: g(shape_b - shape_a)
    texture: torch.Tensor  # B, 32, H'/2, W'/2: decoder texture branch of the frame
    size: tuple[int, int]  # H, W before padding to a multiple of 4
    out_device: torch.device


class LearningBasedMagnifier(Magnifier):
    """The AMAN authors' learning-based magnifier; `from_checkpoint` loads their `learning_based_mag.pth.tar`.

    Frames whose height/width are not multiples of 4 are reflection-padded for the network and cropped back.
    """

    def __init__(
        self,
        net: MagNet,
        chunk_size: int | None = None,
        channels_last: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__(chunk_size)
        self.net = net.eval()
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | None = None, device: str | torch.device = "auto", **kwargs
    ) -> LearningBasedMagnifier:
        """Build from the authors' checkpoint (default: `default_checkpoint_path()`); kwargs go to __init__."""
        net = MagNet()
        path = Path(path) if path is not None else default_checkpoint_path()
        state = load_magnet_state_dict(path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not hold the learning-based magnification network's weights: {err}") from err
        return cls(net, **kwargs).to(resolve_device(device))

    def default_chunk_size(self, device: torch.device) -> int:
        """Two images per decoder pass on CPU (measured fastest: activations stay in cache), 16 on accelerators."""
        return 2 if self.device.type == "cpu" else 16

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def prepare(self, onset: torch.Tensor, frames: torch.Tensor) -> _PairState:
        Bo, _, H, W = onset.shape  # Bo = 1 (one onset for all frames) or B
        out_device = frames.device
        x = torch.cat([onset, frames]).to(self.device) * 2 - 1  # Bo + B, 3, H, W in [-1, 1]
        ph, pw = -H % 4, -W % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        enc, dec = self.net.encoder, self.net.decoder
        with self._autocast():
            c = enc.trunk(self._layout(x))  # Bo + B, 32, H'/2, W'/2
            shape = enc.shape(c)
            shape_a, shape_b = shape[:Bo], shape[Bo:]
            motion = self.net.manipulator.g(shape_a, shape_b)  # the onset broadcasts over the frames
            texture = dec.texture(enc.texture(c[Bo:]))
        return _PairState(shape_b, motion, texture, (H, W), out_device)

    def render(self, state: _PairState, factors: torch.Tensor) -> torch.Tensor:
        B, k = state.shape_b.shape[0], factors.numel()
        alpha = (factors.to(self.device) - 1).view(1, k, 1, 1, 1)
        with self._autocast():
            scaled = (state.motion.unsqueeze(1) * alpha).flatten(0, 1)  # B*k, 32, H'/2, W'/2
            shape = _repeat_factors(state.shape_b, k) + self.net.manipulator.h(self._layout(scaled))
            texture = _repeat_factors(state.texture, k)
            y = self.net.decoder(self._layout(texture), self._layout(shape))  # B*k, 3, H', W'
        H, W = state.size
        y = ((y[..., :H, :W].float() + 1) / 2).clamp(0, 1)
        return y.unflatten(0, (B, k)).contiguous().to(state.out_device)  # B, k, 3, H, W
