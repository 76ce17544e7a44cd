"""The benign training step and what every training step shares: the
stepper around a torch optimizer, the hash loss from the bank's statistics,
the finiteness check. The defences' steps (SAAT, CgAT, ATRDH, PGD-AT) live
in ``saat_dist.defences``, one file each.

Steps are functions of (model, stepper, batch, bank, ...). ``stepper`` is
anything with ``backward(loss)`` and ``step()``: ``TorchStepper`` around a
torch optimizer here, or a DeepSpeed engine as is, so a distributed trainer
calls these functions unchanged. ``model`` may be a DeepSpeed engine too
(its ``module`` is the hash model).
"""

from __future__ import annotations

import torch
from torch import nn

from saat_dist.mainstay import CodeBank
from saat_dist.models.adapter import as_hash_model


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


def advance_schedule(stepper, steps: int) -> None:
    """Move the lr schedule on by ``steps`` updates that were not made (a
    TorchStepper's scheduler or a DeepSpeed engine's)."""
    scheduler = getattr(stepper, "scheduler", None) or getattr(stepper, "lr_scheduler", None)
    for _ in range(steps if scheduler is not None else 0):
        scheduler.step()


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
    model = as_hash_model(model)  # a plain forward(x) module too
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

