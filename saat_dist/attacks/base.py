"""What every attack of the evaluation suite declares and is handed.

An attack is one file of ``saat_dist.attacks``: its library function (pixel
space, any hash model: ``forward(x, alpha)``, or a plain ``forward(x)`` of
logits through ``models.adapter.as_hash_model``), its config section (a
dataclass with its paper's defaults, a field of the run config's ``attack``
section) and one or more ``Attack`` entries in a module-level ``ATTACKS``
tuple, which ``saat_dist.attacks.ATTACK_REGISTRY`` finds. The evaluation
hands an entry's ``run`` an ``AttackContext`` and a batch of queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from saat_dist.keyed_random import ItemKeys


@dataclass
class AttackOutput:
    adversarial: torch.Tensor  # B x C x H x W
    starts: list[torch.Tensor]  # where the attack started: the query, and each of its random starts
    first: torch.Tensor | None = None  # the mainstay attack's first restart alone (one run, as the others make)


@dataclass
class AttackContext:
    """What an attack's ``run`` may use: the ``attack`` config section, the
    attacked model and device, guide codes, targets, the training and
    database codes, keyed draws, and what its ``prepare`` built."""

    settings: Any  # the run config's ``attack`` section
    model: Any
    device: Any
    seed: int
    guide_of: Callable[..., torch.Tensor]  # labels (B x C) -> mainstay codes (B x K); weighting="uniform": centre codes
    targets: torch.Tensor  # per query: a database label set sharing no label with it (all zero: none)
    valid: torch.Tensor  # per query: it has such a target
    tr_codes: torch.Tensor
    tr_lab: torch.Tensor
    db_codes: torch.Tensor
    db_lab: torch.Tensor
    log_every_s: float = 10.0
    rank: int = 0
    prepared: dict = field(default_factory=dict)  # attack name -> what its ``prepare`` returned

    def keys(self, index: torch.Tensor, name: str) -> ItemKeys:
        """An attack's keyed draws for these queries: the same in every
        evaluation of every model, whatever the worker."""
        return ItemKeys.of(index, self.seed, "attack", name).to(self.device)


@dataclass(frozen=True)
class Attack:
    """An attack's registry entry."""

    name: str  # its experiment.attacks name
    label: str  # how reports name it
    kind: str  # "untargeted" or "targeted" (run on the queries with a target, toward it)
    budget: Callable[[Any], tuple[float, int, int]]  # attack section -> (eps, iterations per run, restarts)
    run: Callable  # (AttackContext, x, labels, index) -> AttackOutput; targeted: labels are the targets
    order: int  # place in reports and in the default experiment.attacks
    whitebox: bool = True  # False: forward passes only (compared against the white-box ones)
    prepare: Callable | None = None  # (AttackContext) -> what run needs, once per evaluation on every rank, the same on each (keyed draws, or rank 0's broadcast as THA's PrototypeNet)
    queries: Callable | None = None  # (attack section, n) -> how many of the first queries it attacks (None: all)
    default: bool = True  # in the default experiment.attacks
