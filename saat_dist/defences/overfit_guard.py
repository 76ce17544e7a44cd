"""The catastrophic-overfitting guard of the single-step SAAT modes.

Single-step adversarial training can collapse within an epoch: the model
becomes robust to its own one-step attack while a multi-step attack breaks
it completely, and clean mAP holds, so neither the loss nor clean numbers
show it (Wong et al., ICLR 2020, §5; de Jorge et al., NeurIPS 2022). The
guard probes for it once per epoch on a fixed set of training items
(``probe_size``, the same on every rank): the alignment mean(sign(F(x')) *
b*(y)) of their codes with their mainstay codes, clean, under the mode's
single step (FGSM from a random start) and under a ``probe_iters``-step PGD
of the stage's budget. Collapse is the PGD alignment falling ``drop`` below
its best of the stage while the clean alignment holds (within
``clean_tolerance`` of its best). Then the guard reports it (a warning, the
history's ``overfit`` = 1) and, with ``fallback``, the stage trains on with
multi-step SAAT (``fallback_iters`` PGD steps of eps / 4) to its end.

Not a defence of its own (no ``DEFENCE`` entry): the fast modes hold a
``guard`` section and an ``OverfitGuard`` in their extras (checkpointed).
"""

from __future__ import annotations

import logging
from typing import Annotated

import torch
from pydantic import Field

from saat_dist.attacks.mainstay_pgd import attack_loss, model_mode, pgd
from saat_dist.attacks.single_step import single_step_examples
from saat_dist.comm.collectives import all_reduce_sum
from saat_dist.config_fields import section
from saat_dist.keyed_random import ItemKeys
from saat_dist.models.adapter import as_hash_model

log = logging.getLogger("saat_dist")


@section
class GuardConfig:
    """The catastrophic-overfitting guard (saat_dist.defences.overfit_guard)."""

    enabled: Annotated[bool, Field(description="probe for catastrophic overfitting at every epoch end")] = True
    probe_size: Annotated[int, Field(ge=1, description=(
        "training items probed (the first ones in stored order, the same on every worker)"))] = 64
    probe_iters: Annotated[int, Field(ge=2, description="steps of the probe's PGD (step eps / 4)")] = 10
    drop: Annotated[float, Field(gt=0, le=2, description=(
        "collapse: the PGD alignment (in [-1, 1]) this far below its best of the stage"))] = 0.3
    clean_tolerance: Annotated[float, Field(ge=0, le=2, description=(
        "... while the clean alignment stays within this of its best"))] = 0.1
    fallback: Annotated[bool, Field(description=(
        "on collapse, train the rest of the stage with multi-step SAAT (fallback_iters PGD steps)"))] = True
    fallback_iters: Annotated[int, Field(ge=2, description="PGD steps of the fallback (step eps / 4)")] = 7


def alignment(codes: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """mean(sign(F) * b*) per example: 1 = the mainstay code, -1 = its opposite."""
    return (torch.sign(codes) * guide).mean(1)


def fgsm_rs(net, x: torch.Tensor, guide: torch.Tensor, eps: float, keys: ItemKeys) -> torch.Tensor:
    """FGSM from a random start (Wong et al.): uniform start in [-eps, eps],
    one signed step of 1.25 eps on the mainstay loss, projected."""
    return single_step_examples(net, x, guide, eps=eps, noise=1.0, step=1.25, project_to_ball=True, keys=keys)


class OverfitGuard:
    """The guard's state (checkpointed: best alignments, when it fired,
    whether the stage fell back to multi-step)."""

    def __init__(self, cfg: GuardConfig, probe) -> None:
        self.cfg = cfg
        self._probe_fn, self._probe = probe, None
        self.best_pgd = self.best_clean = -2.0
        self.fired_epoch = -1
        self.fallen_back = False

    def state_dict(self) -> dict:
        return {"best_pgd": self.best_pgd, "best_clean": self.best_clean, "fired_epoch": self.fired_epoch,
                "fallen_back": self.fallen_back}

    def load_state_dict(self, state: dict) -> None:
        self.best_pgd, self.best_clean = float(state["best_pgd"]), float(state["best_clean"])
        self.fired_epoch, self.fallen_back = int(state["fired_epoch"]), bool(state["fallen_back"])

    def probe(self, net, bank, eps: float, seed: int, stage: str) -> dict[str, float]:
        """Clean, single-step and PGD alignment of the probe items (eval mode)."""
        net = as_hash_model(net)
        if self._probe is None:
            self._probe = self._probe_fn(self.cfg.probe_size)
        x, y, index = self._probe
        guide = bank.mainstay(y, "cosine").to(x.device)
        keys = ItemKeys.of(index, seed, stage, "overfit-probe")
        out = {}
        with model_mode(net, "eval"):
            with torch.no_grad():
                out["probe_clean"] = alignment(net(x, alpha=1.0), guide)
            x1 = fgsm_rs(net, x, guide, eps, keys.child("single"))
            xk = pgd(net, x, lambda c: attack_loss(c, guide, False, "plain"), eps=eps, step_size=eps / 4,
                     iters=self.cfg.probe_iters, random_start=True, keys=keys.child("pgd"))
            with torch.no_grad():
                out["probe_single_step"] = alignment(net(x1, alpha=1.0), guide)
                out["probe_pgd"] = alignment(net(xk, alpha=1.0), guide)
        return {k: float(v.mean()) for k, v in out.items()}

    def check(self, net, bank, eps: float, seed: int, stage: str, epoch: int) -> dict[str, float]:
        """Probe, decide (agreed by every rank) and act; returns the epoch's history values."""
        p = self.probe(net, bank, eps, seed, stage)
        collapsed = (p["probe_pgd"] <= self.best_pgd - self.cfg.drop
                     and p["probe_clean"] >= self.best_clean - self.cfg.clean_tolerance)
        # the same probe on every rank gives the same answer; agreeing costs one number and rules out a split
        collapsed = bool(all_reduce_sum(torch.tensor([float(collapsed)], dtype=torch.float64)).item())
        if collapsed and self.fired_epoch < 0:
            self.fired_epoch = epoch
            self.fallen_back = self.cfg.fallback
            log.warning("%s epoch %d: CATASTROPHIC OVERFITTING: the probe's PGD alignment fell from %.3f to %.3f "
                        "while clean holds (%.3f, single step %.3f)%s", stage, epoch, self.best_pgd, p["probe_pgd"],
                        p["probe_clean"], p["probe_single_step"],
                        f"; multi-step SAAT ({self.cfg.fallback_iters} steps) for the rest of the stage"
                        if self.cfg.fallback else "")
        self.best_pgd = max(self.best_pgd, p["probe_pgd"])
        self.best_clean = max(self.best_clean, p["probe_clean"])
        return {**p, "overfit": float(collapsed), "multi_step": float(self.fallen_back)}


def guard_extras(ctx) -> dict:
    """A fast mode's ``extras``: its guard, when enabled."""
    g = ctx.section.guard
    return {"guard": OverfitGuard(g, ctx.probe_batch)} if g.enabled and ctx.probe_batch is not None else {}


def guard_epoch_end(ctx, epoch: int) -> dict[str, float]:
    """A fast mode's ``epoch_end``: the guard's check."""
    guard = ctx.extras.get("guard")
    if guard is None:
        return {}
    from saat_dist.training.steps import hash_module

    return guard.check(hash_module(ctx.model), ctx.bank, ctx.section.eps, ctx.seed, ctx.stage, epoch)


def fallback_settings(section, guard: OverfitGuard):
    """SAAT's settings for the guard's fallback: the section's budget and loss
    weights, the guard's ``fallback_iters`` PGD steps of eps / 4."""
    from saat_dist.defences.saat import SAATConfig

    return SAATConfig(eps=section.eps, step_size=section.eps / 4, iters=guard.cfg.fallback_iters,
                      lam=section.lam, mu=section.mu, attack_mode=section.attack_mode, hash_bank=section.hash_bank)
