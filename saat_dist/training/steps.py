"""One training step each for benign hashing and SAAT (SAAT.md §5).

Steps are functions of (model, stepper, batch, bank, ...). ``stepper`` is
anything with ``backward(loss)`` and ``step()``: ``TorchStepper`` around a
torch optimizer here, or a DeepSpeed engine as is, so a distributed trainer
calls these functions unchanged. ``model`` may be a DeepSpeed engine too
(its ``module`` is the hash model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saat_dist.attacks.mainstay_pgd import pgd_attack
from saat_dist.mainstay import CodeBank


class TorchStepper:
    """backward/step over a plain torch optimizer, an optional LR scheduler and
    optional gradient clipping by global norm (``clip`` > 0; as DeepSpeed's
    ``gradient_clipping``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler=None, *, clip: float = 0.0) -> None:
        self.optimizer, self.scheduler, self.clip = optimizer, scheduler, clip

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
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


def saat_step(model, stepper, batch, bank: CodeBank, loss_fn, settings: SAATSettings, step: int,
              generator: torch.Generator | None = None, *, check: bool = True) -> dict[str, torch.Tensor]:
    """One SAAT minimax step, in the reference order:
    b*(y) -> inner PGD -> clean/adversarial forward -> bank update and b*
    recompute -> outer loss = L_hash + lam * L_adv + mu * L_quant."""
    x, y, index = batch
    net = hash_module(model)
    net.alpha = 1.0
    guide = bank.mainstay(y).to(x.device)
    # The inner attack differentiates w.r.t. the input only, through the bare
    # model: a wrapper's backward hooks (DeepSpeed's) are for the outer loss.
    x_adv = pgd_attack(net, x, guide, eps=settings.eps, step_size=settings.step_size, iters=settings.iters,
                       targeted=False, random_start=True, alpha_schedule=None, loss="plain", generator=generator)
    u = model(x)
    u_adv = model(x_adv)
    bank.update(index, torch.sign(u.detach()))
    guide = bank.mainstay(y).to(x.device)
    clean_loss, _ = hash_loss(loss_fn, u, y, bank)
    adv = -(u_adv * guide).mean()
    quant = (u_adv - torch.sign(u_adv)).pow(2).mean()
    loss = clean_loss + settings.lam * adv + settings.mu * quant
    if check:
        check_finite(loss, "SAAT", step)
    stepper.backward(loss)
    stepper.step()
    flipped = (torch.sign(u_adv.detach()) != torch.sign(u.detach())).float().mean()
    return {"loss": loss.detach(), "hash": clean_loss.detach(), "adv": adv.detach(), "quant": quant.detach(),
            "bits_flipped": flipped}
