"""Grouped batch norm: one batch tensor holding G independent batches, each normalised with its own statistics.

The authors' code feeds BatchNorm one small batch at a time: layer4 sees the B clips of one (frame, factor) slice
per call, and their feature extraction runs the trunk in train mode on the K magnified images of one frame. This
module gives the same numbers in one vectorised call, without changing any state-dict key.

Layout: x [n*G, C, H, W] holds the G batches of n interleaved, x.view(n, G, C, H, W): row b*G + g is sample b of
batch g. AMAN's features [B, F, K, ...] flattened to B*F*K rows are so, with the F*K slices as batches, and the G
batches' channels are then G*C channels of one F.batch_norm call on x.view(n, G*C, H, W).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional

BATCH_STATS = ("train", "always")


def running_weights(momentum: float | None, tracked: int, groups: int, like: torch.Tensor):
    """(w0, w [G]) such that G sequential BatchNorm updates r <- (1-f) r + f stat_s give w0 r + sum_s w_s stat_s;
    f is the momentum, or 1 / (updates so far) when momentum is None (cumulative average), as in BatchNorm."""
    steps = torch.arange(tracked + 1, tracked + groups + 1, dtype=like.dtype, device=like.device)
    f = torch.full_like(steps, momentum) if momentum is not None else 1 / steps
    kept = (1 - f).flip(0).cumprod(0).flip(0)  # prod over u >= s of (1 - f_u)
    return kept[0], f * torch.cat([kept[1:], kept.new_ones(1)])


@torch.no_grad()
def fold_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var) -> None:
    """Apply the running-stat updates of G sequential BatchNorm calls (batch 0 first) as one closed form, from
    each batch's mean and unbiased variance [G, C]."""
    groups = mean.shape[0]
    tracked = int(num_batches_tracked) if num_batches_tracked is not None else 0
    w0, w = running_weights(momentum, tracked, groups, running_mean)
    w = w[:, None]  # G, 1 (a product and a sum, not a matmul, which autocast would run in bf16)
    running_mean.copy_(w0 * running_mean + (w * mean).sum(0))
    running_var.copy_(w0 * running_var + (w * var).sum(0))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(groups)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-D tensor, else contiguous_format."""
    nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc else torch.contiguous_format


def group_batch_norm(x: torch.Tensor, groups: int, running_mean=None, running_var=None, weight=None, bias=None,
                     momentum: float | None = 0.1, eps: float = 1e-5, num_batches_tracked=None) -> torch.Tensor:
    """BatchNorm in train mode on each of the G interleaved batches of x [n*G, C, H, W] separately, then the affine
    weight/bias; statistics in float32 (or x's dtype if wider), output in x's dtype and memory format. Running
    statistics, if given, take the G updates of G sequential calls."""
    if x.dim() != 4 or groups < 1 or x.shape[0] % groups:
        raise ValueError(f"grouped batch norm needs [n*G, C, H, W] with a batch that splits into {groups} equal "
                         f"groups, got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    batch = (xf.new_zeros(groups * C), xf.new_ones(groups * C)) if running_mean is not None else (None, None)
    y = functional.batch_norm(xf.contiguous().view(N // groups, groups * C, H, W), *batch,
                              None if weight is None else weight.repeat(groups),
                              None if bias is None else bias.repeat(groups),
                              training=True, momentum=1.0, eps=eps)  # momentum 1: `batch` takes the batch statistics
    if running_mean is not None:
        fold_running_stats(running_mean, running_var, num_batches_tracked, momentum,
                           *(stat.view(groups, C) for stat in batch))
    return y.view(N, C, H, W).to(x.dtype, memory_format=memory_format_of(x))


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch is `groups` interleaved equal batches, each normalised with its own statistics.

    batch_stats 'train': PyTorch's rule (batch statistics and G folded running updates in train mode, running
    statistics in eval); 'always': batch statistics in either mode, running statistics left alone.
    """

    def __init__(self, *args, batch_stats: str = "train", **kw):
        super().__init__(*args, **kw)
        if batch_stats not in BATCH_STATS:
            raise ValueError(f"batch_stats must be one of {BATCH_STATS}, got {batch_stats!r}")
        self.batch_stats, self.groups = batch_stats, 1

    @classmethod
    def adopt(cls, bn: nn.BatchNorm2d, batch_stats: str = "train") -> GroupBatchNorm2d:
        """A GroupBatchNorm2d holding bn's very parameters and buffers, so the state dict is unchanged."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, batch_stats=batch_stats,
                  device="meta")
        for name, tensor in [*bn._parameters.items(), *bn._buffers.items()]:
            setattr(new, name, tensor)
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        update = self.batch_stats == "train" and self.training and self.track_running_stats
        batch = self.batch_stats == "always" or self.training or not self.track_running_stats
        if not batch or (self.groups == 1 and self.batch_stats == "train"):
            return super().forward(x)
        running = (self.running_mean, self.running_var) if update else (None, None)
        return group_batch_norm(x, self.groups, *running, self.weight, self.bias, self.momentum, self.eps,
                                self.num_batches_tracked if update else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_stats={self.batch_stats!r}"


def use_group_batch_norm(module: nn.Module, batch_stats: str = "train") -> nn.Module:
    """Swap, in place, every BatchNorm2d inside module for a GroupBatchNorm2d on the same tensors (same state dict)."""
    if batch_stats not in BATCH_STATS:
        raise ValueError(f"batch_stats must be one of {BATCH_STATS}, got {batch_stats!r}")
    for name, child in module.named_children():
        if isinstance(child, GroupBatchNorm2d):
            child.batch_stats = batch_stats
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, name, GroupBatchNorm2d.adopt(child, batch_stats))
        else:
            use_group_batch_norm(child, batch_stats)
    return module


@contextmanager
def batch_groups(module: nn.Module, groups: int):
    """Inside the block, every GroupBatchNorm2d of module splits its batch into `groups` interleaved batches."""
    norms = [m for m in module.modules() if isinstance(m, GroupBatchNorm2d)]
    for m in norms:
        m.groups = groups
    try:
        yield module
    finally:
        for m in norms:
            m.groups = 1
