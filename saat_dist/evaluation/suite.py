"""The attack suite on one model: the attacks' shared context (guide codes,
targets, what each attack prepares once), every attack on every batch of
queries, and what each rank collects per query until the gather."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from saat_dist.attacks import ATTACK_REGISTRY, Attack, AttackContext, AttackOutput, attack_loss, choose_targets, model_mode
from saat_dist.attacks.mainstay_pgd import pgd_restarts
from saat_dist.attacks.perceptibility import perceptibility_rows
from saat_dist.attacks.transfer import GENERATORS
from saat_dist.comm.collectives import all_gather_ragged
from saat_dist.config import RunConfig
from saat_dist.device import Place
from saat_dist.evaluation.plan import Encoded, QueryBatch, gather_sorted
from saat_dist.mainstay import label_set_table, mainstay_from_table
from saat_dist.models.adapter import as_hash_model

SINGLE_RUN = "mainstay_single_run"  # the mainstay attack's first restart alone: one run, as every other attack


class Suite:
    """Everything the attacks of one evaluation need, prepared once per rank
    (what an attack prepares, e.g. THA's PrototypeNet, is the same on every
    rank)."""

    def __init__(self, cfg: RunConfig, model: nn.Module, place: Place, train: Encoded, database: Encoded,
                 q_lab_all: torch.Tensor, attacks: list[Attack]) -> None:
        model = as_hash_model(model, cfg.model.bits)  # a plain logits module gets tanh and alpha
        self.cfg, self.model, self.device = cfg, model, place.device
        self.table = label_set_table(*train)
        # targets drawn once from all query labels: the same whatever the split over ranks
        self.targets, self.valid = choose_targets(q_lab_all, torch.unique(database.labels, dim=0),
                                                  torch.Generator().manual_seed(cfg.seed + 11))
        self.ctx = AttackContext(cfg.attack, model, place.device, cfg.seed, self.guide_of, self.targets, self.valid,
                                 *train, *database, cfg.log_every_s, place.rank)
        for a in attacks:
            if a.prepare is not None:
                self.ctx.prepared[a.name] = a.prepare(self.ctx)
        n = len(q_lab_all)
        self.limits = {a.name: a.queries(cfg.attack, n) if a.queries else n for a in attacks}

    def guide_of(self, labels: torch.Tensor, weighting: str = "cosine") -> torch.Tensor:
        return mainstay_from_table(labels, *self.table, weighting)

    def attacked(self, a: Attack, idx: torch.Tensor) -> torch.Tensor:
        """The rows of a batch the attack runs on: its queries (the strong
        check: the first ones), with a target when it is targeted."""
        rows = idx < self.limits[a.name]
        return rows & self.valid[idx] if a.kind == "targeted" else rows

    def run(self, a: Attack, x: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor) -> AttackOutput:
        """Adversarial images of one attack for a batch (rows it does not
        attack keep their clean image) and where it started."""
        rows = self.attacked(a, idx)
        if not bool(rows.any()):
            return AttackOutput(x.clone(), [x])
        labels = self.targets if a.kind == "targeted" else None
        if bool(rows.all()):
            return a.run(self.ctx, x, lab if labels is None else labels[idx], idx)
        rd = rows.to(x.device)
        sub = a.run(self.ctx, x[rd], lab[rows] if labels is None else labels[idx[rows]], idx[rows])

        def full(part: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            out[rd] = part
            return out

        return AttackOutput(full(sub.adversarial), [full(s) for s in sub.starts],
                            None if sub.first is None else full(sub.first))

    def sweep(self, eps: float, x: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The mainstay attack at another budget: one run of ``attack.iters``
        with the keys of the mainstay attack's first restart (the same
        strength at every point of the curve)."""
        a = self.cfg.attack
        return pgd_restarts(self.model, x, self.guide_of(lab).to(self.device), eps=eps, step_size=a.step_size,
                            iters=a.iters, loss=a.loss, keys=self.ctx.keys(idx, "mainstay"))[0]

    def input_gradient_is_zero(self, x: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """Per query: the plain mainstay loss's input gradient at the clean
        image (alpha = 1, eval mode) is all zero or not finite."""
        guide = self.guide_of(lab).to(self.device)
        xg = x.detach().clone().requires_grad_(True)
        with model_mode(self.model, "eval"):
            obj = attack_loss(self.model(xg, alpha=1.0), guide, False, "plain").sum()
        (g,) = torch.autograd.grad(obj, xg)
        flat = g.flatten(1)
        return ((flat.abs().amax(1) == 0) | ~torch.isfinite(flat).all(1)).cpu()


@torch.no_grad()
def codes_and_finiteness(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(+-1 codes on the CPU, per row 'every output finite') at test time.
    Finiteness is judged before the tanh when the model shows its logits
    (``HashModel.logits``): tanh turns an infinite logit into a plausible
    +-1. The code is sign(logit) = sign(tanh(logit)), as ``encode`` gives."""
    model = as_hash_model(model)
    with model_mode(model, "eval"):
        z = model.logits(x).float() if hasattr(model, "logits") else model(x, alpha=1.0)
    return torch.where(z >= 0, 1.0, -1.0).cpu(), torch.isfinite(z).all(1).cpu()


def not_moved(x_adv: torch.Tensor, starts: list[torch.Tensor]) -> torch.Tensor:
    """Per row: the adversarial image is exactly one of its starting points."""
    out = torch.zeros(len(x_adv), dtype=torch.bool)
    for st in starts:
        out |= ((x_adv - st).flatten(1).abs().amax(1) == 0).cpu()
    return out


@dataclass
class Collected:
    """What one rank gathers per query, by key: codes (clean, each attack,
    each sweep point, each transfer), finiteness, 'returned where it
    started', 'attacked', perceptibility rows, and the images of the
    retrieval picture."""

    keys: list[str]
    attacks: list[Attack]
    index: list = field(default_factory=list)
    zero_grad: list = field(default_factory=list)
    codes: dict = field(default_factory=dict)
    finite: dict = field(default_factory=dict)
    unmoved: dict = field(default_factory=dict)
    pert: dict = field(default_factory=dict)
    attacked: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    shown: dict = field(default_factory=lambda: {"index": [], "clean": [], "adv": []})

    def __post_init__(self) -> None:
        self.codes = {k: [] for k in self.keys}
        self.finite = {k: [] for k in self.keys}
        for a in self.attacks:
            self.unmoved[a.name], self.pert[a.name], self.attacked[a.name] = [], [], []
            self.seconds[a.name] = 0.0

    def add_codes(self, key: str, model: nn.Module, x: torch.Tensor) -> None:
        c, f = codes_and_finiteness(model, x)
        self.codes[key].append(c)
        self.finite[key].append(f)


def attack_batch(suite: Suite, col: Collected, batch: QueryBatch, sweep: list[float], transfer_to: dict,
                 progress) -> None:
    """Every attack (and sweep point) on one batch of queries, into ``col``;
    ``transfer_to``: models that also encode the transfer generators' examples."""
    model = suite.model
    x, images, lab, idx = batch
    retrieval_queries = suite.cfg.experiment.retrieval_queries
    col.index.append(idx)
    col.zero_grad.append(suite.input_gradient_is_zero(x, lab))
    col.add_codes("clean", model, x)
    for a in col.attacks:
        eps = a.budget(suite.cfg.attack)[0]
        t = time.monotonic()
        out = suite.run(a, x, lab, idx)
        col.seconds[a.name] += time.monotonic() - t
        col.add_codes(a.name, model, out.adversarial)
        attacked = suite.attacked(a, idx)
        col.attacked[a.name].append(attacked)
        col.unmoved[a.name].append(attacked & not_moved(out.adversarial, out.starts) & (eps > 0))
        col.pert[a.name].append(perceptibility_rows(x, out.adversarial))
        if out.first is not None:
            col.add_codes(SINGLE_RUN, model, out.first)
        if a.name in GENERATORS:
            for tname, tmodel in transfer_to.items():
                col.add_codes(f"transfer:{tname}:{a.name}", tmodel, out.adversarial)
        if a.name == "mainstay":
            show = idx < retrieval_queries
            col.shown["index"].append(idx[show])
            col.shown["clean"].append(images[show])
            col.shown["adv"].append((out.adversarial[show.to(x.device)] * 255).round().to(torch.uint8).cpu())
        progress.update(len(x))
    for v in sweep:
        col.add_codes(f"eps:{v!r}", model, suite.sweep(v, x, lab, idx))
        progress.update(len(x))


def _cat(parts, shape, dtype=torch.float32) -> torch.Tensor:  # a rank may have no queries at all
    return torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype)


@dataclass
class Gathered:
    """Every rank's ``Collected``, on every rank, ordered by query index."""

    index: torch.Tensor
    codes: dict
    finite: dict
    unmoved: dict
    attacked: dict
    pert: dict
    zero_grad: torch.Tensor
    seconds: dict
    shown: tuple


def gather(col: Collected, bits: int, size: int) -> Gathered:
    names = [a.name for a in col.attacks]
    rows = [_cat(col.codes[key], (0, bits)) for key in col.keys]
    rows += [_cat(col.finite[key], (0,), torch.bool) for key in col.keys]
    rows += [_cat(col.unmoved[n], (0,), torch.bool) for n in names]
    rows += [_cat(col.attacked[n], (0,), torch.bool) for n in names]
    rows += [_cat(col.pert[n], (0, 7), torch.float64) for n in names]
    g = gather_sorted(_cat(col.index, (0,), torch.int64), *rows, _cat(col.zero_grad, (0,), torch.bool))
    parts = iter(g[1:-1])
    codes = {key: next(parts) for key in col.keys}
    finite = {key: next(parts) for key in col.keys}
    unmoved = {n: next(parts) for n in names}
    attacked = {n: next(parts) for n in names}
    pert = {n: next(parts) for n in names}
    seconds = {n: all_gather_ragged(torch.tensor([v], dtype=torch.float64)).tolist() for n, v in col.seconds.items()}
    shown = gather_sorted(_cat(col.shown["index"], (0,), torch.int64),
                          _cat(col.shown["clean"], (0, 3, size, size), torch.uint8),
                          _cat(col.shown["adv"], (0, 3, size, size), torch.uint8))
    return Gathered(g[0], codes, finite, unmoved, attacked, pert, g[-1], seconds, tuple(shown))


def plan_attacks(names) -> list[Attack]:
    return [ATTACK_REGISTRY[n] for n in names]
