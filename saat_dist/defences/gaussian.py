"""Gaussian noise augmentation (Cohen et al., ICML 2019; Lecuyer et al., S&P
2019): training for certificates. The benign hash loss on images with
Gaussian noise N(0, sigma^2) added, from the benign model, so that the
center-smoothed model (``evaluation.center_smoothing``) sees at test time
the noise it was trained under. The noise is keyed by (seed, stage, step,
item) like every training draw, and the noisy images are not clipped to
[0, 1] (as Cohen et al.; the smoothing noise is not clipped either)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from saat_dist.config_fields import section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext
from saat_dist.keyed_random import ItemKeys
from saat_dist.training.steps import benign_step


@section
class GaussianConfig(AdvTrainConfig):
    """Gaussian noise augmentation (saat_dist.defences.gaussian): the benign
    loss on x + N(0, sigma^2). Noise std: the smoothing's sigma (certify.sigma,
    0.25); SAAT's optimizer and schedule. No attack: eps, step_size and
    iters are not used."""

    sigma: Annotated[float, Field(gt=0, description=(
        "std of the training noise, in [0, 1] pixel units (train at the certificate's certify.sigma)"))] = 0.25
    eps: Annotated[float, Field(ge=0, le=1, description="not used: no attack")] = 0.0
    iters: Annotated[int, Field(ge=1, description="not used: no attack")] = 1
    lam: Annotated[float, Field(ge=0, description="not used: no adversarial term")] = 0.0
    mu: Annotated[float, Field(ge=0, description="not used: no adversarial term")] = 0.0
    hash_bank: Annotated[Literal["sign"], Field(description=(
        "the bank of sign codes (the benign step's; `continuous` is not offered here)"))] = "sign"


def noisy(x: torch.Tensor, sigma: float, keys: ItemKeys) -> torch.Tensor:
    """x + N(0, sigma^2 I), the draw keyed by item (not clipped)."""
    return x + sigma * keys.normal(tuple(x.shape[1:]), x.device, x.dtype)


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    x, y, index = batch
    x = noisy(x, ctx.section.sigma, ctx.keys(batch, step).child("noise"))
    return benign_step(ctx.model, ctx.stepper, (x, y, index), ctx.bank, ctx.loss_fn, step, check=False)


DEFENCE = Defence(name="gaussian", label="Gaussian noise", config=GaussianConfig, step=train_step, seed_offset=8,
                  order=8, in_default_experiment=False)
