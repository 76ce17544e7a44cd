"""DHTA (Bai et al., "Targeted attack for deep hashing based retrieval", ECCV
2020) and P2P: pull the query's code toward an anchor code of the target
label set, the sign of the sum of ``anchors`` database codes of items whose
label set is exactly the target's (chosen at random, with replacement, as the
reference); P2P is DHTA with a single anchor. The attack is PGD on
-mean(F(x + delta) * anchor) without a random start, alpha on the 10-phase
schedule (``pgd_attack(targeted=True, loss="plain", random_start=False)``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.attacks.mainstay_pgd import ALPHA_SCHEDULE, pgd_attack
from saat_dist.config_fields import Budget, StepSize, section


@section
class AnchorAttackConfig:
    """DHTA (Bai et al.): PGD toward an anchor of 9 codes of the target label set."""

    iters: Annotated[int, Field(ge=1, description="PGD iterations toward the anchor code (DHTA paper's default)")] = 2000
    eps: Annotated[Budget | None, Field(description=(
        "budget, a number or N/255 (null: attack.eps; the reference's DHTA uses 0.032)"))] = None
    step_size: Annotated[StepSize, Field(description="PGD step (a number or N/255)")] = 1 / 255
    anchors: Annotated[int, Field(ge=1, description=(
        "anchor = sign of the sum of this many database codes of the target label set (P2P: 1)"))] = 9


def anchor_codes(target_labels_BC: torch.Tensor, db_codes_NK: torch.Tensor, db_labels_NC: torch.Tensor,
                 anchors: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """B x K anchor codes in {-1, 0, +1} (0: a tie in the sum). A target label
    set no database item has exactly gets an all-zero anchor (no pull)."""
    targets = target_labels_BC.to("cpu", torch.int64)
    db = db_labels_NC.to("cpu", torch.int64)
    codes = db_codes_NK.to("cpu", torch.float32)
    uniq, inverse = torch.unique(torch.cat([targets, db]), dim=0, return_inverse=True)
    t_id, d_id = inverse[: len(targets)], inverse[len(targets):]
    out = torch.zeros(len(targets), codes.shape[1])
    order = torch.argsort(d_id, stable=True)
    starts = torch.searchsorted(d_id[order], torch.arange(len(uniq)))
    ends = torch.searchsorted(d_id[order], torch.arange(len(uniq)), right=True)
    for i, t in enumerate(t_id.tolist()):
        n = int(ends[t] - starts[t])
        if n == 0:
            continue
        pick = torch.randint(0, n, (anchors,), generator=generator)
        out[i] = torch.sign(codes[order[starts[t] + pick]].sum(0))
    return out.to(target_labels_BC.device)


def target_code_attack(model: nn.Module, x_BCHW: torch.Tensor, target_BK: torch.Tensor, *, eps: float,
                       step_size: float, iters: int, alpha_schedule: tuple[float, ...] | None = ALPHA_SCHEDULE,
                       mode: str = "eval") -> torch.Tensor:
    """PGD toward a target code, as DHTA, P2P (anchor codes) and THA
    (PrototypeNet codes) run it: -mean(F * t), no random start."""
    return pgd_attack(model, x_BCHW, target_BK, eps=eps, step_size=step_size, iters=iters, targeted=True,
                      random_start=False, alpha_schedule=alpha_schedule, loss="plain", mode=mode)


def _anchor_attack(name: str):
    def prepare(ctx: AttackContext) -> torch.Tensor:
        c = getattr(ctx.settings, name)
        return anchor_codes(ctx.targets, ctx.db_codes, ctx.db_lab, c.anchors,
                            torch.Generator().manual_seed(ctx.seed + 31 + c.anchors))

    def run(ctx: AttackContext, x, targets, index) -> AttackOutput:
        c = getattr(ctx.settings, name)
        eps = ctx.settings.eps if c.eps is None else c.eps
        adv = target_code_attack(ctx.model, x, ctx.prepared[name][index].to(ctx.device), eps=eps,
                                 step_size=c.step_size, iters=c.iters)
        return AttackOutput(adv, [x])

    return prepare, run


def _budget(name: str):
    def budget(a):
        c = getattr(a, name)
        return (a.eps if c.eps is None else c.eps, c.iters, 1)
    return budget


_DHTA, _P2P = _anchor_attack("dhta"), _anchor_attack("p2p")
ATTACKS = (Attack("dhta", "DHTA", "targeted", _budget("dhta"), _DHTA[1], order=91, prepare=_DHTA[0]),
           Attack("p2p", "P2P", "targeted", _budget("p2p"), _P2P[1], order=92, prepare=_P2P[0]))
