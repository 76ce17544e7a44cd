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
every single attack's mAP at that budget.

Checks, run on every evaluation and written into the results (a triggered
check is logged as a warning and shown in the report):

- ``zero_perturbation``: an attack returned some query unchanged (eps > 0);
- ``nonfinite_codes``: a clean or adversarial output was NaN or infinite;
- ``zero_input_gradient``: the mainstay loss has an all-zero (or non-finite)
  input gradient at some clean query: gradient masking or a dead model;
- ``blackbox_beats_whitebox``: the gradient-free attack got a lower mAP than
  every white-box untargeted attack (by more than
  ``experiment.checks.blackbox_margin``): gradients are not guiding the
  white-box attacks;
- ``map_not_falling_with_eps``: over ``experiment.eps_sweep`` (mainstay
  attack) a larger budget gave a higher mAP (by more than
  ``experiment.checks.eps_tolerance``).

``transfer``: examples of the transfer generators crafted on this model are
also scored on other models (``transfer_to``): crafted on A, scored on B.

Streaming as ``saat_dist.evaluation``: each rank encodes its shards of the
database and train splits and attacks its own queries; codes, labels and
per-query flags are gathered; rank 0 computes the metrics.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass
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
    pgd_attack,
    sdha_attack,
    square_attack,
    target_code_attack,
    transfer_attack,
)
from saat_dist.attacks.perceptibility import (
    perceptibility_from_sums,
    perceptibility_sums,
    reference_perceptibility_from_sums,
    reference_perceptibility_sums,
)
from saat_dist.attacks.transfer import GENERATORS
from saat_dist.checkpoint import save_state, write_text_atomic
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.distributed.collectives import all_gather_ragged, all_reduce_sum, barrier, broadcast
from saat_dist.evaluation import _count_below, _gather_sorted, encode_split, random_map
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
RESULTS_FORMAT = "saat-dist-robustness/2"  # bumped when results change shape: older ones are recomputed
RETRIEVAL_IMAGES = "retrieval_images.pt"
CHECKS = ("zero_perturbation", "nonfinite_codes", "zero_input_gradient", "blackbox_beats_whitebox",
          "map_not_falling_with_eps")


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


class _Suite:
    """Everything the attacks of one evaluation need, prepared once per rank."""

    def __init__(self, cfg, model, device, rank, tr_codes, tr_lab, db_codes, db_lab, q_lab_all, runs):
        self.cfg, self.model, self.device, self.rank = cfg, model, device, rank
        self.tr_codes, self.tr_lab = tr_codes, tr_lab
        self.table = label_set_table(tr_codes, tr_lab)
        names = {r.name for r in runs}
        # targets drawn once from all query labels: the same whatever the split over ranks
        self.targets, self.valid = choose_targets(q_lab_all, torch.unique(db_lab, dim=0),
                                                  torch.Generator().manual_seed(cfg.seed + 11))
        self.anchors = {}
        for name in ("dhta", "p2p"):
            if name in names:
                c = getattr(cfg.attack, name)
                self.anchors[name] = anchor_codes(self.targets, db_codes, db_lab, c.anchors,
                                                  torch.Generator().manual_seed(cfg.seed + 31 + c.anchors))
        self.tha_codes = self._tha_codes(q_lab_all.shape[1]) if "tha" in names else None
        self.generators = {r.name: torch.Generator(device=device).manual_seed(cfg.seed + 100 + i + 1000 * rank)
                           for i, r in enumerate(runs)}
        self.sweep_generator = torch.Generator(device=device).manual_seed(cfg.seed + 99 + 1000 * rank)

    def guide_of(self, labels: torch.Tensor, weighting: str = "cosine") -> torch.Tensor:
        return mainstay_from_table(labels, *self.table, weighting)

    def _tha_codes(self, num_classes: int) -> torch.Tensor:
        """THA's target codes for every query: a PrototypeNet trained on rank 0
        against this model's training codes, its codes broadcast."""
        c = self.cfg.attack.tha
        codes = torch.zeros(len(self.targets), self.cfg.model.bits)
        if self.rank == 0:
            trainer = PrototypeTrainer(num_classes, self.cfg.model.bits, torch.unique(self.tr_lab, dim=0),
                                       total_steps=c.pnet_steps, seed=self.cfg.seed + 41, device=self.device,
                                       lr=c.pnet_lr)
            progress = Progress("THA PrototypeNet", c.pnet_steps, every_s=self.cfg.log_every_s)
            trainer.fit(self.tr_codes.to(self.device), self.tr_lab.to(self.device), c.pnet_steps, c.pnet_batch,
                        progress)
            codes = trainer.target_codes(self.targets).cpu()
        return broadcast(codes)

    def run(self, r: AttackRun, x: torch.Tensor, lab: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Adversarial images of one attack for a batch (targeted: rows without
        a valid target keep their clean image)."""
        a, m, gen = self.cfg.attack, self.model, self.generators[r.name]
        if r.kind == "targeted":
            v = self.valid[idx]
            out = x.clone()
            if not bool(v.any()):
                return out
            xv, iv = x[v.to(x.device)], idx[v]
            if r.name == "mainstay_targeted":
                adv = pgd_attack(m, xv, self.guide_of(self.targets[iv]).to(self.device), eps=r.eps,
                                 step_size=a.step_size, iters=r.iters, targeted=True, loss=a.loss, generator=gen)
            elif r.name in ("dhta", "p2p"):
                adv = target_code_attack(m, xv, self.anchors[r.name][iv].to(self.device), eps=r.eps,
                                         step_size=getattr(a, r.name).step_size, iters=r.iters)
            else:  # tha
                adv = target_code_attack(m, xv, self.tha_codes[iv].to(self.device), eps=r.eps,
                                         step_size=a.tha.step_size, iters=r.iters)
            out[v.to(x.device)] = adv
            return out
        guide = self.guide_of(lab).to(self.device)
        if r.name == "mainstay":
            return pgd_attack(m, x, guide, eps=r.eps, step_size=a.step_size, iters=r.iters, loss=a.loss,
                              restarts=r.restarts, generator=gen)
        if r.name == "hag":
            h = a.hag
            return hag_attack(m, x, eps=r.eps, iters=r.iters, lr=h.lr, threshold=h.threshold, beta=h.beta)
        if r.name == "sdha":
            s = a.sdha
            return sdha_attack(m, x, lab, self.tr_codes, self.tr_lab, eps=r.eps, iters=r.iters, lr=s.lr,
                               weight=s.weight, sigma=s.sigma, z=s.z)
        if r.name == "square":
            return square_attack(m, x, guide, eps=r.eps, iters=r.iters, p_init=a.square.p_init, generator=gen)
        t = a.transfer
        return transfer_attack(r.name, m, x, guide, eps=r.eps, step_size=t.step_size, iters=r.iters, loss=a.loss,
                               decay=t.decay, di_prob=t.di_prob, di_resize=t.di_resize, si_copies=t.si_copies,
                               vmi_neighbours=t.vmi_neighbours, vmi_beta=t.vmi_beta, generator=gen)

    def sweep(self, eps: float, x: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        a = self.cfg.attack
        return pgd_attack(self.model, x, self.guide_of(lab).to(self.device), eps=eps, step_size=a.step_size,
                          iters=a.iters, loss=a.loss, generator=self.sweep_generator)

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
def _codes(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(+-1 codes on the CPU, per-row 'all outputs finite') at test time."""
    with model_mode(model, "eval"):
        u = model(x, alpha=1.0)
    return torch.where(u >= 0, 1.0, -1.0).cpu(), torch.isfinite(u).all(1).cpu()


def evaluate_robustness(cfg: RunConfig, model: nn.Module, source: DataSource, device, label: str,
                        rank: int = 0, world: int = 1, transfer_to: dict[str, nn.Module] | None = None,
                        run_dir: Path | None = None) -> dict | None:
    """Every number of one model's robustness evaluation (rank 0; None elsewhere).
    ``transfer_to``: models that also score this model's transfer examples."""
    x_cfg, a, e = cfg.experiment, cfg.attack, cfg.eval
    runs = attack_plan(cfg)
    db_codes, db_lab = encode_split(model, source, "database", cfg, device, rank, world)
    tr_codes, tr_lab = encode_split(model, source, "train", cfg, device, rank, world)
    targets_db = {name: encode_split(m, source, "database", cfg, device, rank, world)[0]
                  for name, m in (transfer_to or {}).items()}
    q_index_all, q_lab_all = source.labels("test")
    order = torch.argsort(q_index_all)
    n = min(x_cfg.num_queries or len(order), len(order))
    q_lab_all = q_lab_all[order][:n]
    t0 = time.monotonic()
    suite = _Suite(cfg, model, device, rank, tr_codes, tr_lab, db_codes, db_lab, q_lab_all, runs)
    sweep = [v for v in x_cfg.eps_sweep if v > 0 and not (abs(v - a.eps) < 1e-12 and "mainstay" in x_cfg.attacks)]
    transfers = [r for r in runs if r.name in GENERATORS] if transfer_to else []

    mine = source.rank_shards("test", rank, world)
    units = _count_below(source, mine, n) * (len(runs) + len(sweep))
    progress = Progress(f"{label} robustness (rank {rank}/{world})" if world > 1 else f"{label} robustness",
                        units, unit="query-attack", every_s=cfg.log_every_s if rank == 0 else 1e9)
    keys = ["clean", *[r.name for r in runs], *[f"eps:{v!r}" for v in sweep],
            *[f"transfer:{t}:{r.name}" for t in (transfer_to or {}) for r in transfers]]
    codes = {k: [] for k in keys}
    finite = {k: [] for k in keys}
    zero_pert = {r.name: [] for r in runs}
    pert = {r.name: torch.zeros(5, dtype=torch.float64) for r in runs}
    pert_ref = {r.name: torch.zeros(3, dtype=torch.float64) for r in runs}
    seconds = {r.name: 0.0 for r in runs}
    index, zero_grad = [], []
    shown = {"index": [], "clean": [], "adv": []}
    for images, lab, idx in source.batches("test", cfg.data.image_size, a.batch_size, mine, keep=lambda i: i < n,
                                           resize=cfg.data.resize):
        x = images.to(device).float().div_(255)
        index.append(idx)
        zero_grad.append(suite.input_gradient_is_zero(x, lab))
        c, f = _codes(model, x)
        codes["clean"].append(c)
        finite["clean"].append(f)
        for r in runs:
            t = time.monotonic()
            x_adv = suite.run(r, x, lab, idx)
            seconds[r.name] += time.monotonic() - t
            c, f = _codes(model, x_adv)
            codes[r.name].append(c)
            finite[r.name].append(f)
            moved = (x_adv - x).flatten(1).abs().amax(1).cpu() > 0
            attacked = suite.valid[idx] if r.kind == "targeted" else torch.ones(len(idx), dtype=torch.bool)
            zero_pert[r.name].append(attacked & ~moved & (r.eps > 0))
            pert[r.name] += perceptibility_sums(x[attacked.to(x.device)], x_adv[attacked.to(x.device)])
            pert_ref[r.name] += reference_perceptibility_sums(x[attacked.to(x.device)], x_adv[attacked.to(x.device)])
            if r in transfers:
                for tname, tmodel in transfer_to.items():
                    tc, tf = _codes(tmodel, x_adv)
                    codes[f"transfer:{tname}:{r.name}"].append(tc)
                    finite[f"transfer:{tname}:{r.name}"].append(tf)
            if r.name == "mainstay":
                show = idx < x_cfg.retrieval_queries
                shown["index"].append(idx[show])
                shown["clean"].append(images[show])
                shown["adv"].append((x_adv[show.to(x.device)] * 255).round().to(torch.uint8).cpu())
            progress.update(len(x))
        for v in sweep:
            c, f = _codes(model, suite.sweep(v, x, lab))
            codes[f"eps:{v!r}"].append(c)
            finite[f"eps:{v!r}"].append(f)
            progress.update(len(x))

    def cat(parts, shape, dtype=torch.float32):  # a rank may have no queries at all
        return torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype)

    k, size = cfg.model.bits, cfg.data.image_size
    gathered = _gather_sorted(cat(index, (0,), torch.int64), *[cat(codes[key], (0, k)) for key in keys],
                              *[cat(finite[key], (0,), torch.bool) for key in keys],
                              *[cat(zero_pert[r.name], (0,), torch.bool) for r in runs],
                              cat(zero_grad, (0,), torch.bool))
    q_index = gathered[0]
    codes_all = dict(zip(keys, gathered[1 : 1 + len(keys)]))
    finite_all = dict(zip(keys, gathered[1 + len(keys) : 1 + 2 * len(keys)]))
    zero_all = dict(zip([r.name for r in runs], gathered[1 + 2 * len(keys) : 1 + 2 * len(keys) + len(runs)]))
    zero_grad_all = gathered[-1]
    pert = {name: all_reduce_sum(v) for name, v in pert.items()}
    pert_ref = {name: all_reduce_sum(v) for name, v in pert_ref.items()}
    seconds_all = {name: all_gather_ragged(torch.tensor([v], dtype=torch.float64)).tolist() for name, v in seconds.items()}
    shown_index, shown_clean, shown_adv = _gather_sorted(
        cat(shown["index"], (0,), torch.int64), cat(shown["clean"], (0, 3, size, size), torch.uint8),
        cat(shown["adv"], (0, 3, size, size), torch.uint8))
    attack_seconds = time.monotonic() - t0
    if rank != 0:
        return None
    assert torch.equal(q_index, torch.arange(n)), "every query is evaluated exactly once"
    if run_dir is not None:
        save_state({"index": shown_index, "clean": shown_clean, "adversarial": shown_adv},
                   run_dir / RETRIEVAL_IMAGES)
    return _results(cfg, label, runs, sweep, transfers, transfer_to or {}, suite, q_lab_all, db_codes, db_lab,
                    targets_db, codes_all, finite_all, zero_all, zero_grad_all, pert, pert_ref, seconds_all,
                    attack_seconds)


def _results(cfg, label, runs, sweep, transfers, transfer_to, suite, q_lab, db_codes, db_lab, targets_db, codes,
             finite, zero, zero_grad, pert, pert_ref, seconds, attack_seconds) -> dict:
    x_cfg, a, e = cfg.experiment, cfg.attack, cfg.eval
    n = len(q_lab)

    def ap(c, labels, db=db_codes):
        return average_precision(c, db, labels, db_lab, e.top_k)

    clean_ap = ap(codes["clean"], q_lab)
    res: dict = {"label": label, "queries": n, "top_k": e.top_k, "eps": a.eps,
                 "clean_map": float(clean_ap.mean()),
                 "random_map": random_map(q_lab, db_lab, cfg.model.bits, e.top_k, cfg.seed + 20),
                 "theory_map": float(ap(-suite.guide_of(q_lab), q_lab).mean())}
    valid = suite.valid
    targets = suite.targets
    if bool(valid.any()):
        res["theory_tmap"] = float(ap(suite.guide_of(targets[valid]), targets[valid]).mean())
        res["clean_tmap"] = float(ap(codes["clean"][valid], targets[valid]).mean())
    res["targeted_queries"] = int(valid.sum())
    attacks, per_query = {}, {}
    for r in runs:
        aps = ap(codes[r.name], q_lab)
        per_query[r.name] = aps
        row = {**asdict(r), "map": float(aps.mean()), "tmap": None,
               "perceptibility": perceptibility_from_sums(pert[r.name]),
               "perceptibility_reference": reference_perceptibility_from_sums(pert_ref[r.name]),
               "zero_perturbation": int(zero[r.name].sum()), "seconds_per_rank": [round(s, 1) for s in seconds[r.name]]}
        if r.kind == "targeted" and bool(valid.any()):
            row["tmap"] = float(ap(codes[r.name][valid], targets[valid]).mean())
        attacks[r.name] = row
        log.info("%s: %s (%s, eps %.4f, %d iters%s) mAP %.4f%s", label, r.name, r.kind, r.eps, r.iters,
                 f" x {r.restarts} restarts" if r.restarts > 1 else "", row["map"],
                 "" if row["tmap"] is None else f", t-mAP {row['tmap']:.4f}")
    res["attacks"] = attacks
    eligible = [r.name for r in runs if r.eps <= a.eps + 1e-12]
    if eligible:
        stack = torch.stack([per_query[name] for name in eligible])  # A x n
        worst, arg = stack.min(0)
        worst_codes = torch.stack([codes[name] for name in eligible])[arg, torch.arange(n)]
        res["worst_case"] = {"map": float(worst.mean()), "attacks": eligible,
                             "lowest_by": {name: int((arg == i).sum()) for i, name in enumerate(eligible)}}
        log.info("%s: worst case over %d attacks mAP %.4f (clean %.4f)", label, len(eligible),
                 res["worst_case"]["map"], res["clean_map"])
    else:
        worst_codes = None
    # per-query APs, for paired comparisons between attacks and between models on the same queries
    res["per_query_ap"] = {"clean": [round(float(v), 6) for v in clean_ap],
                           **{name: [round(float(v), 6) for v in aps] for name, aps in per_query.items()},
                           **({"worst_case": [round(float(v), 6) for v in worst]} if eligible else {})}
    sweep_map = {}
    for v in x_cfg.eps_sweep:
        if v == 0:
            sweep_map[v] = res["clean_map"]
        elif f"eps:{v!r}" in codes:
            sweep_map[v] = float(ap(codes[f"eps:{v!r}"], q_lab).mean())
        else:
            sweep_map[v] = attacks["mainstay"]["map"]
    res["eps_sweep"] = {"eps": list(sweep_map), "map": list(sweep_map.values()), "attack": "mainstay",
                        "iters": a.iters}
    res["transfer"] = {t: {r.name: float(average_precision(codes[f"transfer:{t}:{r.name}"], targets_db[t], q_lab,
                                                            db_lab, e.top_k).mean()) for r in transfers}
                       for t in transfer_to}
    curves = {"clean": codes["clean"]}
    if "mainstay" in codes:
        curves["mainstay"] = codes["mainstay"]
    if worst_codes is not None:
        curves["worst_case"] = worst_codes
    if e.pr_points == "reference":
        pr = {name: precision_recall_reference(c, db_codes, q_lab, db_lab, e.pr_levels - 1) for name, c in curves.items()}
    else:
        pr = {name: precision_recall_curve(c, db_codes, q_lab, db_lab, e.pr_levels) for name, c in curves.items()}
    res["pr_curve"] = {"points": e.pr_points, "recall": next(iter(pr.values()))[0].tolist(),
                       **{name: p.tolist() for name, (_, p) in pr.items()}}
    res["precision_at"] = {name: {str(k): v for k, v in precision_at_n(c, db_codes, q_lab, db_lab,
                                                                        e.precision_at).items()}
                           for name, c in curves.items()}
    res["retrieval"] = _retrieval(codes, db_codes, q_lab, db_lab, x_cfg.retrieval_queries, x_cfg.retrieval_top)
    res["checks"], res["check_details"] = _checks(cfg, runs, res, finite, zero, zero_grad)
    for name, hit in res["checks"].items():
        if hit:
            log.warning("%s: CHECK TRIGGERED: %s: %s", label, name, res["check_details"][name])
    res["resources"] = {"attack_seconds": round(attack_seconds, 1)}
    return res


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


def _checks(cfg, runs, res, finite, zero, zero_grad) -> tuple[dict, dict]:
    c = cfg.experiment.checks
    details = {}
    zeros = {name: int(z.sum()) for name, z in zero.items() if int(z.sum())}
    details["zero_perturbation"] = f"queries returned unchanged: {zeros}" if zeros else "none"
    bad = {name: int((~f).sum()) for name, f in finite.items() if int((~f).sum())}
    details["nonfinite_codes"] = f"queries with non-finite outputs: {bad}" if bad else "none"
    details["zero_input_gradient"] = (f"{int(zero_grad.sum())} of {len(zero_grad)} queries have an all-zero or "
                                      "non-finite input gradient of the mainstay loss" if int(zero_grad.sum()) else "none")
    white = {r.name: res["attacks"][r.name]["map"] for r in runs if r.kind == "untargeted" and r.whitebox}
    black = {r.name: res["attacks"][r.name]["map"] for r in runs if not r.whitebox}
    beats = {b: v for b, v in black.items() if white and v < min(white.values()) - c.blackbox_margin}
    details["blackbox_beats_whitebox"] = (f"{beats} below every white-box untargeted attack (best {min(white.values()):.4f})"
                                          if beats else "none")
    sweep = res["eps_sweep"]
    rises = [(e0, e1, m0, m1) for e0, e1, m0, m1 in zip(sweep["eps"], sweep["eps"][1:], sweep["map"], sweep["map"][1:])
             if m1 > m0 + c.eps_tolerance]
    details["map_not_falling_with_eps"] = ("; ".join(f"eps {e0 * 255:.1f}/255 -> {e1 * 255:.1f}/255: mAP {m0:.4f} -> {m1:.4f}"
                                                     for e0, e1, m0, m1 in rises) if rises else "none")
    checks = {name: details[name] != "none" for name in CHECKS}
    return checks, details


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
