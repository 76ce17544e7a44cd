"""Thin wrappers over torch.distributed that also work without a process group.

Tensors stay on their own device: with the process group that the driver
asks Ray for on GPUs (``cpu:gloo,cuda:nccl``) CPU tensors travel over gloo
and CUDA tensors over NCCL, so callers never move data to suit the backend.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place (gloo/NCCL); returns ``t``."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every process along dim 0, in rank order."""
    if not is_distributed():
        return t
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def all_gather_ragged(t: torch.Tensor, with_sizes: bool = False):
    """Like ``all_gather_cat`` for tensors whose first dimension differs per
    process; with ``with_sizes`` also returns each process's row count."""
    if not is_distributed():
        return (t, [t.shape[0]]) if with_sizes else t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = all_gather_cat(n).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    gathered = all_gather_cat(padded)
    m = max(sizes)
    out = torch.cat([gathered[i * m : i * m + s] for i, s in enumerate(sizes)])
    return (out, sizes) if with_sizes else out


def all_gather_json(value) -> list:
    """Every process's JSON-able ``value``, in rank order (small things: where
    each rank runs, counts)."""
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
    gathered, sizes = all_gather_ragged(data, with_sizes=True)
    out, start = [], 0
    for size in sizes:
        out.append(json.loads(bytes(gathered[start:start + size].tolist()).decode()))
        start += size
    return out


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` of process ``src`` on every process, in place (same shape and dtype everywhere); returns ``t``."""
    if is_distributed():
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all
    processes, in place. Each rank's statistics drift apart on its own data;
    averaging them at checkpoints makes the saved state one state, so a
    resumed run continues exactly as an uninterrupted one."""
    if not is_distributed():
        return
    n = world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(n)
