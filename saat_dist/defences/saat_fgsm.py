"""Single-step SAAT: SAAT's minimax with a one-step inner attack.

The inner maximisation is one signed gradient step of the mainstay loss
from a random start, instead of SAAT's 7-step PGD: one gradient of the
input per image, 3 forward/backward passes per image instead of 9. The
defaults are N-FGSM's (de Jorge et al., NeurIPS 2022: noise uniform in
[-2 eps, 2 eps], a step of eps, no projection back onto the eps-ball; it
avoids catastrophic overfitting at no extra cost), with the cyclic
learning rate of "Fast is better than free" (Wong et al., ICLR 2020).
FGSM-RS, Wong et al.'s own attack, is ``noise: 1.0, step: 1.25,
project: true``. The outer loss is SAAT's (``defences.saat.saat_update``),
and the catastrophic-overfitting guard (``defences.overfit_guard``) probes
every epoch.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from saat_dist.attacks.single_step import single_step_examples
from saat_dist.config_fields import field, section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext
from saat_dist.defences.overfit_guard import GuardConfig, fallback_settings, guard_epoch_end, guard_extras
from saat_dist.defences.saat import saat_step, saat_update
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.models.adapter import as_hash_model
from saat_dist.training.optim import OptimConfig
from saat_dist.training.steps import hash_module


@section
class SAATFGSMConfig(AdvTrainConfig):
    """Single-step SAAT (saat_dist.defences.saat_fgsm). Attack defaults:
    N-FGSM's (noise 2 eps, step eps, no projection); lr: one cycle (Wong et
    al.) peaking at SAAT's 0.05; the rest SAAT's (lambda 1, mu 1e-4, 20
    epochs at batch 32)."""

    iters: Annotated[int, Field(ge=1, le=1, description="single step: one gradient of the input per image")] = 1
    step_size: Annotated[float, Field(gt=0, le=1, description=(
        "not used: the step is `step` x eps (a multiple of the budget, as the papers give it)"))] = 2 / 255
    noise: Annotated[float, Field(ge=0, description=(
        "random start uniform in [-noise x eps, noise x eps] (N-FGSM: 2; FGSM-RS: 1; 0: plain FGSM)"))] = 2.0
    step: Annotated[float, Field(gt=0, description="the signed step, x eps (N-FGSM: 1; FGSM-RS: 1.25)")] = 1.0
    project: Annotated[bool, Field(description=(
        "project the example back onto the eps-ball (FGSM-RS: true; N-FGSM: false, its perturbation reaches "
        "(noise + step) x eps)"))] = False
    guard: GuardConfig = field(default_factory=GuardConfig, description="the catastrophic-overfitting guard")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.05, weight_decay=1e-5, schedule="cyclic"), description="optimizer")


def saat_fgsm_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: SAATFGSMConfig, step: int, *,
                   check: bool = True, hash_bank: CodeBank | None = None,
                   keys: ItemKeys) -> dict[str, torch.Tensor]:
    """One single-step SAAT step: b*(y) -> one signed step from a random
    start -> SAAT's outer loss and update."""
    x, y, index = batch
    model = as_hash_model(model)
    net = hash_module(model)
    net.alpha = 1.0
    guide = bank.mainstay(y, "cosine").to(x.device)
    x_adv = single_step_examples(net, x, guide, eps=settings.eps, noise=settings.noise, step=settings.step,
                                 project_to_ball=settings.project, keys=keys, mode=settings.attack_mode)
    return saat_update(model, stepper, x, x_adv, y, index, bank, loss_fn, settings, step, check=check,
                       hash_bank=hash_bank)


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    guard = ctx.extras.get("guard")
    if guard is not None and guard.fallen_back:  # catastrophic overfitting seen: multi-step to the end
        return saat_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, fallback_settings(ctx.section, guard), step,
                         check=False, hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))
    return saat_fgsm_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, ctx.section, step, check=False,
                          hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))


DEFENCE = Defence(name="saat_fgsm", label="SAAT single-step", config=SAATFGSMConfig, step=train_step,
                  seed_offset=5, order=5, in_default_experiment=False, extras=guard_extras, epoch_end=guard_epoch_end)
