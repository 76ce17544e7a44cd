"""What every defence shares: the config section's common fields, the
registry entry a defence file declares, and what a training step is handed.

A defence is one file (``defences/<name>.py``): its config section (a
dataclass with its paper's defaults, every field documented), its library
step function, and a ``Defence`` entry that the trainer, the experiment and
the reports find through ``saat_dist.defences.DEFENCES``. Adding one touches
that file, its section in ``RunConfig`` and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from saat_dist.keyed_random import ItemKeys
from saat_dist.training.optim import OptimConfig


@dataclass
class AdvTrainConfig:
    """What every adversarial-training defence's section holds: a training
    stage from the benign model with an inner PGD of ``iters`` steps. The
    defaults are the SAAT reference's; each defence states its own."""

    epochs: int = 20  # adversarial training epochs, starting from the benign model
    batch_size: int = 32  # the global batch: samples per optimizer step over all workers (each takes batch_size / workers)
    eps: float = 8 / 255  # L-inf budget of the inner maximisation
    step_size: float = 2 / 255  # inner PGD step
    iters: int = 7  # inner PGD iterations
    lam: float = 1.0  # weight of the adversarial term (lambda)
    mu: float = 1e-4  # weight of the quantisation term on adversarial codes (mu)
    attack_mode: Literal["eval", "train"] = "eval"  # model mode during the inner attack: eval (BatchNorm running statistics, no dropout; this project's default) or train (the reference: batch statistics, dropout on, running statistics updated by the attack's forwards)
    hash_bank: Literal["sign", "continuous"] = "sign"  # codes the benign hash term compares with: the bank of sign codes (this project's default) or a second bank of the continuous codes of each item's last forward (the reference's U); guide codes always come from sign codes
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.05, weight_decay=1e-5, milestones=[0.5, 0.75]))  # optimizer

    def problems(self, section: str) -> list[tuple[str, bool, str]]:
        """(key, ok, message) of this section's range checks."""
        return [
            (f"{section}.eps", 0 <= self.eps <= 1, "must be in [0, 1]"),
            (f"{section}.step_size", 0 < self.step_size <= 1, "must be in (0, 1]"),
            (f"{section}.iters", self.iters >= 1, "must be >= 1"),
            (f"{section}.lam", self.lam >= 0, "must be >= 0"),
            (f"{section}.mu", self.mu >= 0, "must be >= 0"),
        ]


@dataclass
class StepContext:
    """What a defence's training step is handed by the trainer, per stage."""

    model: Any  # the hash model, or the DeepSpeed engine around it
    stepper: Any  # backward(loss) / step(): a TorchStepper or the engine
    bank: Any  # the guide bank of sign codes (a CodeBank or SyncedBank)
    loss_fn: Any  # the benign hash loss
    section: Any  # the defence's config section
    seed: int
    stage: str
    hash_bank: Any = None  # the continuous bank of the hash term (hash_bank: continuous)
    extras: dict = field(default_factory=dict)  # what the defence's ``extras`` built
    rank: int = 0
    world: int = 1
    global_micro_batch: int = 0  # samples of one micro-batch over all workers

    def keys(self, batch, step: int) -> ItemKeys:
        """The inner attack's draws: keyed by (seed, stage, step, item)."""
        return ItemKeys.of(batch[2], self.seed, self.stage, step)


@dataclass
class ExtrasContext:
    """What a defence's ``extras`` hook may use to build the state it adds
    to the trainer's (banks, a PrototypeNet); that state is checkpointed."""

    section: Any
    new_bank: Callable[[], Any]  # another bank of this process's items, synced as the guide bank
    bank: Any
    num_classes: int
    label_sets: torch.Tensor
    bits: int
    seed: int
    device: Any
    rank: int
    world: int
    total_micro_steps: int


@dataclass(frozen=True)
class Defence:
    """A defence's registry entry."""

    name: str  # its config section, stage and experiment.defences name
    label: str  # how reports name it
    config: type  # its config section's dataclass (RunConfig must hold it under ``name``)
    step: Callable  # (StepContext, batch, step) -> the step's outputs
    seed_offset: int  # its stage's data order and model seed: seed + seed_offset (never reuse one)
    order: int  # its place in reports and in the default experiment.defences
    extras: Callable | None = None  # (ExtrasContext) -> {name: state with state_dict / load_state_dict}


def write_codes(bank, hash_bank, index, u) -> None:
    """The batch's sign codes into the guide bank; with a separate hash bank
    (``hash_bank: continuous``), its continuous codes there."""
    bank.update(index, torch.sign(u.detach()))
    if hash_bank is not None and hash_bank is not bank:
        hash_bank.update(index, u.detach())


def flipped(u, u_adv) -> torch.Tensor:
    """Share of bits whose sign the inner attack flipped."""
    return (torch.sign(u_adv.detach()) != torch.sign(u.detach())).float().mean()
