"""ATRDH (Wang et al., SIGIR 2021, "Targeted attack and defense for deep hashing").

A PrototypeNet learns a target code per label set (circle loss against the
bank); the inner PGD pulls the batch toward the target codes of random label
sets; the outer loss is L_hash(clean) + adv_weight x the DPH loss of the
adversarial codes against the bank (adversarial codes keep the clean codes'
pairwise similarities).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from saat_dist.attacks.mainstay_pgd import pgd_attack
from saat_dist.attacks.prototype import PrototypeTrainer
from saat_dist.comm.collectives import all_gather_ragged, all_reduce_sum
from saat_dist.config_fields import field, section
from saat_dist.defences.base import AdvTrainConfig, Defence, ExtrasContext, StepContext, flipped, write_codes
from saat_dist.hashing import DPHLoss
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.models.adapter import as_hash_model
from saat_dist.training.optim import OptimConfig
from saat_dist.training.steps import check_finite, hash_loss, hash_module


@section
class ATRDHConfig(AdvTrainConfig):
    """ATRDH adversarial training (saat_dist.defences.atrdh). Defaults: the
    reference (xandery-geek/SAAT model/defense_model/atrdh.py): eps 8/255,
    step 2/255, 7 iterations, Adam 1e-4 with betas (0.5, 0.999) for the hash
    model and the PrototypeNet, lr x 0.1 at 50 % and 75 %, adversarial weight
    2, 100 epochs at batch 32."""

    epochs: Annotated[int, Field(ge=0, description="adversarial training epochs (the reference's 100)")] = 100
    mu: Annotated[float, Field(ge=0, description="not used by ATRDH")] = 0.0
    adv_weight: Annotated[float, Field(ge=0, description=(
        "weight of the adversarial pairwise term (the reference's 2)"))] = 2.0
    pnet_lr: Annotated[float, Field(gt=0, description=(
        "PrototypeNet's Adam learning rate (betas 0.5, 0.999, lr x 0.1 at 50 % and 75 %)"))] = 1e-4
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="adam", lr=1e-4, betas=[0.5, 0.999], milestones=[0.5, 0.75]), description="optimizer of the hash model")


@dataclass(init=False)
class ATRDHSettings(ATRDHConfig):
    """Deprecated: ``atrdh_step`` takes the config section (``ATRDHConfig``);
    this subclass keeps old calls working, positional arguments included.
    ``mode`` is the section's ``attack_mode``."""

    def __init__(self, eps: float = 8 / 255, step_size: float = 2 / 255, iters: int = 7, adv_weight: float = 2.0,
                 mode: str = "eval") -> None:
        warnings.warn("ATRDHSettings is deprecated: pass the config section (saat_dist.defences.atrdh.ATRDHConfig)",
                      DeprecationWarning, stacklevel=2)
        super().__init__(eps=eps, step_size=step_size, iters=iters, adv_weight=adv_weight, attack_mode=mode)

    @property
    def mode(self) -> str:
        return self.attack_mode


def pairwise_to_bank(u, y, bank) -> torch.Tensor:
    """The DPH form sum_j (u . U_j / K - s_ij)^2 / (N B) of any codes against a
    bank (N-independent when the bank keeps its statistics): ATRDH's term that
    adversarial codes keep the clean codes' pairwise similarities."""
    return hash_loss(DPHLoss(), u, y, bank)[0]


def atrdh_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: ATRDHConfig, step: int,
               generator: torch.Generator | None, prototypes, *, check: bool = True,
               hash_bank: CodeBank | None = None, keys: ItemKeys | None = None, adv_bank: CodeBank | None = None,
               targets: tuple[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One ATRDH step: a PrototypeNet step on random label sets against the
    bank's codes, PGD pulling the batch toward their target codes, then
    L_hash(clean) + adv_weight x pairwise_to_bank(adversarial codes). The
    PrototypeNet trains against the bank as it stands before this batch's
    codes are written (the reference writes them first: one batch later
    here). ``adv_bank``: the bank of the pairwise term (the reference's
    U_ben, continuous codes starting at zeros; default: the hash term's).
    ``targets`` = (n, rows): the PrototypeNet steps on the n label sets of
    the whole (global) batch and this process attacks toward those at
    ``rows`` (default: n = this batch, every row)."""
    x, y, index = batch
    model = as_hash_model(model)  # a plain logits module: tanh codes, its parameters trained as they are
    net = hash_module(model)
    net.alpha = 1.0
    n, rows = targets if targets is not None else (len(x), None)
    _, target_codes = prototypes.step(bank.codes, bank.labels, n)
    if rows is not None:
        target_codes = target_codes[rows.to(target_codes.device)]
    x_adv = pgd_attack(net, x, torch.sign(target_codes).to(x.device), eps=settings.eps,
                       step_size=settings.step_size, iters=settings.iters, targeted=True, random_start=True,
                       alpha_schedule=None, loss="plain", generator=generator, mode=settings.attack_mode, keys=keys)
    u = model(x)
    u_adv = model(x_adv)
    write_codes(bank, hash_bank, index, u)
    if adv_bank is not None and adv_bank is not hash_bank:
        adv_bank.update(index, u.detach())
    clean_loss, _ = hash_loss(loss_fn, u, y, hash_bank or bank)
    adv = pairwise_to_bank(u_adv, y, adv_bank or hash_bank or bank)
    loss = clean_loss + settings.adv_weight * adv
    if check:
        check_finite(loss, "ATRDH", step)
    stepper.backward(loss)
    stepper.step()
    return {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv.detach(), "bits_flipped": flipped(u, u_adv)}


def extras(ctx: ExtrasContext) -> dict:
    """The PrototypeNet, the same on every process (when each holds only its
    own items' codes, its circle loss combines exactly across them: see
    ``attacks.prototype``); in continuous mode, the pairwise term's bank from zeros."""
    split = ctx.world > 1 and not getattr(ctx.bank, "share_codes", True)
    out = {"prototypes": PrototypeTrainer(
        ctx.num_classes, ctx.bits, ctx.label_sets, total_steps=max(1, ctx.total_micro_steps), seed=ctx.seed + 77,
        device=ctx.device, lr=ctx.section.pnet_lr, betas=(0.5, 0.999),
        gather=all_gather_ragged if split else None, all_reduce=all_reduce_sum if split else None,
        world=ctx.world if split else 1)}
    if ctx.section.hash_bank == "continuous":
        out["adv_bank"] = ctx.new_bank()
    return out


def train_step(ctx: StepContext, batch, step: int) -> dict[str, torch.Tensor]:
    # the PrototypeNet steps on the label sets of the whole global micro-batch, the same on every
    # rank; rank r's samples are that micro-batch's positions r, r + W, ... (data.order)
    n = ctx.global_micro_batch
    rows = torch.arange(ctx.rank, n, ctx.world)
    return atrdh_step(ctx.model, ctx.stepper, batch, ctx.bank, ctx.loss_fn, ctx.section, step, None,
                      ctx.extras["prototypes"], check=False, hash_bank=ctx.hash_bank, keys=ctx.keys(batch, step),
                      adv_bank=ctx.extras.get("adv_bank"), targets=(n, rows))


DEFENCE = Defence(name="atrdh", label="ATRDH", config=ATRDHConfig, step=train_step, seed_offset=3, extras=extras, order=2)
