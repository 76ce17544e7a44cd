"""SAAT (docs/method.md §5): semantic-aware adversarial training guided by mainstay codes.

Per batch, in the reference order: b*(y) from the bank -> an inner PGD
pushing F(x + delta) away from b*(y) -> clean and adversarial forward ->
the batch's sign codes into the bank, b*(y) recomputed -> outer loss
L_hash(clean) + lam * (-mean(F(x_adv) b*)) + mu * mean((F(x_adv) - sign)^2).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from saat_dist.attacks.mainstay_pgd import pgd_attack
from saat_dist.config_fields import section
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext, flipped, write_codes
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.models.adapter import as_hash_model
from saat_dist.training.steps import check_finite, hash_loss, hash_module


@section
class SAATConfig(AdvTrainConfig):
    """SAAT adversarial training (saat_dist.defences.saat). Defaults: the
    reference (xandery-geek/SAAT adv_training.py): eps 8/255, step 2/255, 7
    iterations, lambda 1, mu 1e-4, SGD 0.05, weight decay 1e-5, lr x 0.1 at
    50 % and 75 % of the steps, 20 epochs at batch 32."""


@dataclass(init=False)
class SAATSettings(SAATConfig):
    """Deprecated: ``saat_step`` takes the config section itself
    (``SAATConfig``); this subclass keeps old calls working, positional
    arguments included. ``mode`` is the section's ``attack_mode``;
    ``weighting`` chooses mainstay (cosine) or centre (uniform, CgAT) guide
    codes."""

    weighting: str = "cosine"

    def __init__(self, eps: float = 8 / 255, step_size: float = 2 / 255, iters: int = 7, lam: float = 1.0,
                 mu: float = 1e-4, mode: str = "eval", weighting: str = "cosine") -> None:
        warnings.warn("SAATSettings is deprecated: pass the config section (saat_dist.defences.saat.SAATConfig)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(eps=eps, step_size=step_size, iters=iters, lam=lam, mu=mu, attack_mode=mode)
        self.weighting = weighting

    @property
    def mode(self) -> str:
        return self.attack_mode


def saat_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: SAATConfig, step: int,
              generator: torch.Generator | None = None, *, check: bool = True,
              hash_bank: CodeBank | None = None, keys: ItemKeys | None = None,
              weighting: str | None = None) -> dict[str, torch.Tensor]:
    """One SAAT minimax step, in the reference order:
    b*(y) -> inner PGD -> clean/adversarial forward -> bank update and b*
    recompute -> outer loss = L_hash + lam * L_adv + mu * L_quant.
    ``settings``: the section (eps, step_size, iters, lam, mu, attack_mode).
    ``hash_bank``: the bank the hash term reads (default: ``bank``, sign codes).
    ``weighting='uniform'`` makes it CgAT's step (``cgat_step``). Inner-attack
    starts come from ``keys`` (keyed by item) or ``generator``."""
    weighting = weighting or getattr(settings, "weighting", "cosine")
    x, y, index = batch
    model = as_hash_model(model)  # a plain logits module: tanh codes, its parameters trained as they are
    net = hash_module(model)
    net.alpha = 1.0
    guide = bank.mainstay(y, weighting).to(x.device)
    # The inner attack differentiates w.r.t. the input only, through the bare
    # model: a wrapper's backward hooks (DeepSpeed's) are for the outer loss.
    x_adv = pgd_attack(net, x, guide, eps=settings.eps, step_size=settings.step_size, iters=settings.iters,
                       targeted=False, random_start=True, alpha_schedule=None, loss="plain", generator=generator,
                       mode=settings.attack_mode, keys=keys)
    return saat_update(model, stepper, x, x_adv, y, index, bank, loss_fn, settings, step, check=check,
                       hash_bank=hash_bank, weighting=weighting)


def saat_loss(model, x, x_adv, y, index, bank: CodeBank, loss_fn, settings, *, hash_bank: CodeBank | None = None,
              weighting: str = "cosine") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAAT's outer loss after its inner attack, in the reference order:
    clean and adversarial forward -> the batch's sign codes into the bank,
    b*(y) recomputed -> L_hash(clean) + lam * (-mean(F(x_adv) b*)) + mu *
    mean((F(x_adv) - sign)^2). Returns (loss, the step's outputs)."""
    u = model(x)
    u_adv = model(x_adv)
    write_codes(bank, hash_bank, index, u)
    guide = bank.mainstay(y, weighting).to(x.device)
    clean_loss, _ = hash_loss(loss_fn, u, y, hash_bank or bank)
    adv = -(u_adv * guide).mean()
    quant = (u_adv - torch.sign(u_adv)).pow(2).mean()
    loss = clean_loss + settings.lam * adv + settings.mu * quant
    return loss, {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv.detach(), "quant": quant.detach(),
                  "bits_flipped": flipped(u, u_adv)}


def saat_update(model, stepper, x, x_adv, y, index, bank: CodeBank, loss_fn, settings, step: int, *,
                check: bool = True, hash_bank: CodeBank | None = None,
                weighting: str = "cosine") -> dict[str, torch.Tensor]:
    """``saat_loss``, its backward and the optimizer step (every SAAT mode's update)."""
    loss, out = saat_loss(model, x, x_adv, y, index, bank, loss_fn, settings, hash_bank=hash_bank,
                          weighting=weighting)
    if check:
        check_finite(loss, "SAAT", step)
    stepper.backward(loss)
    stepper.step()
    return out


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    return saat_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, ctx.section, step, check=False,
                     hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step))


DEFENCE = Defence(name="saat", label="SAAT", config=SAATConfig, step=train_step, seed_offset=1, order=1)
