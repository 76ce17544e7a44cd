"""The PrototypeNet of THA and ATRDH (Wang et al., "Targeted attack and
defense for deep hashing", SIGIR 2021): an MLP from a label set to a target
code, trained with a circle loss so that its code is similar to the codes of
training items sharing a label with the label set and dissimilar to the rest.

Circle loss over all (label set b, training item j) pairs, s = t_b . U_j / K:
positives (relevant pairs) get logits -a_p s with a_p = max(0, 2 - s), negatives
a_n s with a_n = max(0, s + 2) (a's without gradient), and

    L = softplus(logsumexp(negative logits) + logsumexp(positive logits)) / B
        + sum (sign(t) - t)^2 / (1e4 B).

Adam lr 1e-4, betas (0.5, 0.999), lr x 0.1 at 50 % and 75 % of the steps.
The reference keeps only pairs above the diagonal of its B x N label matrix
(``triu``, a leftover of a B x B form); here every pair counts.

Distributed training: the logsumexps split exactly over processes that each
hold part of the training codes (logsumexp of a union = logsumexp of the
parts' logsumexps). ``PrototypeTrainer`` takes ``gather`` (all-gather of a
small tensor) and ``all_reduce`` (sum, in place) callables for that; without
them it trains on the codes it is given. THA's registry entry trains one
on rank 0 and broadcasts its codes (``_tha_prepare``).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from saat_dist import optimizers
from saat_dist.attacks.anchor import target_code_attack
from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.config_fields import StepSize, section


@section
class THAConfig:
    """THA (Wang et al.): toward a PrototypeNet code."""

    iters: Annotated[int, Field(ge=1, description="PGD iterations toward the PrototypeNet's target code")] = 100
    step_size: Annotated[StepSize, Field(description="PGD step (a number or N/255)")] = 1 / 255
    pnet_steps: Annotated[int, Field(ge=1, description=(
        "PrototypeNet training steps (the reference: 100 epochs x 300)"))] = 30000
    pnet_batch: Annotated[int, Field(ge=1, description=(
        "label sets per PrototypeNet step, drawn from the database's label sets (the reference: its attack "
        "batch, 128)"))] = 128
    pnet_lr: Annotated[float, Field(gt=0, description=(
        "Adam learning rate (betas 0.5, 0.999; x 0.1 at 50 % and 75 %)"))] = 1e-4


class PrototypeNet(nn.Module):
    def __init__(self, num_classes: int, bits: int, hidden: int = 4096, feature: int = 512) -> None:
        super().__init__()
        self.feature = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(True), nn.Linear(hidden, feature))
        self.hashing = nn.Sequential(nn.Linear(feature, bits), nn.Tanh())

    def forward(self, labels_BC: torch.Tensor) -> torch.Tensor:
        return self.hashing(self.feature(labels_BC.float()))


def circle_logsumexps(codes_BK: torch.Tensor, target_labels_BC: torch.Tensor, bank_codes_NK: torch.Tensor,
                      bank_labels_NC: torch.Tensor, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp of the positive logits, logsumexp of the negative logits);
    -inf for an empty side."""
    k = codes_BK.shape[1]
    s = codes_BK @ bank_codes_NK.to(codes_BK.dtype).T / k
    relevant = (target_labels_BC.float() @ bank_labels_NC.float().T) > 0
    sp, sn = s[relevant], s[~relevant]

    def lse(logits):  # an empty side is a constant -inf: no gradient, softplus ignores it
        return torch.logsumexp(logits, 0) if logits.numel() else codes_BK.new_tensor(float("-inf"))

    return lse(-(2 - sp.detach()).clamp_min(0) * sp * gamma), lse((sn.detach() + 2).clamp_min(0) * sn * gamma)


def prototype_loss(codes_BK, target_labels_BC, bank_codes_NK, bank_labels_NC) -> torch.Tensor:
    """The circle loss plus the quantisation term, over one process's codes."""
    lse_p, lse_n = circle_logsumexps(codes_BK, target_labels_BC, bank_codes_NK, bank_labels_NC)
    b = len(codes_BK)
    return F.softplus(lse_p + lse_n) / b + (torch.sign(codes_BK) - codes_BK).pow(2).sum() / (1e4 * b)


class PrototypeTrainer:
    """A PrototypeNet, its optimizer and schedule, and the stream of random
    target label sets it trains on (the same on every process)."""

    def __init__(self, num_classes: int, bits: int, label_sets: torch.Tensor, *, total_steps: int, seed: int,
                 device, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999), gather=None, all_reduce=None,
                 world: int = 1) -> None:
        with torch.random.fork_rng(devices=[]):  # the same initial weights on every process; global RNG untouched
            torch.manual_seed(seed)
            self.net = PrototypeNet(num_classes, bits)
        self.net.to(device)
        self.optimizer = optimizers.Adam(self.net.parameters(), lr=lr, betas=betas)
        milestones = sorted({max(1, int(total_steps * m)) for m in (0.5, 0.75)})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=0.1)
        sets = label_sets.to(torch.float32)
        self.label_sets = sets[sets.sum(1) > 0].to(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.gather, self.all_reduce, self.world = gather, all_reduce, world
        self.device = device

    def draw_targets(self, n: int) -> torch.Tensor:
        """n label sets drawn uniformly from the data set's (non-empty) ones."""
        pick = torch.randint(0, len(self.label_sets), (n,), generator=self.generator)
        return self.label_sets[pick.to(self.label_sets.device)]

    def step(self, bank_codes_NK: torch.Tensor, bank_labels_NC: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on n random label sets against this process's bank
        codes; returns (target labels n x C, their codes before the step, n x K)."""
        targets = self.draw_targets(n)
        codes = self.net(targets)
        lse_p, lse_n = circle_logsumexps(codes, targets, bank_codes_NK.to(self.device), bank_labels_NC.to(self.device))
        quant = (torch.sign(codes) - codes).pow(2).sum() / (1e4 * n)
        if self.gather is None:
            loss = F.softplus(lse_p + lse_n) / n + quant
        else:
            # global logsumexps from every process's parts; this process's share of the gradient
            parts = self.gather(torch.stack([lse_p, lse_n]).detach()[None]).to(self.device)  # W x 2
            glob = torch.logsumexp(parts, 0)
            outer = torch.sigmoid(glob.sum()) / n
            loss = quant / self.world  # the same term on every process: each adds its share
            for local, total in ((lse_p, glob[0]), (lse_n, glob[1])):
                if torch.isfinite(local):  # d softplus(P + N) / d local part = sigmoid(P + N) exp(local - total)
                    loss = loss + outer * torch.exp(local.detach() - total) * local
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.all_reduce is not None:
            for p in self.net.parameters():
                if p.grad is not None:
                    self.all_reduce(p.grad)
        self.optimizer.step()
        self.scheduler.step()
        return targets, codes.detach()

    def fit(self, bank_codes_NK: torch.Tensor, bank_labels_NC: torch.Tensor, steps: int, batch: int,
            progress=None) -> None:
        """``steps`` steps against fixed codes (THA: the attacked model's training codes)."""
        self.net.train()
        for _ in range(steps):
            self.step(bank_codes_NK, bank_labels_NC, batch)
            if progress is not None:
                progress.update(1)
        self.net.eval()

    @torch.no_grad()
    def target_codes(self, target_labels_BC: torch.Tensor) -> torch.Tensor:
        """sign(PrototypeNet(t)): the code a targeted attack pulls toward."""
        return torch.sign(self.net(target_labels_BC.to(self.device)))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])


# ---------------------------------------------------------------- THA
def tha_prototypes(tha: THAConfig, tr_codes: torch.Tensor, tr_lab: torch.Tensor, db_sets: torch.Tensor, bits: int,
                   seed: int, device, progress=None) -> PrototypeTrainer:
    """THA's PrototypeNet, trained as the reference's ``tha.py`` trains it:
    ``pnet_steps`` steps on batches of ``pnet_batch`` label sets drawn from
    the database's label sets (the targets' own kind), circle loss against
    the attacked model's training codes."""
    trainer = PrototypeTrainer(tr_lab.shape[1], bits, db_sets, total_steps=tha.pnet_steps, seed=seed + 41,
                               device=device, lr=tha.pnet_lr)
    trainer.fit(tr_codes.to(device), tr_lab.to(device), tha.pnet_steps, tha.pnet_batch, progress)
    return trainer


def _tha_prepare(ctx: AttackContext) -> torch.Tensor:
    """Every query's THA target code: a PrototypeNet trained on rank 0, its codes broadcast."""
    from saat_dist.comm.collectives import broadcast
    from saat_dist.progress import Progress

    tha = ctx.settings.tha
    codes = torch.zeros(len(ctx.targets), ctx.tr_codes.shape[1])
    if ctx.rank == 0:
        trainer = tha_prototypes(tha, ctx.tr_codes, ctx.tr_lab, torch.unique(ctx.db_lab, dim=0), ctx.tr_codes.shape[1],
                                 ctx.seed, ctx.device, Progress("THA PrototypeNet", tha.pnet_steps,
                                                                 every_s=ctx.log_every_s))
        codes = trainer.target_codes(ctx.targets).cpu()
    return broadcast(codes)


def _tha_run(ctx: AttackContext, x, targets, index) -> AttackOutput:
    tha = ctx.settings.tha
    adv = target_code_attack(ctx.model, x, ctx.prepared["tha"][index].to(ctx.device), eps=ctx.settings.eps,
                             step_size=tha.step_size, iters=tha.iters)
    return AttackOutput(adv, [x])


ATTACKS = (Attack("tha", "THA", "targeted", lambda a: (a.eps, a.tha.iters, 1), _tha_run, order=93,
                  prepare=_tha_prepare),)
