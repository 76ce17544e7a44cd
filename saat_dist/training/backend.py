"""What drives the model in this process: a plain torch optimizer.

A backend gives the training loop four things: ``model`` (what the steps
call forward on), ``stepper`` (``backward(loss)`` and ``step()``),
``module`` (the bare HashModel), and save/load of the model and optimizer
state into a checkpoint directory. ``LocalBackend`` is the in-process one;
``saat_dist.distributed.deepspeed_setup.DeepSpeedBackend`` wraps a
DeepSpeed engine with the same surface, and is the only module that knows
DeepSpeed's specifics (ZeRO-3 gathered parameters and state dicts).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from saat_dist.checkpoint import load_state, save_state
from saat_dist.training.optim import OptimConfig, build_optimizer, build_scheduler
from saat_dist.training.steps import TorchStepper

STATE_FILE = "model-optimizer.pt"


class LocalBackend:
    def __init__(self, model: nn.Module, optim: OptimConfig, schedule, gradient_clipping: float = 0.0) -> None:
        """``schedule``: the stage's ``trainer.Schedule`` (global batch, micro-batches, steps)."""
        self.model = self.module = model
        optimizer = build_optimizer(model.parameters(), optim, schedule.global_batch)
        scheduler = build_scheduler(optimizer, optim, schedule.total_steps, schedule.steps_per_epoch,
                                    schedule.global_batch)
        self.stepper = TorchStepper(optimizer, scheduler, clip=gradient_clipping, accumulate=schedule.grad_accum)

    def save(self, directory: Path) -> None:
        s = self.stepper
        save_state({"model": self.module.state_dict(), "optimizer": s.optimizer.state_dict(),
                    "scheduler": s.scheduler.state_dict()}, Path(directory) / STATE_FILE)

    def load(self, directory: Path) -> None:
        state = load_state(Path(directory) / STATE_FILE)
        self.module.load_state_dict(state["model"])
        self.stepper.optimizer.load_state_dict(state["optimizer"])
        self.stepper.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def parameter_digest(self) -> str:
        return parameter_digest(self.module.named_parameters())


def parameter_digest(named_parameters, gather=None) -> str:
    """sha256 of the full parameters in name order (``gather(p)``: a context
    that materialises a partitioned parameter)."""
    import contextlib

    h = hashlib.sha256()
    for name, p in sorted(named_parameters, key=lambda kv: kv[0]):
        with (gather(p) if gather else contextlib.nullcontext()):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
