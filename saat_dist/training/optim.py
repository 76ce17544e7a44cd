"""Optimizer and LR schedule from an OptimConfig and the global batch.

The learning rate is the configured one, times the batch-size rule
``lr_scaling`` (none; linear, Goyal et al. 2017; sqrt, Krizhevsky 2014)
when the global batch differs from the batch the lr was set for
(``base_batch``). The schedule multiplies it by a linear warm-up from the
unscaled lr over ``warmup_epochs`` and by ``gamma`` at each milestone (at
fractions of all steps, or at the start of the ``milestone_epochs``), or,
with ``schedule: cyclic``, follows one triangular cycle from 0 up to the lr
at ``cycle_peak`` of the steps and back to 0 (Smith 2017; the schedule of
"Fast is better than free", Wong et al., ICLR 2020, and of N-FGSM).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from saat_dist import optimizers
from saat_dist.config_fields import field, section


@section
class OptimConfig:
    """An optimizer and its learning-rate schedule."""

    name: Annotated[Literal["adam", "sgd"], Field(description="optimizer")] = "adam"
    lr: Annotated[float, Field(gt=0, description="learning rate (at base_batch, when lr_scaling is not none)")] = 1e-3
    betas: Annotated[list[float], Field(description="Adam's betas (ATRDH: 0.5, 0.999)")] = field(
        default_factory=lambda: [0.9, 0.999])
    momentum: Annotated[float, Field(ge=0, lt=1, description="SGD momentum")] = 0.0
    weight_decay: Annotated[float, Field(ge=0, description="L2 weight decay")] = 0.0
    milestones: Annotated[list[float], Field(
        description="fractions of all steps where lr is multiplied by gamma")] = field(default_factory=list)
    milestone_epochs: Annotated[list[Annotated[int, Field(gt=0)]], Field(
        description="or: epochs (0-based) at whose start lr is multiplied by gamma; overrides milestones (the "
                    "reference's benign schedule: [34, 67] of 100)")] = field(default_factory=list)
    gamma: Annotated[float, Field(gt=0, description="lr factor at each milestone")] = 0.1
    schedule: Annotated[Literal["step", "cyclic"], Field(description=(
        "step: the lr, times gamma at each milestone; cyclic: one triangular cycle, 0 -> lr at cycle_peak of the "
        "steps -> 0 (Wong et al. 2020; milestones are then ignored)"))] = "step"
    cycle_peak: Annotated[float, Field(gt=0, lt=1, description=(
        "with schedule: cyclic, the fraction of the steps where the lr peaks (Wong et al.: 0.5)"))] = 0.5
    lr_scaling: Annotated[Literal["none", "linear", "sqrt"], Field(
        description="rule for a global batch other than base_batch: lr x (batch / base_batch) (linear, Goyal et "
                    "al. 2017) or its square root (sqrt); none: lr as given at any batch")] = "none"
    base_batch: Annotated[Annotated[int, Field(ge=1)] | None, Field(
        description="the global batch lr was set for (null: lr_scaling has nothing to scale)")] = None
    warmup_epochs: Annotated[float, Field(ge=0, description=(
        "with a scaled lr: ramp linearly from the unscaled lr to the scaled one over this many epochs "
        "(Goyal et al.: 5)"))] = 0.0

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, betas: list[float]) -> list[float]:
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"must be two values in [0, 1), got {betas}")
        return betas

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, milestones: list[float]) -> list[float]:
        if not all(0 < m < 1 for m in milestones):
            raise ValueError(f"milestones are fractions of the run in (0, 1), got {milestones}")
        return milestones

    def warnings(self, section: str, epochs: int, global_batch: int) -> list[str]:
        """Settings of this section that have no effect in a stage of ``epochs`` epochs at ``global_batch``."""
        out = []
        if self.lr_scaling != "none" and self.base_batch is None:
            out.append(f"{section}.lr_scaling={self.lr_scaling!r} has no effect without {section}.base_batch")
        if self.warmup_epochs and (self.lr_scaling == "none" or self.base_batch in (None, global_batch)):
            out.append(f"{section}.warmup_epochs has no effect: the lr is not scaled "
                       "(it ramps from the unscaled lr to the scaled one)")
        if self.warmup_epochs > epochs:
            out.append(f"{section}.warmup_epochs={self.warmup_epochs:g} is longer than the stage: "
                       "the lr never reaches its scaled value")
        if self.schedule == "cyclic" and (self.milestones or self.milestone_epochs):
            out.append(f"{section}.milestones have no effect with {section}.schedule=cyclic")
        if self.schedule == "cyclic" and self.warmup_epochs:
            out.append(f"{section}.warmup_epochs has no effect with {section}.schedule=cyclic (its rise is the warm-up)")
        if self.milestone_epochs and self.milestones:
            out.append(f"{section}.milestones has no effect: {section}.milestone_epochs is set")
        late = [m for m in self.milestone_epochs if m >= epochs]
        if late:
            out.append(f"{section}.milestone_epochs {late} have no effect: the stage has {epochs} epochs")
        return out


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
        return optimizers.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return optimizers.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def milestone_steps(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> list[int]:
    """Steps at which the lr is multiplied by gamma."""
    if cfg.milestone_epochs:
        return sorted({e * steps_per_epoch for e in cfg.milestone_epochs})
    return sorted({max(1, int(m * total_steps)) for m in cfg.milestones})


def lr_multiplier(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int, factor: float) -> float:
    """The optimizer's lr times this is the lr of ``step`` (0-based)."""
    if cfg.schedule == "cyclic":  # the triangle's value at the step's middle: never exactly 0
        t = (step + 0.5) / max(1, total_steps)
        return t / cfg.cycle_peak if t < cfg.cycle_peak else max(0.0, (1 - t) / (1 - cfg.cycle_peak))
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
