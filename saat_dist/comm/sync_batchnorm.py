"""BatchNorm over the global batch: every process's share normalised with
the statistics of all of them (torch's SyncBatchNorm runs on GPUs only;
this one runs on any device and backend, gloo included).

Each process computes its share's (mean, biased variance, count) per
channel; one all-gather per layer and forward shares them, and Chan's
formula combines them (stable, unlike E[x^2] - E[x]^2). Gradients flow
back through the gather: the backward sums every process's gradient for
each share's statistics. Running statistics are updated with the global
mean and unbiased variance, the same on every process. In eval mode, or
without a process group of more than one, it is a plain BatchNorm.

``convert_sync_batchnorm(model)`` swaps every BatchNorm1d/2d/3d of a model
in place of it (same parameters and buffers, same state_dict keys), from
outside the model, as torchtitan applies parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from saat_dist.comm.collectives import is_distributed, rank, world_size


class _GatherRows(torch.autograd.Function):
    """All-gather of one row per process (W x D), differentiable."""

    @staticmethod
    def forward(ctx, row: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(row) for _ in range(world_size())]
        dist.all_gather(out, row.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # every process's loss depends on every share's statistics: this share's gradient is the sum
        # over processes of their gradient for it (an all-gather: on gloo 4x faster than an all-reduce
        # for these few values)
        out = [torch.empty_like(grad) for _ in range(world_size())]
        dist.all_gather(out, grad.contiguous())
        return torch.stack(out)[:, rank()].sum(0)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer whose training statistics cover every process's batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        n = torch.tensor([float(x.numel() // c)], device=x.device)
        local = torch.cat([xf.mean(dims), xf.var(dims, unbiased=False), n])
        rows = _GatherRows.apply(local)  # W x (2C + 1)
        means, variances, counts = rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c :]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean).pow(2))).sum(0) / total  # Chan et al.
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a ``SyncBatchNorm``
    holding the same parameters and buffers; returns the (new) root."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:  # the very tensors: optimizers and engines built later see one set of parameters
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module

