"""Optimizer and LR schedule from an OptimConfig and the global batch.

The learning rate is the configured one, times the batch-size rule
``lr_scaling`` (none; linear, Goyal et al. 2017; sqrt, Krizhevsky 2014)
when the global batch differs from the batch the lr was set for
(``base_batch``). The schedule multiplies it by a linear warm-up from the
unscaled lr over ``warmup_epochs`` and by ``gamma`` at each milestone (at
fractions of all steps, or at the start of the ``milestone_epochs``).
"""

from __future__ import annotations

import math

import torch

from saat_dist.config import OptimConfig


def lr_factor(cfg: OptimConfig, global_batch: int) -> float:
    """How much ``lr_scaling`` multiplies the lr at this global batch."""
    if cfg.lr_scaling == "none" or cfg.base_batch is None:
        return 1.0
    ratio = global_batch / cfg.base_batch
    return ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio)


def build_optimizer(params, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.Optimizer:
    """The optimizer, with the betas (Adam), momentum and weight decay of
    ``cfg`` and its lr scaled for ``global_batch`` (None: unscaled)."""
    lr = cfg.lr * (1.0 if global_batch is None else lr_factor(cfg, global_batch))
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def milestone_steps(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> list[int]:
    """Steps at which the lr is multiplied by gamma."""
    if cfg.milestone_epochs:
        return sorted({e * steps_per_epoch for e in cfg.milestone_epochs})
    return sorted({max(1, int(m * total_steps)) for m in cfg.milestones})


def lr_multiplier(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int, factor: float) -> float:
    """The optimizer's lr times this is the lr of ``step`` (0-based)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    ramp = 1.0
    if warmup > 0 and step < warmup and factor != 1.0:  # from lr / factor (the unscaled lr) up to lr
        start = 1.0 / factor
        ramp = start + (1.0 - start) * step / warmup
    passed = sum(step >= m for m in milestone_steps(cfg, total_steps, steps_per_epoch))
    return ramp * cfg.gamma**passed


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int | None = None, global_batch: int | None = None):
    """The schedule of ``lr_multiplier``, stepped once per optimizer step."""
    spe = steps_per_epoch or max(1, total_steps)
    factor = 1.0 if global_batch is None else lr_factor(cfg, global_batch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(cfg, step, total_steps, spe, factor))
