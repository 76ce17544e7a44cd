"""One training step each for benign hashing, SAAT (SAAT.md §5) and the
baseline defences CgAT, ATRDH and PGD-AT.

Steps are functions of (model, stepper, batch, bank, ...). ``stepper`` is
anything with ``backward(loss)`` and ``step()``: ``TorchStepper`` around a
torch optimizer here, or a DeepSpeed engine as is, so a distributed trainer
calls these functions unchanged. ``model`` may be a DeepSpeed engine too
(its ``module`` is the hash model).

The inner attacks' random starts come from ``keys`` (an ``ItemKeys`` of the
batch's items and the step: the trainer's choice, so that a sample draws the
same start whichever worker trains it) or, without keys, from ``generator``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from saat_dist.attacks.mainstay_pgd import pgd_attack
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank


class TorchStepper:
    """backward/step over a plain torch optimizer, an optional LR scheduler,
    optional gradient clipping by global norm (``clip`` > 0; as DeepSpeed's
    ``gradient_clipping``) and gradient accumulation over ``accumulate``
    micro-batches (as DeepSpeed's engine: each backward scales the loss by
    1 / accumulate, and only every accumulate-th ``step()`` updates)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None, *, clip: float = 0.0,
                 accumulate: int = 1) -> None:
        self.optimizer, self.scheduler, self.clip, self.accumulate = optimizer, scheduler, clip, accumulate
        self.micro_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulate if self.accumulate > 1 else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulate:
            return
        if self.clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


def hash_module(model: nn.Module) -> nn.Module:
    """The HashModel inside a wrapper (DeepSpeed engine, DDP) or the model itself."""
    return getattr(model, "module", model)


def hash_loss(loss_fn, u, y, bank: CodeBank | None):
    """The benign hash loss of codes ``u``: from the bank's N-independent
    statistics when the loss has that form (DPH) and the bank keeps them,
    else from the bank's codes (DPSH, HashNet) or from nothing (CSQ)."""
    if not loss_fn.uses_bank:
        return loss_fn(u, y)
    if getattr(loss_fn, "use_stats", False) and hasattr(bank, "dph_stats"):
        return loss_fn.from_stats(u, y, *bank.dph_stats())
    return loss_fn(u, y, bank.codes.to(u.device), bank.labels.to(u.device, u.dtype))


def check_finite(loss: torch.Tensor, what: str, step: int) -> None:
    """Stop loudly on a non-finite loss (a host sync: the trainer calls it on log steps only)."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"{what} loss is not finite at step {step}: stopping the run")


def benign_step(model, stepper, batch, bank: CodeBank | None, loss_fn, step: int, *,
                check: bool = True) -> dict[str, torch.Tensor]:
    """One step of benign deep hashing. The batch's own codes enter the bank
    before the loss (as the reference does), so bank losses see them.
    ``check=False`` skips the finiteness check (a host sync), as the trainer
    does between log steps."""
    x, y, index = batch
    hash_module(model).alpha = loss_fn.tanh_scale(step)
    u = model(x)
    if loss_fn.uses_bank:
        bank.update(index, u.detach())
    loss, parts = hash_loss(loss_fn, u, y, bank)
    if check:
        check_finite(loss, "benign", step)
    stepper.backward(loss)
    stepper.step()
    return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}


@dataclass
class SAATSettings:
    eps: float = 8 / 255  # L-inf budget of the inner maximisation
    step_size: float = 2 / 255  # PGD step of the inner maximisation
    iters: int = 7  # PGD iterations of the inner maximisation
    lam: float = 1.0  # weight of the adversarial (mainstay) term
    mu: float = 1e-4  # weight of the quantisation term on adversarial codes
    mode: str = "eval"  # the model's mode during the inner attack (attacks.model_mode)
    weighting: str = "cosine"  # guide codes: mainstay (cosine, SAAT) or centre codes (uniform, CgAT)


def _write_codes(bank, hash_bank, index, u) -> None:
    """The batch's sign codes into the guide bank; with a separate hash bank
    (``hash_bank: continuous``), its continuous codes there."""
    bank.update(index, torch.sign(u.detach()))
    if hash_bank is not None and hash_bank is not bank:
        hash_bank.update(index, u.detach())


def saat_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: SAATSettings, step: int,
              generator: torch.Generator | None = None, *, check: bool = True,
              hash_bank: CodeBank | None = None, keys: ItemKeys | None = None) -> dict[str, torch.Tensor]:
    """One SAAT minimax step, in the reference order:
    b*(y) -> inner PGD -> clean/adversarial forward -> bank update and b*
    recompute -> outer loss = L_hash + lam * L_adv + mu * L_quant.
    ``hash_bank``: the bank the hash term reads (default: ``bank``, sign codes).
    With ``settings.weighting='uniform'`` this is CgAT's step (``cgat_step``)."""
    x, y, index = batch
    net = hash_module(model)
    net.alpha = 1.0
    guide = bank.mainstay(y, settings.weighting).to(x.device)
    # The inner attack differentiates w.r.t. the input only, through the bare
    # model: a wrapper's backward hooks (DeepSpeed's) are for the outer loss.
    x_adv = pgd_attack(net, x, guide, eps=settings.eps, step_size=settings.step_size, iters=settings.iters,
                       targeted=False, random_start=True, alpha_schedule=None, loss="plain", generator=generator,
                       mode=settings.mode, keys=keys)
    u = model(x)
    u_adv = model(x_adv)
    _write_codes(bank, hash_bank, index, u)
    guide = bank.mainstay(y, settings.weighting).to(x.device)
    clean_loss, _ = hash_loss(loss_fn, u, y, hash_bank or bank)
    adv = -(u_adv * guide).mean()
    quant = (u_adv - torch.sign(u_adv)).pow(2).mean()
    loss = clean_loss + settings.lam * adv + settings.mu * quant
    if check:
        check_finite(loss, "SAAT", step)
    stepper.backward(loss)
    stepper.step()
    return {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv.detach(), "quant": quant.detach(),
            "bits_flipped": _flipped(u, u_adv)}


def cgat_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: SAATSettings, step: int,
              generator: torch.Generator | None = None, *, check: bool = True,
              hash_bank: CodeBank | None = None, keys: ItemKeys | None = None) -> dict[str, torch.Tensor]:
    """One CgAT step (Wang et al., WWW 2023): SAAT's step with the centre code
    (uniform weights over relevant and irrelevant items) as the guide."""
    return saat_step(model, stepper, batch, bank, loss_fn, replace(settings, weighting="uniform"), step,
                     generator, check=check, hash_bank=hash_bank, keys=keys)


def _flipped(u, u_adv) -> torch.Tensor:
    return (torch.sign(u_adv.detach()) != torch.sign(u.detach())).float().mean()


def pairwise_to_bank(u, y, bank) -> torch.Tensor:
    """The DPH form sum_j (u . U_j / K - s_ij)^2 / (N B) of any codes against a
    bank (N-independent when the bank keeps its statistics): ATRDH's term that
    adversarial codes keep the clean codes' pairwise similarities."""
    from saat_dist.hashing import DPHLoss

    return hash_loss(DPHLoss(), u, y, bank)[0]


@dataclass
class ATRDHSettings:
    eps: float = 8 / 255  # L-inf budget of the targeted inner attack
    step_size: float = 2 / 255  # its PGD step
    iters: int = 7  # its PGD iterations
    adv_weight: float = 2.0  # weight of the adversarial pairwise term
    mode: str = "eval"  # the model's mode during the inner attack


def atrdh_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: ATRDHSettings, step: int,
               generator: torch.Generator | None, prototypes, *, check: bool = True,
               hash_bank: CodeBank | None = None, keys: ItemKeys | None = None, adv_bank: CodeBank | None = None,
               targets: tuple[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One ATRDH step (Wang et al., SIGIR 2021): a PrototypeNet step on random
    label sets against the bank's codes, PGD pulling the batch toward their
    target codes, then L_hash(clean) + adv_weight x pairwise_to_bank(adversarial
    codes). The PrototypeNet trains against the bank as it stands before this
    batch's codes are written (the reference writes them first: one batch
    later here). ``adv_bank``: the bank of the pairwise term (the reference's
    U_ben, continuous codes starting at zeros; default: the hash term's).
    ``targets`` = (n, rows): the PrototypeNet steps on the n label sets of the
    whole (global) batch and this process attacks toward those at ``rows``
    (default: n = this batch, every row)."""
    x, y, index = batch
    net = hash_module(model)
    net.alpha = 1.0
    n, rows = targets if targets is not None else (len(x), None)
    _, target_codes = prototypes.step(bank.codes, bank.labels, n)
    if rows is not None:
        target_codes = target_codes[rows.to(target_codes.device)]
    x_adv = pgd_attack(net, x, torch.sign(target_codes).to(x.device), eps=settings.eps,
                       step_size=settings.step_size, iters=settings.iters, targeted=True, random_start=True,
                       alpha_schedule=None, loss="plain", generator=generator, mode=settings.mode, keys=keys)
    u = model(x)
    u_adv = model(x_adv)
    _write_codes(bank, hash_bank, index, u)
    if adv_bank is not None and adv_bank is not hash_bank:
        adv_bank.update(index, u.detach())
    clean_loss, _ = hash_loss(loss_fn, u, y, hash_bank or bank)
    adv = pairwise_to_bank(u_adv, y, adv_bank or hash_bank or bank)
    loss = clean_loss + settings.adv_weight * adv
    if check:
        check_finite(loss, "ATRDH", step)
    stepper.backward(loss)
    stepper.step()
    return {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv.detach(), "bits_flipped": _flipped(u, u_adv)}


@dataclass
class PGDATSettings:
    eps: float = 8 / 255  # L-inf budget of the inner maximisation
    step_size: float = 2 / 255  # its PGD step
    iters: int = 7  # its PGD iterations
    lam: float = 1.0  # weight of the hash loss of adversarial examples
    clean_weight: float = 1.0  # weight of the clean hash loss (0: Madry's adversarial loss only)
    mode: str = "eval"  # the model's mode during the inner attack


def pgd_at_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: PGDATSettings, step: int,
                generator: torch.Generator | None = None, *, check: bool = True,
                hash_bank: CodeBank | None = None, keys: ItemKeys | None = None) -> dict[str, torch.Tensor]:
    """One step of plain PGD adversarial training on the benign hash loss
    (Madry et al.): PGD *maximises* L_hash(F(x + delta), y) against the current
    bank, then clean_weight x L_hash(x) + lam x L_hash(x_adv)."""
    x, y, index = batch
    net = hash_module(model)
    net.alpha = 1.0
    reads = hash_bank or bank

    def ascend(codes):  # pgd descends: the negated loss, spread over the batch's examples
        return -hash_loss(loss_fn, codes, y, reads)[0].expand(len(codes)) / len(codes)

    from saat_dist.attacks.mainstay_pgd import model_mode, pgd

    with model_mode(net, settings.mode):
        x_adv = pgd(net, x, ascend, eps=settings.eps, step_size=settings.step_size, iters=settings.iters,
                    random_start=True, alpha_schedule=None, generator=generator,
                    keys=None if keys is None else keys.child("restart", 0))
    u = model(x)
    u_adv = model(x_adv)
    _write_codes(bank, hash_bank, index, u)
    clean_loss, _ = hash_loss(loss_fn, u, y, reads)
    adv_loss, _ = hash_loss(loss_fn, u_adv, y, reads)
    loss = settings.clean_weight * clean_loss + settings.lam * adv_loss
    if check:
        check_finite(loss, "PGD-AT", step)
    stepper.backward(loss)
    stepper.step()
    return {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv_loss.detach(),
            "bits_flipped": _flipped(u, u_adv)}
