"""SAAT + Gaussian noise: SAAT's step (``defences.saat.saat_step``) on
images with Gaussian noise N(0, sigma^2) added, for center-smoothed
certificates of a SAAT model (in the spirit of SmoothAdv, Salman et al.,
NeurIPS 2019, whose adversarial examples are found for noisy inputs). The
inner attack starts from the noisy images; the clean hash term sees them
too. The noise is keyed by (seed, stage, step, item); the noisy images are
clipped to [0, 1], the box the inner attack works in (the Gaussian
augmentation alone does not clip)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from saat_dist.config_fields import section
from saat_dist.defences.base import Defence, StepContext
from saat_dist.defences.gaussian import noisy
from saat_dist.defences.saat import SAATConfig, saat_step


@section
class SAATNoiseConfig(SAATConfig):
    """SAAT on noisy images (saat_dist.defences.saat_noise): SAAT's defaults
    and a noise std, the smoothing's sigma (certify.sigma, 0.25)."""

    sigma: Annotated[float, Field(gt=0, description=(
        "std of the training noise, in [0, 1] pixel units (train at the certificate's certify.sigma)"))] = 0.25


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    x, y, index = batch
    keys = ctx.keys(batch, step)
    x = noisy(x, ctx.section.sigma, keys.child("noise")).clamp(0, 1)
    return saat_step(ctx.model, ctx.stepper, (x, y, index), ctx.bank, ctx.loss_fn, ctx.section, step, check=False,
                     hash_bank=ctx.hash_bank, keys=keys)


DEFENCE = Defence(name="saat_noise", label="SAAT + noise", config=SAATNoiseConfig, step=train_step, seed_offset=9,
                  order=9, in_default_experiment=False)
