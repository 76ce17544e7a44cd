"""The results of one model's evaluation, from every rank's gathered codes
(rank 0): every attack's mAP with its budget, the worst case per query,
per-query APs, the eps sweep, PR and precision@N curves, the retrieval
lists and the checks. One format for ``saat-dist run`` and ``experiment``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from saat_dist.attacks import Attack
from saat_dist.attacks.perceptibility import perceptibility_from_rows
from saat_dist.config import RunConfig
from saat_dist.evaluation.checks import run_checks
from saat_dist.evaluation.plan import random_map
from saat_dist.evaluation.suite import SINGLE_RUN, Gathered, Suite
from saat_dist.metrics import average_precision, precision_at_n, precision_recall_curve, precision_recall_reference, rank_database

RESULTS_FORMAT = "saat-dist-robustness/4"  # bumped when results change shape: older ones are recomputed

log = logging.getLogger("saat_dist")


@dataclass
class Scored:
    """One model's gathered codes against the database: what every part of the results reads."""

    cfg: RunConfig
    label: str
    attacks: list[Attack]
    suite: Suite
    q_lab: torch.Tensor
    db_codes: torch.Tensor
    db_lab: torch.Tensor
    g: Gathered
    sweep: bool = False  # the eps sweep ran

    def ap(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return average_precision(codes, self.db_codes, labels, self.db_lab, self.cfg.eval.top_k)


def results(s: Scored) -> dict:
    """Every number of one model's evaluation (see the module docstring)."""
    cfg, g, suite, q_lab = s.cfg, s.g, s.suite, s.q_lab
    n = len(q_lab)
    clean_ap = s.ap(g.codes["clean"], q_lab)
    res: dict = {"format": RESULTS_FORMAT, "label": s.label, "queries": n, "top_k": cfg.eval.top_k, "eps": cfg.attack.eps,
                 "clean_map": float(clean_ap.mean()),
                 "random_map": random_map(q_lab, s.db_lab, cfg.model.bits, cfg.eval.top_k, cfg.seed + 20),
                 "theory_map": float(s.ap(-suite.guide_of(q_lab), q_lab).mean())}
    valid, targets = suite.valid, suite.targets
    if bool(valid.any()):
        res["theory_tmap"] = float(s.ap(suite.guide_of(targets[valid]), targets[valid]).mean())
        res["clean_tmap"] = float(s.ap(g.codes["clean"][valid], targets[valid]).mean())
    res["targeted_queries"] = int(valid.sum())
    per_query = {a.name: s.ap(g.codes[a.name], q_lab) for a in s.attacks}
    if SINGLE_RUN in g.codes:
        per_query[SINGLE_RUN] = s.ap(g.codes[SINGLE_RUN], q_lab)
    res["attacks"] = {a.name: _attack_row(s, a, per_query) for a in s.attacks}
    worst, worst_codes = _worst_case(s, res, per_query)
    res["per_query_ap"] = {"clean": [round(float(v), 6) for v in clean_ap],
                           **{name: [round(float(v), 6) for v in aps] for name, aps in per_query.items()},
                           **({"worst_case": [round(float(v), 6) for v in worst]} if worst is not None else {})}
    if s.sweep:
        res["eps_sweep"] = _eps_sweep(s, res, per_query)
    curves = {"clean": g.codes["clean"]}
    if "mainstay" in g.codes:
        curves["mainstay"] = g.codes["mainstay"]
    if worst_codes is not None:
        curves["worst_case"] = worst_codes
    res.update(_curves(s, curves))
    res["retrieval"] = _retrieval(s, cfg.experiment.retrieval_queries, cfg.experiment.retrieval_top)
    res["checks"], res["check_details"] = run_checks(cfg, s.attacks, res, g.finite, g.unmoved, g.zero_grad)
    for name, hit in res["checks"].items():
        if hit:
            log.warning("%s: CHECK TRIGGERED: %s: %s", s.label, name, res["check_details"][name])
    return res


def _attack_row(s: Scored, a: Attack, per_query: dict) -> dict:
    """One attack's mAP over its queries (the strong check: its first ones;
    targeted: every query, those without a target at their clean image),
    with its budget, perceptibility and time."""
    eps, iters, restarts = a.budget(s.cfg.attack)
    limit = s.suite.limits[a.name]
    aps = per_query[a.name][:limit]
    attacked = s.g.attacked[a.name]
    own, ref = perceptibility_from_rows(s.g.pert[a.name][attacked])
    row = {"name": a.name, "kind": a.kind, "eps": eps, "iters": iters, "restarts": restarts, "whitebox": a.whitebox,
           "queries": limit, "map": float(aps.mean()), "tmap": None, "perceptibility": own,
           "perceptibility_reference": ref, "zero_perturbation": int(s.g.unmoved[a.name].sum()),
           "seconds_per_rank": [round(v, 1) for v in s.g.seconds[a.name]]}
    if a.name == "mainstay" and SINGLE_RUN in per_query:
        row["single_run_map"] = float(per_query[SINGLE_RUN].mean())  # its first restart alone
    if a.queries is not None and "mainstay" in per_query:  # the plain attack re-scored on the same queries
        row["mainstay_map_same_queries"] = float(per_query["mainstay"][:limit].mean())
    valid, targets = s.suite.valid, s.suite.targets
    if a.kind == "targeted" and bool(valid.any()):
        row["tmap"] = float(s.ap(s.g.codes[a.name][valid], targets[valid]).mean())
    log.info("%s: %s (%s, eps %.4f, %d iters%s%s) mAP %.4f%s", s.label, a.name, a.kind, eps, iters,
             f" x {restarts} restarts" if restarts > 1 else "", f", {limit} queries" if limit < len(s.q_lab) else "",
             row["map"], "" if row["tmap"] is None else f", t-mAP {row['tmap']:.4f}")
    return row


def _worst_case(s: Scored, res: dict, per_query: dict):
    """(per-query worst AP, the codes that gave it) over the attacks within
    the budget; (None, None) when none is."""
    eligible = [a.name for a in s.attacks if a.budget(s.cfg.attack)[0] <= s.cfg.attack.eps + 1e-12]
    if not eligible:
        return None, None
    n = len(s.q_lab)
    stack = torch.stack([per_query[name] for name in eligible])  # A x n
    worst, arg = stack.min(0)
    worst_codes = torch.stack([s.g.codes[name] for name in eligible])[arg, torch.arange(n)]
    res["worst_case"] = {"map": float(worst.mean()), "attacks": eligible,
                         "lowest_by": {name: int((arg == i).sum()) for i, name in enumerate(eligible)}}
    log.info("%s: worst case over %d attacks mAP %.4f (clean %.4f)", s.label, len(eligible),
             res["worst_case"]["map"], res["clean_map"])
    return worst, worst_codes


def _eps_sweep(s: Scored, res: dict, per_query: dict) -> dict:
    """mAP over ``experiment.eps_sweep``: one run of the mainstay attack of
    ``attack.iters`` at every budget (at ``attack.eps``: its first restart)."""
    points = {}
    for v in s.cfg.experiment.eps_sweep:
        if v == 0:
            points[v] = res["clean_map"]
        elif f"eps:{v!r}" in s.g.codes:
            points[v] = float(s.ap(s.g.codes[f"eps:{v!r}"], s.q_lab).mean())
        else:
            points[v] = float(per_query[SINGLE_RUN].mean())
    return {"eps": list(points), "map": list(points.values()), "attack": "mainstay", "iters": s.cfg.attack.iters,
            "restarts": 1, "theory_map": res["theory_map"], "random_map": res["random_map"]}


def _curves(s: Scored, curves: dict) -> dict:
    e = s.cfg.eval
    if e.pr_points == "reference":
        pr = {name: precision_recall_reference(c, s.db_codes, s.q_lab, s.db_lab, e.pr_levels - 1)
              for name, c in curves.items()}
    else:
        pr = {name: precision_recall_curve(c, s.db_codes, s.q_lab, s.db_lab, e.pr_levels) for name, c in curves.items()}
    return {"pr_curve": {"points": e.pr_points, "recall": next(iter(pr.values()))[0].tolist(),
                         **{name: p.tolist() for name, (_, p) in pr.items()}},
            "precision_at": {name: {str(k): v for k, v in precision_at_n(c, s.db_codes, s.q_lab, s.db_lab,
                                                                          e.precision_at).items()}
                             for name, c in curves.items()}}


def _retrieval(s: Scored, queries: int, top: int) -> dict:
    """Top results of the first ``queries`` queries, clean and under the mainstay attack."""
    q = min(queries, len(s.q_lab))
    codes = s.g.codes
    out = {"queries": list(range(q)), "attack": "mainstay" if "mainstay" in codes else None}
    for name in ("clean", "mainstay"):
        if name not in codes or q == 0:
            continue
        idx = torch.cat([i for _, i in rank_database(codes[name][:q], s.db_codes, top)])
        rel = (s.q_lab[:q].unsqueeze(1) * s.db_lab[idx]).sum(-1) > 0
        out[f"{name}_top"] = idx.tolist()
        out[f"{name}_relevant"] = rel.tolist()
    return out


def results_current(path) -> bool:
    """Whether ``path`` holds results in this format (older ones are evaluated again)."""
    path = Path(path)
    try:
        return path.is_file() and json.loads(path.read_text()).get("format") == RESULTS_FORMAT
    except (ValueError, AttributeError):
        return False
