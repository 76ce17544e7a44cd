"""PGD-AT: plain PGD adversarial training on the benign hash loss (Madry et
al., ICLR 2018), the floor any hashing defence must beat. The inner PGD
maximises L_hash(F(x + delta), y) against the current bank; the outer loss is
clean_weight x L_hash(x) + lam x L_hash(x_adv)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from saat_dist.attacks.mainstay_pgd import model_mode, pgd
from saat_dist.config_fields import section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext, flipped, write_codes
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.models.adapter import as_hash_model
from saat_dist.training.steps import check_finite, hash_loss, hash_module


@section
class PGDATConfig(AdvTrainConfig):
    """PGD adversarial training (saat_dist.defences.pgd_at). No reference
    code: SAAT's budget, inner attack and schedule (SGD 0.05, weight decay
    1e-5, 20 epochs at batch 32)."""

    mu: Annotated[float, Field(ge=0, description="not used by PGD-AT")] = 0.0
    clean_weight: Annotated[float, Field(ge=0, description=(
        "weight of the clean hash loss (0: Madry's adversarial loss only)"))] = 1.0


@dataclass(init=False)
class PGDATSettings(PGDATConfig):
    """Deprecated: ``pgd_at_step`` takes the config section (``PGDATConfig``);
    this subclass keeps old calls working, positional arguments included.
    ``mode`` is the section's ``attack_mode``."""

    def __init__(self, eps: float = 8 / 255, step_size: float = 2 / 255, iters: int = 7, lam: float = 1.0,
                 clean_weight: float = 1.0, mode: str = "eval") -> None:
        warnings.warn("PGDATSettings is deprecated: pass the config section (saat_dist.defences.pgd_at.PGDATConfig)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(eps=eps, step_size=step_size, iters=iters, lam=lam, clean_weight=clean_weight,
                         attack_mode=mode)

    @property
    def mode(self) -> str:
        return self.attack_mode


def pgd_at_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: PGDATConfig, step: int,
                generator: torch.Generator | None = None, *, check: bool = True,
                hash_bank: CodeBank | None = None, keys: ItemKeys | None = None) -> dict[str, torch.Tensor]:
    """One step of plain PGD adversarial training on the benign hash loss:
    PGD *maximises* L_hash(F(x + delta), y) against the current bank, then
    clean_weight x L_hash(x) + lam x L_hash(x_adv)."""
    x, y, index = batch
    model = as_hash_model(model)  # a plain logits module: tanh codes, its parameters trained as they are
    net = hash_module(model)
    net.alpha = 1.0
    reads = hash_bank or bank

    def ascend(codes):  # pgd descends: the negated loss, spread over the batch's examples
        return -hash_loss(loss_fn, codes, y, reads)[0].expand(len(codes)) / len(codes)

    with model_mode(net, settings.attack_mode):
        x_adv = pgd(net, x, ascend, eps=settings.eps, step_size=settings.step_size, iters=settings.iters,
                    random_start=True, alpha_schedule=None, generator=generator,
                    keys=None if keys is None else keys.child("restart", 0))
    u = model(x)
    u_adv = model(x_adv)
    write_codes(bank, hash_bank, index, u)
    clean_loss, _ = hash_loss(loss_fn, u, y, reads)
    adv_loss, _ = hash_loss(loss_fn, u_adv, y, reads)
    loss = settings.clean_weight * clean_loss + settings.lam * adv_loss
    if check:
        check_finite(loss, "PGD-AT", step)
    stepper.backward(loss)
    stepper.step()
    return {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv_loss.detach(),
            "bits_flipped": flipped(u, u_adv)}


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    return pgd_at_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, ctx.section, step, check=False,
                       hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))


DEFENCE = Defence(name="pgd_at", label="PGD-AT", config=PGDATConfig, step=train_step, seed_offset=4, order=4)
