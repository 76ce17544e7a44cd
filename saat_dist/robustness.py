"""Worst-case robustness evaluation of one hash model: every attack of the
suite, the worst case per query, and checks that the numbers can be trusted.

The suite (``attack_plan``; ``experiment.attacks`` chooses, ``attack.*``
sets each): the mainstay attack with ``attack.restarts`` random restarts,
HAG, SDHA, a black-box random search on the Hamming objective (``square``),
the transfer generators BIM, DI-, NI-, SI-NI- and VMI-FGSM run white-box, the
targeted mainstay attack, DHTA, P2P and THA. Every attack runs on the same
queries (``experiment.num_queries``); targeted attacks on those whose label
shares nothing with some database label set (the others keep their clean
image).

``worst_case``: per query, the lowest AP under any attack of the suite whose
budget is at most ``attack.eps`` (untargeted and targeted alike: a targeted
example is also an attempt on the query's own retrieval), so it is at most
every single attack's mAP at that budget. The mainstay attack's first
restart is also scored alone (``mainstay_single_run``): one run, as every
other attack makes, for comparisons like for like.

Checks, run on every evaluation and written into the results as true
(triggered: logged as a warning and shown in the report), false (passed) or
null (not run, with the reason in ``check_details``):

- ``zero_perturbation``: an attack returned some query where it started (the
  query itself, or its own random start), with eps > 0;
- ``nonfinite_codes``: a clean or adversarial output was NaN or infinite,
  looked at before the tanh (``model.logits`` when the model has it), which
  would turn an infinite logit into a plausible +-1;
- ``zero_input_gradient``: the mainstay loss has an all-zero (or non-finite)
  input gradient at some clean query: gradient masking or a dead model;
- ``blackbox_beats_whitebox``: the gradient-free attack got a lower mAP than
  every white-box untargeted attack (by more than
  ``experiment.checks.blackbox_margin``): gradients are not guiding the
  white-box attacks;
- ``map_not_falling_with_eps``: over ``experiment.eps_sweep`` (the mainstay
  attack, one run of ``attack.iters`` at every budget), while mAP is still
  more than ``experiment.checks.floor_margin`` above both the theory bound
  and the random-code floor, a larger budget raised mAP, or lowered it by
  less than ``experiment.checks.min_drop`` after an earlier step lowered it
  by more, or the whole sweep lowered it by less: a curve that stops falling
  before it has anywhere left to fall is the usual sign of masked gradients
  (a robust model's curve starts flat and falls faster as eps grows).

``transfer``: examples of the transfer generators crafted on this model are
also scored on other models (``transfer_to``): crafted on A, scored on B.

Streaming as ``saat_dist.evaluation``: each rank encodes its shards of the
database and train splits and attacks its share of the global query batches;
codes, labels and per-query flags are gathered; rank 0 computes the metrics.
Every random draw is keyed by the query (``evaluation.attack_keys``), so the
results do not depend on the number of workers.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from saat_dist.attacks import (
    PrototypeTrainer,
    anchor_codes,
    attack_loss,
    choose_targets,
    hag_attack,
    model_mode,
    sdha_attack,
    square_attack,
    target_code_attack,
    transfer_attack,
)
from saat_dist.attacks.mainstay_pgd import pgd_restarts, pgd_starts
from saat_dist.attacks.perceptibility import perceptibility_from_rows, perceptibility_rows
from saat_dist.attacks.square import square_start
from saat_dist.attacks.transfer import GENERATORS, transfer_start
from saat_dist.checkpoint import save_state, write_text_atomic
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.distributed.collectives import all_gather_ragged, barrier, broadcast
from saat_dist.evaluation import (
    attack_keys,
    encode_split,
    gather_sorted,
    iter_query_batches,
    query_batches,
    query_labels,
    random_map,
)
from saat_dist.mainstay import label_set_table, mainstay_from_table
from saat_dist.metrics import (
    average_precision,
    precision_at_n,
    precision_recall_curve,
    precision_recall_reference,
    rank_database,
)
from saat_dist.progress import Progress

log = logging.getLogger("saat_dist")
RESULTS = "robustness.json"
RESULTS_FORMAT = "saat-dist-robustness/3"  # bumped when results change shape: older ones are recomputed
RETRIEVAL_IMAGES = "retrieval_images.pt"
CHECKS = ("zero_perturbation", "nonfinite_codes", "zero_input_gradient", "blackbox_beats_whitebox",
          "map_not_falling_with_eps")
SINGLE_RUN = "mainstay_single_run"  # the mainstay attack's first restart alone: one run, as every other attack


@dataclass(frozen=True)
class AttackRun:
    name: str
    kind: str  # "untargeted" or "targeted"
    eps: float  # L-inf budget
    iters: int  # iterations (square: queries per image)
    restarts: int = 1
    whitebox: bool = True


def attack_plan(cfg: RunConfig) -> list[AttackRun]:
    """The attacks of ``experiment.attacks`` with their budgets and iterations."""
    a = cfg.attack
    t = a.transfer
    runs = {
        "mainstay": AttackRun("mainstay", "untargeted", a.eps, a.iters, a.restarts),
        "hag": AttackRun("hag", "untargeted", a.eps, a.hag.iters),
        "sdha": AttackRun("sdha", "untargeted", a.eps, a.sdha.iters),
        "square": AttackRun("square", "untargeted", a.eps, a.square.iters, whitebox=False),
        **{g: AttackRun(g, "untargeted", a.eps, t.iters) for g in GENERATORS},
        "mainstay_targeted": AttackRun("mainstay_targeted", "targeted", a.eps, a.iters),
        "dhta": AttackRun("dhta", "targeted", a.eps if a.dhta.eps is None else a.dhta.eps, a.dhta.iters),
        "p2p": AttackRun("p2p", "targeted", a.eps if a.p2p.eps is None else a.p2p.eps, a.p2p.iters),
        "tha": AttackRun("tha", "targeted", a.eps, a.tha.iters),
    }
    return [runs[n] for n in cfg.experiment.attacks]


def sweep_budgets(cfg: RunConfig) -> list[float]:
    """The budgets of ``experiment.eps_sweep`` that need a run of their own:
    not 0 (the clean mAP), and not ``attack.eps`` when the mainstay attack
    runs (its first restart is that point)."""
    a, x = cfg.attack, cfg.experiment
    return [v for v in x.eps_sweep if v > 0 and not (abs(v - a.eps) < 1e-12 and "mainstay" in x.attacks)]


@dataclass
class AttackOutput:
    adversarial: torch.Tensor  # B x C x H x W
    starts: list[torch.Tensor]  # where the attack started: the query, and each of its random starts
    first: torch.Tensor | None = None  # the mainstay attack's first restart alone


class Suite:
    """Everything the attacks of one evaluation need, prepared once per rank."""

    def __init__(self, cfg, model, device, rank, tr_codes, tr_lab, db_codes, db_lab, q_lab_all, runs):
        self.cfg, self.model, self.device, self.rank = cfg, model, device, rank
        self.tr_codes, self.tr_lab = tr_codes, tr_lab
        self.table = label_set_table(tr_codes, tr_lab)
        names = {r.name for r in runs}
        # targets drawn once from all query labels: the same whatever the split over ranks
        db_sets = torch.unique(db_lab, dim=0)
        self.targets, self.valid = choose_targets(q_lab_all, db_sets, torch.Generator().manual_seed(cfg.seed + 11))
        self.anchors = {}
        for name in ("dhta", "p2p"):
            if name in names:
                c = getattr(cfg.attack, name)
                self.anchors[name] = anchor_codes(self.targets, db_codes, db_lab, c.anchors,
                                                  torch.Generator().manual_seed(cfg.seed + 31 + c.anchors))
        self.tha_codes = self._tha_codes(q_lab_all.shape[1], db_sets) if "tha" in names else None

    def guide_of(self, labels: torch.Tensor, weighting: str = "cosine") -> torch.Tensor:
        return mainstay_from_table(labels, *self.table, weighting)

    def _tha_codes(self, num_classes: int, db_sets: torch.Tensor) -> torch.Tensor:
        """THA's target codes for every query: a PrototypeNet trained on rank 0
        (``tha_prototypes``), its codes broadcast."""
        codes = torch.zeros(len(self.targets), self.cfg.model.bits)
        if self.rank == 0:
            trainer = tha_prototypes(self.cfg, self.tr_codes, self.tr_lab, db_sets, self.device)
            codes = trainer.target_codes(self.targets).cpu()
        return broadcast(codes)

    def run(self, r: AttackRun, x: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor) -> AttackOutput:
        """Adversarial images of one attack for a batch (targeted: rows without
        a valid target keep their clean image) and where the attack started."""
        if r.kind == "targeted":
            return self._targeted(r, x, idx)
        a, m = self.cfg.attack, self.model
        keys = attack_keys(self.cfg, idx, r.name).to(x.device)
        guide = self.guide_of(lab).to(self.device)
        if r.name == "mainstay":
            best, first = pgd_restarts(m, x, guide, eps=r.eps, step_size=a.step_size, iters=r.iters, loss=a.loss,
                                       restarts=r.restarts, keys=keys, keep_first=True)
            return AttackOutput(best, [x, *pgd_starts(x, r.eps, r.restarts, keys)], first)
        if r.name == "hag":
            h = a.hag
            adv = hag_attack(m, x, eps=r.eps, iters=r.iters, lr=h.lr, threshold=h.threshold, beta=h.beta)
            return AttackOutput(adv, [x])
        if r.name == "sdha":
            s = a.sdha
            adv = sdha_attack(m, x, lab, self.tr_codes, self.tr_lab, eps=r.eps, iters=r.iters, lr=s.lr,
                              weight=s.weight, sigma=s.sigma, z=s.z)
            return AttackOutput(adv, [x])
        if r.name == "square":
            adv = square_attack(m, x, guide, eps=r.eps, iters=r.iters, p_init=a.square.p_init, keys=keys)
            return AttackOutput(adv, [x, square_start(x, r.eps, keys)])
        t = a.transfer
        adv = transfer_attack(r.name, m, x, guide, eps=r.eps, step_size=t.step_size, iters=r.iters, loss=a.loss,
                              decay=t.decay, di_prob=t.di_prob, di_resize=t.di_resize, si_copies=t.si_copies,
                              vmi_neighbours=t.vmi_neighbours, vmi_beta=t.vmi_beta, keys=keys)
        return AttackOutput(adv, [x, transfer_start(r.name, x, r.eps, keys)])

    def _targeted(self, r: AttackRun, x: torch.Tensor, idx: torch.Tensor) -> AttackOutput:
        a, m = self.cfg.attack, self.model
        v = self.valid[idx]
        out = x.clone()
        if not bool(v.any()):
            return AttackOutput(out, [x])
        vd = v.to(x.device)
        xv, iv = x[vd], idx[v]
        keys = attack_keys(self.cfg, iv, r.name).to(x.device)
        starts = [xv]
        if r.name == "mainstay_targeted":
            adv = pgd_restarts(m, xv, self.guide_of(self.targets[iv]).to(self.device), eps=r.eps, step_size=a.step_size,
                               iters=r.iters, targeted=True, loss=a.loss, keys=keys)[0]
            starts += pgd_starts(xv, r.eps, 1, keys)
        elif r.name in ("dhta", "p2p"):
            adv = target_code_attack(m, xv, self.anchors[r.name][iv].to(self.device), eps=r.eps,
                                     step_size=getattr(a, r.name).step_size, iters=r.iters)
        else:  # tha
            adv = target_code_attack(m, xv, self.tha_codes[iv].to(self.device), eps=r.eps,
                                     step_size=a.tha.step_size, iters=r.iters)
        out[vd] = adv
        full = []
        for st in starts:  # rows without a target start (and stay) at x
            f = x.clone()
            f[vd] = st
            full.append(f)
        return AttackOutput(out, full)

    def sweep(self, eps: float, x: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The mainstay attack at another budget: one run of ``attack.iters``
        with the keys of the mainstay attack's first restart (the same
        strength at every point of the curve)."""
        a = self.cfg.attack
        keys = attack_keys(self.cfg, idx, "mainstay").to(x.device)
        return pgd_restarts(self.model, x, self.guide_of(lab).to(self.device), eps=eps, step_size=a.step_size,
                            iters=a.iters, loss=a.loss, keys=keys)[0]

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


def tha_prototypes(cfg: RunConfig, tr_codes: torch.Tensor, tr_lab: torch.Tensor, db_sets: torch.Tensor,
                   device) -> PrototypeTrainer:
    """THA's PrototypeNet, trained as the reference's ``tha.py`` trains it:
    ``pnet_steps`` steps on batches of ``pnet_batch`` label sets drawn from
    the database's label sets (the targets' own kind), circle loss against
    the attacked model's training codes."""
    c = cfg.attack.tha
    trainer = PrototypeTrainer(tr_lab.shape[1], cfg.model.bits, db_sets, total_steps=c.pnet_steps,
                               seed=cfg.seed + 41, device=device, lr=c.pnet_lr)
    progress = Progress("THA PrototypeNet", c.pnet_steps, every_s=cfg.log_every_s)
    trainer.fit(tr_codes.to(device), tr_lab.to(device), c.pnet_steps, c.pnet_batch, progress)
    return trainer


@torch.no_grad()
def codes_and_finiteness(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(+-1 codes on the CPU, per row 'every output finite') at test time.
    Finiteness is judged before the tanh when the model shows its logits
    (``HashModel.logits``): tanh turns an infinite logit into a plausible
    +-1. The code is sign(logit) = sign(tanh(logit)), as ``encode`` gives."""
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
    started', perceptibility rows, and the images of the retrieval picture."""

    keys: list[str]
    runs: list[AttackRun]
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
        for r in self.runs:
            self.unmoved[r.name], self.pert[r.name], self.attacked[r.name] = [], [], []
            self.seconds[r.name] = 0.0

    def add_codes(self, key: str, model: nn.Module, x: torch.Tensor) -> None:
        c, f = codes_and_finiteness(model, x)
        self.codes[key].append(c)
        self.finite[key].append(f)


def _attack_batch(suite: Suite, col: Collected, x, images, lab, idx, sweep, transfer_to, retrieval_queries,
                  progress) -> None:
    """Every attack (and sweep point) on one batch of queries, into ``col``."""
    model = suite.model
    col.index.append(idx)
    col.zero_grad.append(suite.input_gradient_is_zero(x, lab))
    col.add_codes("clean", model, x)
    for r in col.runs:
        t = time.monotonic()
        out = suite.run(r, x, lab, idx)
        col.seconds[r.name] += time.monotonic() - t
        col.add_codes(r.name, model, out.adversarial)
        attacked = suite.valid[idx] if r.kind == "targeted" else torch.ones(len(idx), dtype=torch.bool)
        col.attacked[r.name].append(attacked)
        col.unmoved[r.name].append(attacked & not_moved(out.adversarial, out.starts) & (r.eps > 0))
        col.pert[r.name].append(perceptibility_rows(x, out.adversarial))
        if out.first is not None:
            col.add_codes(SINGLE_RUN, model, out.first)
        if r.name in GENERATORS:
            for tname, tmodel in transfer_to.items():
                col.add_codes(f"transfer:{tname}:{r.name}", tmodel, out.adversarial)
        if r.name == "mainstay":
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


def gather(col: Collected, k: int, size: int) -> Gathered:
    names = [r.name for r in col.runs]
    rows = [_cat(col.codes[key], (0, k)) for key in col.keys]
    rows += [_cat(col.finite[key], (0,), torch.bool) for key in col.keys]
    rows += [_cat(col.unmoved[n], (0,), torch.bool) for n in names]
    rows += [_cat(col.attacked[n], (0,), torch.bool) for n in names]
    rows += [_cat(col.pert[n], (0, 7), torch.float64) for n in names]
    g = gather_sorted(_cat(col.index, (0,), torch.int64), *rows, _cat(col.zero_grad, (0,), torch.bool))
    nk, nr = len(col.keys), len(names)
    parts = iter(g[1:-1])
    codes = {key: next(parts) for key in col.keys}
    finite = {key: next(parts) for key in col.keys}
    unmoved = {n: next(parts) for n in names}
    attacked = {n: next(parts) for n in names}
    pert = {n: next(parts) for n in names}
    assert len(g) == 2 + 2 * nk + 3 * nr
    seconds = {n: all_gather_ragged(torch.tensor([v], dtype=torch.float64)).tolist() for n, v in col.seconds.items()}
    shown = gather_sorted(_cat(col.shown["index"], (0,), torch.int64),
                          _cat(col.shown["clean"], (0, 3, size, size), torch.uint8),
                          _cat(col.shown["adv"], (0, 3, size, size), torch.uint8))
    return Gathered(g[0], codes, finite, unmoved, attacked, pert, g[-1], seconds, tuple(shown))


def evaluate_robustness(cfg: RunConfig, model: nn.Module, source: DataSource, device, label: str,
                        rank: int = 0, world: int = 1, transfer_to: dict[str, nn.Module] | None = None,
                        run_dir: Path | None = None) -> dict | None:
    """Every number of one model's robustness evaluation (rank 0; None elsewhere).
    ``transfer_to``: models that also score this model's transfer examples."""
    x_cfg, a = cfg.experiment, cfg.attack
    transfer_to = transfer_to or {}
    runs = attack_plan(cfg)
    db_codes, db_lab = encode_split(model, source, "database", cfg, device, rank, world)
    tr_codes, tr_lab = encode_split(model, source, "train", cfg, device, rank, world)
    targets_db = {name: encode_split(m, source, "database", cfg, device, rank, world)[0]
                  for name, m in transfer_to.items()}
    q_lab_all = query_labels(source)
    n = min(x_cfg.num_queries or len(q_lab_all), len(q_lab_all))
    q_lab_all = q_lab_all[:n]
    t0 = time.monotonic()
    suite = Suite(cfg, model, device, rank, tr_codes, tr_lab, db_codes, db_lab, q_lab_all, runs)
    sweep = sweep_budgets(cfg)
    transfers = [r for r in runs if r.name in GENERATORS] if transfer_to else []
    keys = ["clean", *[r.name for r in runs], *([SINGLE_RUN] if "mainstay" in x_cfg.attacks else []),
            *[f"eps:{v!r}" for v in sweep], *[f"transfer:{t}:{r.name}" for t in transfer_to for r in transfers]]
    col = Collected(keys, runs)
    batches = query_batches(n, a.batch_size, rank, world)
    progress = Progress(f"{label} robustness (rank {rank}/{world})" if world > 1 else f"{label} robustness",
                        sum(map(len, batches)) * (len(runs) + len(sweep)), unit="query-attack",
                        every_s=cfg.log_every_s if rank == 0 else 1e9)
    for images, lab, idx in iter_query_batches(source, cfg, batches):
        x = images.to(device).float().div_(255)
        _attack_batch(suite, col, x, images, lab, idx, sweep, transfer_to, x_cfg.retrieval_queries, progress)
    g = gather(col, cfg.model.bits, cfg.data.image_size)
    attack_seconds = time.monotonic() - t0
    if rank != 0:
        return None
    assert torch.equal(g.index, torch.arange(n)), "every query is evaluated exactly once"
    if run_dir is not None:
        shown_index, shown_clean, shown_adv = g.shown
        save_state({"index": shown_index, "clean": shown_clean, "adversarial": shown_adv}, run_dir / RETRIEVAL_IMAGES)
    res = results(cfg, label, runs, suite, q_lab_all, db_codes, db_lab, g)
    res["transfer"] = {t: {r.name: float(average_precision(g.codes[f"transfer:{t}:{r.name}"], targets_db[t], q_lab_all,
                                                            db_lab, cfg.eval.top_k).mean()) for r in transfers}
                       for t in transfer_to}
    res["resources"] = {"attack_seconds": round(attack_seconds, 1)}
    return res


def results(cfg: RunConfig, label: str, runs: list[AttackRun], suite: Suite, q_lab: torch.Tensor,
            db_codes: torch.Tensor, db_lab: torch.Tensor, g: Gathered) -> dict:
    """The results of one model (rank 0): every attack's mAP, the worst case,
    per-query APs, the eps sweep, curves, the retrieval lists and the checks."""
    x_cfg, a, e = cfg.experiment, cfg.attack, cfg.eval
    n = len(q_lab)

    def ap(c, labels):
        return average_precision(c, db_codes, labels, db_lab, e.top_k)

    clean_ap = ap(g.codes["clean"], q_lab)
    res: dict = {"label": label, "queries": n, "top_k": e.top_k, "eps": a.eps,
                 "clean_map": float(clean_ap.mean()),
                 "random_map": random_map(q_lab, db_lab, cfg.model.bits, e.top_k, cfg.seed + 20),
                 "theory_map": float(ap(-suite.guide_of(q_lab), q_lab).mean())}
    valid, targets = suite.valid, suite.targets
    if bool(valid.any()):
        res["theory_tmap"] = float(ap(suite.guide_of(targets[valid]), targets[valid]).mean())
        res["clean_tmap"] = float(ap(g.codes["clean"][valid], targets[valid]).mean())
    res["targeted_queries"] = int(valid.sum())
    per_query = {r.name: ap(g.codes[r.name], q_lab) for r in runs}
    if SINGLE_RUN in g.codes:
        per_query[SINGLE_RUN] = ap(g.codes[SINGLE_RUN], q_lab)
    res["attacks"] = {r.name: _attack_row(r, per_query, g, valid, targets, ap, label) for r in runs}
    worst, worst_codes = _worst_case(res, runs, per_query, g, a.eps, n, label)
    res["per_query_ap"] = {"clean": [round(float(v), 6) for v in clean_ap],
                           **{name: [round(float(v), 6) for v in aps] for name, aps in per_query.items()},
                           **({"worst_case": [round(float(v), 6) for v in worst]} if worst is not None else {})}
    res["eps_sweep"] = _eps_sweep(cfg, res, per_query, g, q_lab, ap)
    curves = {"clean": g.codes["clean"]}
    if "mainstay" in g.codes:
        curves["mainstay"] = g.codes["mainstay"]
    if worst_codes is not None:
        curves["worst_case"] = worst_codes
    res.update(_curves(cfg, curves, db_codes, q_lab, db_lab))
    res["retrieval"] = _retrieval(g.codes, db_codes, q_lab, db_lab, x_cfg.retrieval_queries, x_cfg.retrieval_top)
    res["checks"], res["check_details"] = run_checks(cfg, runs, res, g.finite, g.unmoved, g.zero_grad)
    for name, hit in res["checks"].items():
        if hit:
            log.warning("%s: CHECK TRIGGERED: %s: %s", label, name, res["check_details"][name])
    return res


def _attack_row(r: AttackRun, per_query: dict, g: Gathered, valid, targets, ap, label: str) -> dict:
    aps = per_query[r.name]
    own, ref = perceptibility_from_rows(g.pert[r.name][g.attacked[r.name]])
    row = {**asdict(r), "map": float(aps.mean()), "tmap": None, "perceptibility": own,
           "perceptibility_reference": ref, "zero_perturbation": int(g.unmoved[r.name].sum()),
           "seconds_per_rank": [round(s, 1) for s in g.seconds[r.name]]}
    if r.name == "mainstay" and SINGLE_RUN in per_query:
        row["single_run_map"] = float(per_query[SINGLE_RUN].mean())  # its first restart alone
    if r.kind == "targeted" and bool(valid.any()):
        row["tmap"] = float(ap(g.codes[r.name][valid], targets[valid]).mean())
    log.info("%s: %s (%s, eps %.4f, %d iters%s) mAP %.4f%s", label, r.name, r.kind, r.eps, r.iters,
             f" x {r.restarts} restarts" if r.restarts > 1 else "", row["map"],
             "" if row["tmap"] is None else f", t-mAP {row['tmap']:.4f}")
    return row


def _worst_case(res: dict, runs: list[AttackRun], per_query: dict, g: Gathered, eps: float, n: int, label: str):
    """(per-query worst AP, the codes that gave it) over the attacks within
    the budget; (None, None) when none is."""
    eligible = [r.name for r in runs if r.eps <= eps + 1e-12]
    if not eligible:
        return None, None
    stack = torch.stack([per_query[name] for name in eligible])  # A x n
    worst, arg = stack.min(0)
    worst_codes = torch.stack([g.codes[name] for name in eligible])[arg, torch.arange(n)]
    res["worst_case"] = {"map": float(worst.mean()), "attacks": eligible,
                         "lowest_by": {name: int((arg == i).sum()) for i, name in enumerate(eligible)}}
    log.info("%s: worst case over %d attacks mAP %.4f (clean %.4f)", label, len(eligible),
             res["worst_case"]["map"], res["clean_map"])
    return worst, worst_codes


def _eps_sweep(cfg: RunConfig, res: dict, per_query: dict, g: Gathered, q_lab, ap) -> dict:
    """mAP over ``experiment.eps_sweep``: one run of the mainstay attack of
    ``attack.iters`` at every budget (at ``attack.eps``: its first restart)."""
    points = {}
    for v in cfg.experiment.eps_sweep:
        if v == 0:
            points[v] = res["clean_map"]
        elif f"eps:{v!r}" in g.codes:
            points[v] = float(ap(g.codes[f"eps:{v!r}"], q_lab).mean())
        else:
            points[v] = float(per_query[SINGLE_RUN].mean())
    return {"eps": list(points), "map": list(points.values()), "attack": "mainstay", "iters": cfg.attack.iters,
            "restarts": 1, "theory_map": res["theory_map"], "random_map": res["random_map"]}


def _curves(cfg: RunConfig, curves: dict, db_codes, q_lab, db_lab) -> dict:
    e = cfg.eval
    if e.pr_points == "reference":
        pr = {name: precision_recall_reference(c, db_codes, q_lab, db_lab, e.pr_levels - 1) for name, c in curves.items()}
    else:
        pr = {name: precision_recall_curve(c, db_codes, q_lab, db_lab, e.pr_levels) for name, c in curves.items()}
    return {"pr_curve": {"points": e.pr_points, "recall": next(iter(pr.values()))[0].tolist(),
                         **{name: p.tolist() for name, (_, p) in pr.items()}},
            "precision_at": {name: {str(k): v for k, v in precision_at_n(c, db_codes, q_lab, db_lab,
                                                                          e.precision_at).items()}
                             for name, c in curves.items()}}


def _retrieval(codes, db_codes, q_lab, db_lab, queries: int, top: int) -> dict:
    """Top results of the first ``queries`` queries, clean and under the mainstay attack."""
    q = min(queries, len(q_lab))
    out = {"queries": list(range(q)), "attack": "mainstay" if "mainstay" in codes else None}
    for name in ("clean", "mainstay"):
        if name not in codes or q == 0:
            continue
        idx = torch.cat([i for _, i in rank_database(codes[name][:q], db_codes, top)])
        rel = (q_lab[:q].unsqueeze(1) * db_lab[idx]).sum(-1) > 0
        out[f"{name}_top"] = idx.tolist()
        out[f"{name}_relevant"] = rel.tolist()
    return out


def run_checks(cfg: RunConfig, runs: list[AttackRun], res: dict, finite: dict, unmoved: dict,
               zero_grad: torch.Tensor) -> tuple[dict, dict]:
    """Each check: True (triggered), False (passed) or None (not run); and
    a detail per check ('none' when it passed, 'not run: <why>' when not run)."""
    details = {
        "zero_perturbation": _zero_perturbation(runs, unmoved),
        "nonfinite_codes": _nonfinite(finite),
        "zero_input_gradient": (f"{int(zero_grad.sum())} of {len(zero_grad)} queries have an all-zero or "
                                "non-finite input gradient of the mainstay loss" if int(zero_grad.sum()) else "none"),
        "blackbox_beats_whitebox": _blackbox(cfg, runs, res),
        "map_not_falling_with_eps": _plateau(cfg, res["eps_sweep"]),
    }
    checks = {name: None if details[name].startswith("not run") else details[name] != "none" for name in CHECKS}
    return checks, details


def _zero_perturbation(runs: list[AttackRun], unmoved: dict) -> str:
    if not any(r.eps > 0 for r in runs):
        return "not run: no attack with a budget above 0"
    zeros = {name: int(z.sum()) for name, z in unmoved.items() if int(z.sum())}
    return f"queries returned where the attack started (the query or its own random start): {zeros}" if zeros else "none"


def _nonfinite(finite: dict) -> str:
    bad = {name: int((~f).sum()) for name, f in finite.items() if int((~f).sum())}
    return f"queries with non-finite outputs (before the tanh): {bad}" if bad else "none"


def _blackbox(cfg: RunConfig, runs: list[AttackRun], res: dict) -> str:
    white = {r.name: res["attacks"][r.name]["map"] for r in runs if r.kind == "untargeted" and r.whitebox}
    black = {r.name: res["attacks"][r.name]["map"] for r in runs if not r.whitebox}
    if not black:
        return "not run: no black-box attack in experiment.attacks"
    if not white:
        return "not run: no white-box untargeted attack in experiment.attacks"
    beats = {b: v for b, v in black.items() if v < min(white.values()) - cfg.experiment.checks.blackbox_margin}
    return f"{beats} below every white-box untargeted attack (best {min(white.values()):.4f})" if beats else "none"


def _plateau(cfg: RunConfig, sweep: dict | None) -> str:
    """Steps of the sweep where mAP stops falling while it is still above
    both floors (theory bound and random codes) by more than
    ``checks.floor_margin``: a step to a larger budget that raises mAP, a
    step that lowers it by less than ``checks.min_drop`` after an earlier
    step lowered it by more (the curve flattened after it began to fall), or
    a whole sweep that lowers it by less than ``checks.min_drop``. A robust
    model is flat at small budgets and falls faster as the budget grows
    (measured: SAAT 0.7752, 0.7703, 0.7655, 0.7493, 0.6797 at 0, 2, 4, 8,
    16/255); masking flattens the curve after it falls, or everywhere."""
    c = cfg.experiment.checks
    if sweep is None:
        return "not run: this evaluation runs no eps sweep"
    eps, maps = sweep["eps"], sweep["map"]
    if len(eps) < 2:
        return "not run: experiment.eps_sweep has fewer than two budgets"
    floor = max(sweep["theory_map"], sweep["random_map"]) + c.floor_margin
    whole_flat = maps[0] - maps[-1] < c.min_drop
    flat, fell = [], False
    for e0, e1, m0, m1 in zip(eps, eps[1:], maps, maps[1:]):
        if m0 > floor and (m1 > m0 or (m0 - m1 < c.min_drop and (fell or whole_flat))):
            flat.append((e0, e1, m0, m1))
        fell = fell or m0 - m1 >= c.min_drop
    return ("; ".join(f"eps {e0 * 255:.1f}/255 -> {e1 * 255:.1f}/255: mAP {m0:.4f} -> {m1:.4f} "
                      f"({'rises' if m1 > m0 else f'falls by less than {c.min_drop}'} while above {floor:.4f})"
                      for e0, e1, m0, m1 in flat)
            if flat else "none")


def robustness_stage(cfg: RunConfig, which: str, run_dir: Path, rank: int, world: int, device, source: DataSource,
                     transfer_to: list[str] | None = None) -> dict | None:
    """Evaluate ``run_dir/<which>/model.pt`` with the whole suite (and score its
    transfer examples on the models of ``transfer_to``); rank 0 writes
    ``<which>/robustness.json`` and ``<which>/retrieval_images.pt``."""
    from saat_dist.training.trainer import load_model

    def load(folder):
        m = load_model(cfg, run_dir / folder / "model.pt", device)
        return m.to(torch.bfloat16) if cfg.distributed.precision == "bf16" else m

    model = load(which)
    others = {name: load(name) for name in (transfer_to or [])}
    t = time.monotonic()
    res = evaluate_robustness(cfg, model, source, device, which, rank, world, others, run_dir / which)
    peak = all_gather_ragged(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64))
    if rank == 0:
        res["resources"].update({"seconds": round(time.monotonic() - t, 2), "ranks": world,
                                 "peak_rss_mib_per_rank": [round(int(v) / 1024, 1) for v in peak]})
        write_text_atomic(run_dir / which / RESULTS, json.dumps(res, indent=1))
    barrier()
    return res
