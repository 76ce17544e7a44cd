"""Curriculum SAAT: a weak attack at low resolution first, the full attack
at full resolution last (after AdvXL, Wang et al., CVPR 2024, which
pre-trains with a 1-step attack at low resolution and fine-tunes with a
stronger one at full resolution).

The stage is split into ``phases`` by fraction of its steps; each phase
runs SAAT's step (``defences.saat.saat_step``) with its own inner PGD
iterations on the batch resized to ``scale`` x the image side (bilinear,
antialiased). A pass at half the side costs a quarter of a full one (the
trainer counts passes in full-resolution pixels). The model must accept
smaller images (every backbone here ends in adaptive pooling).

A phase never takes the side below ``min_side`` (32 px by default): at
the demo's 32 px the curriculum runs at full resolution and only its
attack grows. Measured on the demo at half the side (16 px, 75 % of the
steps): clean mAP fell from 0.79 to 0.59 and the worst case to 0.29, below
the random-code floor; digits of a few pixels lose their strokes. AdvXL
halves 224 px images, not 32 px ones.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from saat_dist.config_fields import StepSize, field, section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext
from saat_dist.defences.saat import saat_step


@section
class CurriculumPhase:
    """One phase of the curriculum."""

    until: Annotated[float, Field(gt=0, le=1, description="the fraction of the stage's steps where it ends")]
    iters: Annotated[int, Field(ge=1, description="inner PGD iterations")]
    scale: Annotated[float, Field(gt=0, le=1, description="image side x this (1: full resolution)")] = 1.0
    step_size: Annotated[StepSize | None, Field(description=(
        "inner PGD step (null: 2.5 eps / iters, Madry et al.'s rule, at most eps)"))] = None


@section
class SAATCurriculumConfig(AdvTrainConfig):
    """Curriculum SAAT (saat_dist.defences.saat_curriculum). Defaults: AdvXL's
    two phases in SAAT's terms: the first 75 % of the steps with a 1-step
    attack at half the image side (not below ``min_side``), the last 25 %
    with 3 steps at full resolution (at 224 px 20 % of SAAT's passes; at
    the demo's 32 px, all at full resolution, 39 %); SAAT's loss, optimizer
    and epochs. Departure from AdvXL, stated: its low-resolution phase
    pre-trains from scratch for most of a long schedule; here the stage
    fine-tunes the benign model for SAAT's epochs."""

    iters: Annotated[int, Field(ge=1, description="not used: each phase has its own iterations")] = 1
    step_size: Annotated[float, Field(gt=0, le=1, description="not used: each phase has its own step")] = 2 / 255
    phases: list[CurriculumPhase] = field(default_factory=lambda: [
        CurriculumPhase(until=0.75, iters=1, scale=0.5), CurriculumPhase(until=1.0, iters=3, scale=1.0)],
        description="the phases, in order; the last ends at 1.0")
    min_side: Annotated[int, Field(ge=1, description=(
        "a phase's scale never takes the image side below this many pixels (at or under it the phase runs at "
        "full resolution: 16-px demo digits lost their strokes, clean mAP 0.79 -> 0.59); 1: AdvXL's scale as "
        "given at every size"))] = 32

    @field_validator("phases")
    @classmethod
    def _ordered(cls, phases: list[CurriculumPhase]) -> list[CurriculumPhase]:
        ends = [p.until for p in phases]
        if not phases or ends != sorted(set(ends)) or ends[-1] != 1.0:
            raise ValueError(f"phases must end at increasing fractions of the stage, the last at 1.0; got {ends}")
        return phases


def phase_at(phases: list[CurriculumPhase], step: int, total_steps: int) -> CurriculumPhase:
    """The phase of ``step`` (0-based) in a stage of ``total_steps``."""
    t = step / max(1, total_steps)
    return next((p for p in phases if t < p.until), phases[-1])


def resized(x: torch.Tensor, scale: float, min_side: int = 8) -> torch.Tensor:
    """The batch at ``scale`` x its side (at least ``min_side`` pixels), or as
    it is at 1 or when that floor is its own side or more."""
    side = max(min_side, round(x.shape[-1] * scale))
    if scale >= 1.0 or side >= x.shape[-1]:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    import dataclasses

    s = ctx.section
    p = phase_at(s.phases, step, ctx.total_steps)
    settings = dataclasses.replace(s, iters=p.iters, step_size=p.step_size or min(s.eps, 2.5 * s.eps / p.iters))
    x, y, index = batch
    return saat_step(ctx.model, ctx.stepper, (resized(x, p.scale, s.min_side), y, index), ctx.bank, ctx.loss_fn,
                     settings, step, check=False, hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))


DEFENCE = Defence(name="saat_curriculum", label="SAAT curriculum", config=SAATCurriculumConfig, step=train_step,
                  seed_offset=7, order=7, in_default_experiment=False)
