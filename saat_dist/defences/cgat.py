"""CgAT (Wang et al., WWW 2023): centre-guided adversarial training.

SAAT's step with the centre code of a label as the guide: the sign of the
mean code of relevant items minus that of irrelevant items (uniform weights;
the all-zero code when either side is empty, as the reference's
``hash_center_code`` gives), and no quantisation term.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from saat_dist.config_fields import field, section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext
from saat_dist.defences.saat import saat_step
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.training.optim import OptimConfig


@section
class CgATConfig(AdvTrainConfig):
    """CgAT adversarial training (saat_dist.defences.cgat). Defaults: the
    reference (xunguangwang/CgAT central_adv_train.py): eps 8/255, step 2/255,
    7 iterations, SGD 0.01, momentum 0.9, weight decay 5e-4, lr x 0.1 at 50 %
    and 75 %, 30 epochs at batch 32."""

    epochs: Annotated[int, Field(ge=0, description="adversarial training epochs (the reference's 30)")] = 30
    mu: Annotated[float, Field(ge=0, description="CgAT has no quantisation term")] = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[0.5, 0.75]), description="optimizer")


def cgat_step(model, stepper, batch, bank: CodeBank, loss_fn, settings, step: int,
              generator: torch.Generator | None = None, *, check: bool = True,
              hash_bank: CodeBank | None = None, keys: ItemKeys | None = None) -> dict[str, torch.Tensor]:
    """One CgAT step (Wang et al., WWW 2023): SAAT's step with the centre code
    (uniform weights over relevant and irrelevant items) as the guide."""
    return saat_step(model, stepper, batch, bank, loss_fn, settings, step, generator, check=check,
                     hash_bank=hash_bank, keys=keys, weighting="uniform")


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    return cgat_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, ctx.section, step, check=False,
                     hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))


DEFENCE = Defence(name="cgat", label="CgAT", config=CgATConfig, step=train_step, seed_offset=2, order=3)
