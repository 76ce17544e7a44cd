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
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from saat_dist.config_fields import Budget, StepSize, field, section
from saat_dist.keyed_random import ItemKeys
from saat_dist.training.optim import OptimConfig


@section
class AdvTrainConfig:
    """What every adversarial-training defence's section holds: a training
    stage from the benign model with an inner PGD of ``iters`` steps. The
    defaults are the SAAT reference's; each defence states its own."""

    epochs: Annotated[int, Field(ge=0, description="adversarial training epochs, starting from the benign model")] = 20
    batch_size: Annotated[int, Field(ge=2, description=(
        "the global batch: samples per optimizer step over all workers (each takes batch_size / workers); "
        "BatchNorm needs two"))] = 32
    eps: Annotated[Budget, Field(description="L-inf budget of the inner maximisation (a number or N/255)")] = 8 / 255
    step_size: Annotated[StepSize, Field(description="inner PGD step (a number or N/255)")] = 2 / 255
    iters: Annotated[int, Field(ge=1, description="inner PGD iterations")] = 7
    lam: Annotated[float, Field(ge=0, description="weight of the adversarial term (lambda)")] = 1.0
    mu: Annotated[float, Field(ge=0, description="weight of the quantisation term on adversarial codes (mu)")] = 1e-4
    attack_mode: Annotated[Literal["eval", "train"], Field(description=(
        "model mode during the inner attack: eval (BatchNorm running statistics, no dropout; this project's "
        "default) or train (the reference: batch statistics, dropout on, running statistics updated by the "
        "attack's forwards)"))] = "eval"
    hash_bank: Annotated[Literal["sign", "continuous"], Field(description=(
        "codes the benign hash term compares with: the bank of sign codes (this project's default) or a second "
        "bank of the continuous codes of each item's last forward (the reference's U); guide codes always come "
        "from sign codes"))] = "sign"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.05, weight_decay=1e-5, milestones=[0.5, 0.75]), description="optimizer")


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
    extras: dict = dataclass_field(default_factory=dict)  # what the defence's ``extras`` built
    rank: int = 0
    world: int = 1
    global_micro_batch: int = 0  # samples of one micro-batch over all workers
    total_steps: int = 0  # optimizer steps of the stage (a curriculum's phases are fractions of them)

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
    # the first n training items (x float in [0, 1], y, index) in stored order, on this device, the same on
    # every rank: a fixed probe set (the overfitting guard's)
    probe_batch: Callable[[int], tuple] | None = None


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
    # (StepContext, epoch) -> values added to the epoch's history (a collective: every rank calls it)
    epoch_end: Callable | None = None
    # (section) -> optimizer updates per trainer step (free training replays a batch m times): the lr schedule
    # counts updates, not batches
    updates_per_step: Callable | None = None
    # in the default experiment.defences (the paper's protocol); the fast SAAT modes are opt-in
    in_default_experiment: bool = True


def write_codes(bank, hash_bank, index, u) -> None:
    """The batch's sign codes into the guide bank; with a separate hash bank
    (``hash_bank: continuous``), its continuous codes there."""
    bank.update(index, torch.sign(u.detach()))
    if hash_bank is not None and hash_bank is not bank:
        hash_bank.update(index, u.detach())


def flipped(u, u_adv) -> torch.Tensor:
    """Share of bits whose sign the inner attack flipped."""
    return (torch.sign(u_adv.detach()) != torch.sign(u.detach())).float().mean()
