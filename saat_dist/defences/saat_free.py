"""Free SAAT: SAAT's minimax with minibatch replay (Shafahi et al., "Adversarial
training for free!", NeurIPS 2019).

Each batch is replayed ``replays`` (m) times. A replay is one forward of the
clean and the adversarial images, SAAT's outer loss, and ONE backward pass
that serves both players: its weight gradients make the optimizer step, its
input gradient moves the perturbation by a signed step of eps (then
projected onto the eps-ball). No separate inner attack runs: a replay costs
2 passes per image (the clean and the adversarial forward), and the stage
runs SAAT's epochs / m (the paper's rule): m replays of 2 passes over 1/m of
the epochs, 2 passes per image and SAAT epoch against SAAT's 9.

Departure from the paper, stated: the paper carries the perturbation from
one minibatch to the next; here each batch starts from a uniform random
perturbation keyed by item (``start: random``) or from zero, because what
a worker's previous minibatch was depends on the worker count (scale
changes the speed, never the answer). Replays are optimizer updates: the lr
schedule counts them (``updates_per_step``), and gradient accumulation is
refused (``distributed.grad_accum`` must be 1: a replay is an update).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from saat_dist.config_fields import field, section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext
from saat_dist.defences.overfit_guard import GuardConfig, fallback_settings, guard_epoch_end, guard_extras
from saat_dist.defences.saat import saat_loss, saat_step
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.models.adapter import as_hash_model
from saat_dist.training.steps import advance_schedule, check_finite, hash_module


@section
class SAATFreeConfig(AdvTrainConfig):
    """Free SAAT (saat_dist.defences.saat_free). Defaults: the paper's m = 4
    replays and step eps, and its epochs / m rule on SAAT's 20 epochs (5);
    SAAT's loss weights and optimizer."""

    epochs: Annotated[int, Field(ge=0, description=(
        "epochs over the data (each batch replayed `replays` times; the paper: SAAT's epochs / replays)"))] = 5
    iters: Annotated[int, Field(ge=1, description="not used: a replay is the inner step")] = 1
    step_size: Annotated[float, Field(gt=0, le=1, description=(
        "not used: the perturbation's step is `step` x eps (the paper: eps)"))] = 2 / 255
    attack_mode: Annotated[Literal["eval", "train"], Field(description=(
        "the overfitting guard's multi-step fallback only: a replay's perturbation gradient comes from the "
        "training forward (train mode)"))] = "eval"
    replays: Annotated[int, Field(ge=1, description="m: replays of each batch (the paper: 4 on ImageNet)")] = 4
    step: Annotated[float, Field(gt=0, description="the perturbation's signed step, x eps (the paper: 1)")] = 1.0
    start: Annotated[Literal["random", "zero"], Field(description=(
        "each batch's first perturbation: uniform in [-eps, eps] keyed by item, or zero (the paper carries it "
        "over from the previous minibatch, which depends on the worker count)"))] = "random"
    guard: GuardConfig = field(default_factory=GuardConfig, description="the catastrophic-overfitting guard")


def saat_free_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: SAATFreeConfig, step: int, *,
                   check: bool = True, hash_bank: CodeBank | None = None,
                   keys: ItemKeys) -> dict[str, torch.Tensor]:
    """``replays`` SAAT updates on one batch; each backward also gives the
    perturbation its gradient. Returns the mean of the replays' outputs."""
    x, y, index = batch
    model = as_hash_model(model)
    hash_module(model).alpha = 1.0
    eps = settings.eps
    if settings.start == "random":
        delta = (keys.uniform(tuple(x.shape[1:]), x.device).to(x.dtype) * 2 - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    outs = []
    for _ in range(settings.replays):
        delta.requires_grad_(True)
        loss, out = saat_loss(model, x, x + delta, y, index, bank, loss_fn, settings, hash_bank=hash_bank)
        if check:
            check_finite(loss, "SAAT (free)", step)
        stepper.backward(loss)  # the one backward: weights and perturbation
        grad = delta.grad
        stepper.step()
        with torch.no_grad():  # ascend the loss: the adversarial term pushes F(x + delta) away from b*
            delta = (delta + settings.step * eps * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
        outs.append(out)
    return {k: torch.stack([o[k] for o in outs]).mean() for k in outs[0]}


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    guard = ctx.extras.get("guard")
    if guard is not None and guard.fallen_back:  # catastrophic overfitting seen: multi-step to the end
        out = saat_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, fallback_settings(ctx.section, guard), step,
                        check=False, hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))
        advance_schedule(ctx.stepper, ctx.section.replays - 1)  # one update where the schedule counts m
        return out
    return saat_free_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, ctx.section, step, check=False,
                          hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))


def updates(section: SAATFreeConfig) -> int:
    return section.replays


DEFENCE = Defence(name="saat_free", label="SAAT free", config=SAATFreeConfig, step=train_step, seed_offset=6,
                  order=6, in_default_experiment=False, extras=guard_extras, epoch_end=guard_epoch_end, updates_per_step=updates)
