"""The one report writer of every evaluation's results, with two views:

- the run view (``write_run_report``): ``report.json``, ``report.md`` and
  plots of a ``saat-dist run`` directory, from the benign and SAAT models'
  results (``eval.json``, the one results format) and their training logs
  (``train.json``: the loss curves);
- the experiment view (``write_experiment_report``): ``experiment.json``,
  ``experiment.md``, Tables I and II as CSV and LaTeX
  (``saat_dist.evaluation.tables``) and plots from the cells' results
  (``robustness.json``).

Both write one leaderboard entry per model (``leaderboard/<model id>.json``,
``saat_dist.evaluation.leaderboard``) and every plot as PNG and PDF (the
same name, ``.pdf``): ``plots`` lists the PNGs, ``plots_pdf`` the PDFs. A
missing value is no bar (a gap marked n/a); t-mAP (higher: a stronger
targeted attack) has an axis of its own, never the mAP axis.

experiment.json::

  {"table1": [{"hash", "bits", "attack", "kind", "map", "tmap", "eps", "iters", "restarts"}],   # benign model
   "table2": [{"hash", "bits", "defence", "attack", "map"}],   # attack "none": clean; "worst_case"
   "transfer": [{"hash", "bits", "source": "none", "target", "attack", "map"}],
   "checks": {"<check>": false},   # true if it triggered in any evaluation, null if it ran in none
   "check_details": [{"hash", "bits", "defence", "check", "detail"}],   # triggered or not run
   "orderings": {"<claim>": true | false},
   "orderings_detail": {"<claim>": {"difference", "standard_error", "clear", "budgets", "like_for_like"}},
   "settings": {...}, "plots": [...], "plots_pdf": [...],
   "tables": ["table1.csv", "table1.tex", "table2.csv", "table2.tex"], "leaderboard": ["leaderboard/<id>.json"]}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from saat_dist.attacks import ATTACK_REGISTRY
from saat_dist.checkpoint import file_sha256, load_state, write_text_atomic
from saat_dist.config import RunConfig
from saat_dist.defences import DEFENCES
from saat_dist.evaluation.checks import CHECKS
from saat_dist.evaluation.leaderboard import leaderboard_entry, write_leaderboard
from saat_dist.evaluation.results import RESULTS_FORMAT, results_current
from saat_dist.evaluation.stage import RETRIEVAL_IMAGES
from saat_dist.evaluation.suite import SINGLE_RUN
from saat_dist.evaluation.certify_report import certify_markdown
from saat_dist.evaluation.training_cost import cost_figure, cost_markdown, cost_rows
from saat_dist.evaluation.tables import fmt, table1_markdown, table1_rows, table2_markdown, table2_rows, write_tables
from saat_dist.stages import model_folder

log = logging.getLogger("saat_dist")
DEFENCE_NAMES = {"none": "no defence", **{name: d.label for name, d in DEFENCES.items()}}
ATTACK_NAMES = {**{name: a.label for name, a in ATTACK_REGISTRY.items()}, SINGLE_RUN: "mainstay (ours), its first run alone",
                "none": "clean (no attack)", "worst_case": "**worst case**"}


# ---------------------------------------------------------------- run view
def run_view(res: dict) -> dict:
    """The run's summary of one model's results: clean, the mainstay attack
    (one run), the targeted attack and, when it ran, the strong check."""
    a = res["attacks"]
    view = {"clean_map": res["clean_map"], "random_map": res["random_map"], "attacked_map": a["mainstay"]["map"],
            "perceptibility": a["mainstay"]["perceptibility"],
            "perceptibility_reference": a["mainstay"]["perceptibility_reference"], "theory_map": res["theory_map"]}
    if "mainstay_targeted" in a:
        view["targeted_tmap"] = a["mainstay_targeted"]["tmap"]
    for key in ("clean_tmap", "theory_tmap", "targeted_queries"):
        if key in res:
            view[key] = res[key]
    if "mainstay_strong" in a:
        s = a["mainstay_strong"]
        view["attacked_map_strong"] = s["map"]
        view["strong_check"] = {"queries": s["queries"], "iters": s["iters"], "restarts": s["restarts"],
                                "attacked_map_same_queries": s["mainstay_map_same_queries"]}
    view["pr_curve"] = {"points": res["pr_curve"]["points"], "recall": res["pr_curve"]["recall"],
                        "clean": res["pr_curve"]["clean"], "attacked": res["pr_curve"]["mainstay"]}
    view["precision_at"] = {"clean": res["precision_at"]["clean"], "attacked": res["precision_at"]["mainstay"]}
    view["checks"] = res["checks"]
    view["resources"] = res["resources"]
    return view


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# the run's bars: mAP (higher: more robust) and, on an axis of their own, t-mAP (higher: a stronger targeted attack)
MAP_BARS = (("clean_map", "clean"), ("attacked_map", "mainstay attack"), ("attacked_map_strong", "strong attack"))
TMAP_BARS = (("clean_tmap", "no attack"), ("targeted_tmap", "targeted attack"))
NOT_AVAILABLE = "n/a"


def _grouped_bars(ax, evals: dict[str, dict], metrics: tuple[tuple[str, str], ...]) -> None:
    """One group of bars per metric, one bar per stage; a missing value is
    no bar but a gap marked n/a (a 0 bar would read as a measured 0)."""
    width = 0.8 / len(evals)
    for i, (stage, res) in enumerate(evals.items()):
        xs = [j + i * width for j in range(len(metrics))]
        present = [(x, res[k]) for x, (k, _) in zip(xs, metrics) if res.get(k) is not None]
        if present:
            ax.bar([x for x, _ in present], [v for _, v in present], width, label=stage, color=f"C{i}")
        for x, (k, _) in zip(xs, metrics):
            if res.get(k) is None:
                ax.text(x, 0.02, NOT_AVAILABLE, ha="center", va="bottom", rotation=90, fontsize=8, color="gray")
    ax.set_xticks([j + width * (len(evals) - 1) / 2 for j in range(len(metrics))], [m for _, m in metrics])


def map_per_stage_figure(evals: dict[str, dict]):
    """The run's summary bars: mAP per stage on the left axes, t-mAP on the
    right axes of its own; returns the figure (plots/map_per_stage.*)."""
    plt = _pyplot()
    fig, (ax, tax) = plt.subplots(1, 2, figsize=(9, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    _grouped_bars(ax, evals, MAP_BARS)
    rnd = next(iter(evals.values()))["random_map"]
    ax.axhline(rnd, color="gray", ls=":", label=f"random codes ({rnd:.2f})")
    ax.set(ylabel="mAP (higher: more robust)", ylim=(0, 1), title="mAP per stage")
    ax.legend(fontsize=8)
    _grouped_bars(tax, evals, TMAP_BARS)
    tax.set(ylabel="t-mAP (higher: a stronger targeted attack)", ylim=(0, 1), title="Targeted attack, t-mAP")
    for a in (ax, tax):
        a.grid(alpha=0.3, axis="y")
    return fig


# train.json keys that are not a loss: a fraction of code bits, drawn on an axis of its own
NOT_A_LOSS = ("bits_flipped",)


def loss_curve_figure(trainings: dict[str, dict]):
    """The loss parts of each training (a train.json per label): a line per
    part over the steps (means over each log interval, ``log``) and circles
    at epoch ends (epoch means over every worker, ``history``);
    ``bits_flipped`` on a right-hand axis. None when no training has a log."""
    shown = {k: t for k, t in trainings.items() if t.get("log") or t.get("history")}
    if not shown:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 4), squeeze=False)
    for ax, (label, t) in zip(axes[0], shown.items()):
        records, history = t.get("log") or [], t.get("history") or []
        spe = (t.get("schedule") or {}).get("steps_per_epoch")
        keys = list(dict.fromkeys(k for rec in (*records, *history) for k in rec if k != "step"))
        other = None
        handles = []
        for i, key in enumerate(keys):
            target = ax
            if key in NOT_A_LOSS:
                other = other or ax.twinx()
                target = other
            color = "black" if key == "loss" else f"C{i}"  # the total in black, its parts in colour
            steps = [r["step"] for r in records if r.get(key) is not None]
            if steps:  # a dot at each point: a stage of one log step still shows
                handles += target.plot(steps, [r[key] for r in records if r.get(key) is not None], "-", marker=".",
                                       color=color, lw=2 if key == "loss" else 1.2, label=key)
            if spe and history:
                at = [((e + 1) * spe, h[key]) for e, h in enumerate(history) if h.get(key) is not None]
                line = target.plot([s for s, _ in at], [v for _, v in at], "o", mfc="none", color=color,
                                   label=key if not steps else "_epoch mean")
                if not steps:
                    handles += line
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{label}: loss parts (lines: per log step, "
                                                              "circles: epoch means)")
        ax.title.set_fontsize(9)
        if other is not None:
            other.set_ylabel("bits flipped (fraction)")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8)
    return fig


def _run_plots(run_dir: Path, evals: dict[str, dict], trainings: dict[str, dict]) -> list[str]:
    """The run's plots (PNG, a PDF beside each); returns the PNGs' paths in the run directory."""
    plt = _pyplot()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for stage, res in evals.items():
        pr = res["pr_curve"]
        ax.plot(pr["recall"], pr["clean"], "-o", ms=3, label=f"{stage} clean")
        ax.plot(pr["recall"], pr["attacked"], "--o", ms=3, label=f"{stage} attacked")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, clean vs mainstay attack", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    written = [_save(fig, out / "pr_curves.png", run_dir, dpi=120)]
    written.append(_save(map_per_stage_figure(evals), out / "map_per_stage.png", run_dir, dpi=120))
    fig = loss_curve_figure(trainings)
    if fig is not None:
        written.append(_save(fig, out / LOSS_CURVES, run_dir, dpi=120))
    return written


LOSS_CURVES = "loss_curves.png"


def save_figure(fig, path: Path, out: Path, dpi: int = 110) -> str:
    """A figure as PNG at ``path`` with a PDF beside it; returns the PNG's path relative to ``out``."""
    return _save(fig, path, out, dpi)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    return _pyplot()


def pdf_of(png: str) -> str:
    """The PDF written beside a plot's PNG."""
    return str(Path(png).with_suffix(".pdf"))


def write_run_report(cfg: RunConfig, run_dir: str | Path, source=None) -> dict:
    """report.json, report.md, the plots and the leaderboard entries of a
    ``saat-dist run`` directory (the run view of the benign and SAAT models'
    results). ``source``: the data set (its manifest goes into the entries'
    settings digest); None reads the manifest from ``data.shard_dir``."""
    run_dir = Path(run_dir)
    evals, full = {}, {}
    for stage in ("benign", "saat"):
        path = run_dir / stage / "eval.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run the '{stage}' evaluation before the report")
        if not results_current(path):
            raise ValueError(f"{path}: results of an older saat-dist (not {RESULTS_FORMAT}); evaluate again: "
                             f"saat-dist evaluate --which {stage} (or saat-dist run --resume)")
        full[stage] = json.loads(path.read_text())
        evals[stage] = run_view(full[stage])
    stages_path = run_dir / "stages.json"
    stage_seconds = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    skipped = {}  # corrupt samples skipped in training (data.skip_corrupt), all ranks
    where = {}  # each stage's ranks: host, process and (on Ray) node id
    trainings = {}  # each stage's train.json: the loss curves
    for stage in ("benign", "saat"):
        train_json = run_dir / stage / "train.json"
        if train_json.is_file():
            train = trainings[stage] = json.loads(train_json.read_text())
            skipped[stage] = sum(train.get("skipped_samples_per_rank", []))
            where[f"train_{stage}"] = train.get("ranks", [])
        results = json.loads((run_dir / stage / "eval.json").read_text())
        where[f"evaluate_{stage}"] = results.get("resources", {}).get("where", [])
    report = {
        "name": cfg.name,
        "random_map": evals["benign"]["random_map"],
        "top_k": cfg.eval.top_k,
        "bits": cfg.model.bits,
        "backbone": cfg.model.backbone,
        "loss": cfg.train.loss,
        "attack": {"eps": cfg.attack.eps, "iters": cfg.attack.iters, "step_size": cfg.attack.step_size,
                   "loss": cfg.attack.loss, "strong_factor": cfg.attack.strong_factor,
                   "strong_restarts": cfg.attack.strong_restarts},
        "saat_eps": cfg.saat.eps,
        **{stage: {k: v for k, v in res.items() if k != "random_map"} for stage, res in evals.items()},
        "stage_seconds": stage_seconds,
        "skipped_samples": skipped,
        "ranks": where,
    }
    report["plots"] = _run_plots(run_dir, evals, trainings)
    report["plots_pdf"] = [pdf_of(p) for p in report["plots"]]
    report["leaderboard"] = _run_leaderboard(cfg, run_dir, full, source)
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=1))
    write_text_atomic(run_dir / "report.md", _run_markdown(report))
    return report


def _digests(cfg: RunConfig, source) -> tuple[dict | None, str | None]:
    """(settings digests, the data's manifest digest) of a leaderboard entry;
    (None, None) with a warning when the data set's manifest cannot be read."""
    from saat_dist.data.source import DataSource
    from saat_dist.evaluation.identity import manifest_digest, settings_digests

    if source is None:
        try:
            source = DataSource.open(cfg.data.shard_dir, cfg.data.base_url, verify=False)
        except (OSError, ValueError) as e:
            log.warning("leaderboard entries without settings digests (the data set's manifest is needed): %s", e)
            return None, None
    return settings_digests(cfg, source), manifest_digest(source)


def _run_leaderboard(cfg: RunConfig, run_dir: Path, results: dict[str, dict], source) -> list[str]:
    """leaderboard/<id>.json for the run's benign and SAAT models."""
    digests, manifest = _digests(cfg, source)
    entries = []
    for stage, defence in (("benign", "none"), ("saat", "saat")):
        model = run_dir / stage / "model.pt"
        entries.append(leaderboard_entry(
            results[stage], kind="run", name=cfg.name, results_path=f"{stage}/eval.json", hash_loss=cfg.train.loss,
            backbone=cfg.model.backbone, bits=cfg.model.bits, defence=defence, defence_label=DEFENCE_NAMES[defence],
            model_sha256=file_sha256(model) if model.is_file() else None, shard_dir=cfg.data.shard_dir,
            manifest_sha256=manifest, image_size=cfg.data.image_size, digests=digests, attack_labels=ATTACK_NAMES, factory=cfg.model.factory))
    return write_leaderboard(run_dir, entries)


def _run_markdown(r: dict) -> str:
    rows = [("clean mAP", "clean_map"), ("mainstay attack mAP", "attacked_map"),
            ("strong attack mAP", "attacked_map_strong"), ("theory bound (untargeted)", "theory_map"),
            ("targeted t-mAP", "targeted_tmap"), ("clean t-mAP (no attack)", "clean_tmap"),
            ("theory bound (targeted)", "theory_tmap")]
    lines = [f"# SAAT run `{r['name']}`", "",
             f"{r['backbone']}, {r['bits']} bits, {r['loss']}; mAP@{r['top_k']}; attack eps = "
             f"{r['attack']['eps'] * 255:.0f}/255, {r['attack']['iters']} iterations, {r['attack']['loss']} loss; "
             f"SAAT eps = {r['saat_eps'] * 255:.0f}/255.", "",
             f"Random codes (floor of meaning): mAP {r['random_map']:.4f}", "",
             "| metric | benign | SAAT |", "|---|---|---|"]
    for label, key in rows:
        b, s = r["benign"].get(key), r["saat"].get(key)
        lines.append(f"| {label} | {'' if b is None else f'{b:.4f}'} | {'' if s is None else f'{s:.4f}'} |")
    p = r["benign"]["perceptibility"]
    lines += ["", f"Perturbation (benign attack): L-inf {p['linf']:.4f}, L2 {p['l2']:.3f}, MSE {p['mse']:.2e}", "",
              "Stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()), ""]
    nodes = {w.get("node_id", w.get("host")) for ranks in r.get("ranks", {}).values() for w in ranks}
    if r.get("ranks"):
        lines += ["Where the ranks ran (node, host): " + "; ".join(
            f"{stage} " + ", ".join(f"{w['rank']}: {str(w.get('node_id', '-'))[:12]} {w.get('host', '')}" for w in ranks)
            for stage, ranks in r["ranks"].items() if ranks) + f" ({len(nodes)} node(s))", ""]
    if any(r["skipped_samples"].values()):
        lines += ["**Corrupt training samples skipped** (data.skip_corrupt): " + ", ".join(
            f"{k} {v}" for k, v in r["skipped_samples"].items()), ""]
    lines += ["![PR curves](plots/pr_curves.png)", "",
              "![mAP per stage; t-mAP on its own axis, a missing value marked n/a](plots/map_per_stage.png)", ""]
    if f"plots/{LOSS_CURVES}" in r.get("plots", []):
        lines += [f"![Loss curves of benign and SAAT training](plots/{LOSS_CURVES})", ""]
    lines += ["Every plot also as PDF: " + ", ".join(f"[{Path(p).name}]({p})" for p in r.get("plots_pdf", [])) + ".",
              "", "Leaderboard entries (saat-dist/leaderboard-entry/v1): "
              + ", ".join(f"[{Path(p).name}]({p})" for p in r.get("leaderboard", [])) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- experiment view
def experiment_tables(cells: dict) -> dict:
    """The rows of experiment.json from {(hash, bits): {defence: results}}."""
    table1, table2, transfer, details = [], [], [], []
    checks = dict.fromkeys(CHECKS)
    for (h, b), by_defence in cells.items():
        benign = by_defence.get("none")
        if benign is not None:
            for name, r in benign["attacks"].items():
                table1.append({"hash": h, "bits": b, "attack": name, "kind": r["kind"], "map": r["map"],
                               "tmap": r["tmap"], "eps": r["eps"], "iters": r["iters"], "restarts": r["restarts"]})
                if "single_run_map" in r:  # its first restart alone: one run, as the other attacks
                    table1.append({"hash": h, "bits": b, "attack": SINGLE_RUN, "kind": r["kind"],
                                   "map": r["single_run_map"], "tmap": None, "eps": r["eps"], "iters": r["iters"],
                                   "restarts": 1})
            for target, per_attack in benign.get("transfer", {}).items():
                for name, m in per_attack.items():
                    transfer.append({"hash": h, "bits": b, "source": "none", "target": target, "attack": name, "map": m})
        for defence, res in by_defence.items():
            table2.append({"hash": h, "bits": b, "defence": defence, "attack": "none", "map": res["clean_map"]})
            for name, r in res["attacks"].items():
                table2.append({"hash": h, "bits": b, "defence": defence, "attack": name, "map": r["map"]})
            if "worst_case" in res:
                table2.append({"hash": h, "bits": b, "defence": defence, "attack": "worst_case",
                               "map": res["worst_case"]["map"]})
            for name, hit in res["checks"].items():
                if hit is not None:  # ran: triggered anywhere wins over passed
                    checks[name] = bool(checks[name]) or hit
                if hit is not False:  # triggered or not run: say which and why
                    details.append({"hash": h, "bits": b, "defence": defence, "check": name,
                                    "detail": res["check_details"][name]})
    claims, claim_detail = orderings(cells)
    return {"table1": table1, "table2": table2, "transfer": transfer, "checks": checks, "check_details": details,
            "orderings": claims, "orderings_detail": claim_detail}


def paired(a: list[float], b: list[float]) -> dict:
    """mean(a - b) over the same queries and its standard error; ``clear``
    when the difference exceeds two standard errors."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("inf")
    mean = float(d.mean())
    return {"difference": mean, "standard_error": se, "clear": abs(mean) > 2 * se}


def orderings(cells: dict) -> tuple[dict, dict]:
    """The paper's claims, measured per cell and judged like for like:
    {claim: true/false} and, per claim, the paired difference over the same
    queries with its standard error (a claim whose difference is within two
    standard errors is a tie at this number of queries, whichever way it
    falls). Attacks are compared one run each (the mainstay attack's first
    restart, as HAG and SDHA make one run), with their gradient steps per
    query beside the verdict (``like_for_like``: the same on both sides).
    Claims that hold by construction (the worst case at most each attack)
    are not listed."""
    out, detail = {}, {}

    def claim(name, lower, upper, **extra):
        """``lower`` <= ``upper``, as per-query AP lists."""
        out[name] = sum(lower) <= sum(upper)
        detail[name] = {**paired(lower, upper), **extra}

    for (h, b), by in cells.items():
        tag = f"{h}-{b}"
        benign = by.get("none", {})
        ap, attacks = benign.get("per_query_ap", {}), benign.get("attacks", {})
        for other in ("hag", "sdha"):
            if SINGLE_RUN in ap and other in ap:
                steps = {"mainstay": attacks["mainstay"]["iters"], other: attacks[other]["iters"]}
                claim(f"{tag}: mainstay mAP <= {other} mAP (benign model; one run each, {steps['mainstay']} vs "
                      f"{steps[other]} gradient steps)", ap[SINGLE_RUN], ap[other], budgets=steps,
                      like_for_like=steps["mainstay"] == steps[other])
        saat = by.get("saat", {}).get("per_query_ap", {}).get("worst_case")
        for other in [d for d in (*DEFENCES, "none") if d != "saat"]:
            theirs = by.get(other, {}).get("per_query_ap", {}).get("worst_case")
            if saat is not None and theirs is not None:
                claim(f"{tag}: SAAT worst case >= {other} worst case", theirs, saat, like_for_like=True)
    return out, detail


def write_experiment_report(cfg: RunConfig, cells: dict, source) -> dict:
    out = Path(cfg.output_dir)
    report = experiment_tables(cells)
    a = cfg.attack
    report["settings"] = {
        "name": cfg.name, "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
        "shard_dir": cfg.data.shard_dir, "counts": {s: source.count(s) for s in ("train", "test", "database")},
        "queries": next((r["queries"] for by in cells.values() for r in by.values()), 0),
        "top_k": cfg.eval.top_k, "eps": a.eps, "defence_eps": {s: getattr(cfg, s).eps for s in DEFENCES},
    }
    def seconds(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    report["settings"]["seconds"] = {"total": seconds(out / "stages.json").get("experiment"),
                                     "cells": {f"{h}-{b}": seconds(out / "cells" / f"{h}-{b}" / "stages.json")
                                               for h, b in cells}}
    report["cost"] = cost_rows(cells, out / "cells", DEFENCE_NAMES)
    report["certified"] = [  # experiment.certify: per model and l2 radius
        {"hash": h, "bits": b, "defence": d, "smoothed_clean_map": res["certified"]["smoothed_clean_map"],
         **{k: row[k] for k in ("radius_l2", "linf_equivalent", "certified_map", "abstention_rate",
                                "mean_hamming_radius")}, "attack_violations": row["attack_check"]["violations"]}
        for (h, b), by in cells.items() for d, res in by.items() if "certified" in res
        for row in res["certified"]["radii"]]
    report["plots"] = _plots(cfg, cells, source, out, report["cost"])
    report["plots_pdf"] = [pdf_of(p) for p in report["plots"]]
    report["tables"] = write_tables(out, report, [f"{h} {b}" for h, b in cells], ATTACK_NAMES, DEFENCE_NAMES, cfg.name)
    report["leaderboard"] = _experiment_leaderboard(cfg, cells, source)
    write_text_atomic(out / "experiment.json", json.dumps(report, indent=1))
    write_text_atomic(out / "experiment.md", _markdown(cfg, cells, report))
    if any(report["checks"].values()):
        log.warning("experiment: CHECKS TRIGGERED: %s (see experiment.md)",
                    ", ".join(k for k, v in report["checks"].items() if v))
    not_run = [k for k, v in report["checks"].items() if v is None]
    if not_run:
        log.info("experiment: checks not run: %s (see experiment.md)", ", ".join(not_run))
    return report


def _experiment_leaderboard(cfg: RunConfig, cells: dict, source) -> list[str]:
    """leaderboard/<id>.json for every model of every cell, with its cell's settings digests."""
    from saat_dist.evaluation.identity import cell_config, manifest_digest, settings_digests

    out, manifest, entries = Path(cfg.output_dir), manifest_digest(source), []
    for (h, b), by in cells.items():
        cell_cfg = cell_config(cfg, h, b)
        digests = settings_digests(cell_cfg, source)
        for defence, res in by.items():
            folder = Path(cell_cfg.output_dir) / model_folder(defence)
            model = folder / "model.pt"
            entries.append(leaderboard_entry(
                res, kind="experiment", name=cfg.name, results_path=str((folder / "robustness.json").relative_to(out)),
                hash_loss=h, backbone=cfg.model.backbone, bits=b, defence=defence,
                defence_label=DEFENCE_NAMES.get(defence, defence),
                model_sha256=file_sha256(model) if model.is_file() else None, shard_dir=cfg.data.shard_dir,
                manifest_sha256=manifest, image_size=cfg.data.image_size, digests=digests,
                attack_labels=ATTACK_NAMES, factory=cfg.model.factory))
    return write_leaderboard(out, entries)


def _markdown(cfg: RunConfig, cells: dict, r: dict) -> str:
    """experiment.md: the settings, Tables I and II in the paper's layout, every
    attack against every defence, transfer, the checks, the orderings, the plots."""
    cols = [f"{h} {b}" for h, b in cells]
    lines = [*_md_settings(cfg, r), *_md_table1(r, cols), *_md_table2(cells, r, cols), *_md_every_attack(cells),
             *_md_certified(cells), *_md_transfer(r), *cost_markdown(r.get("cost", [])), *_md_checks(r),
             *_md_orderings(r)]
    lines += ["", "## Files for a paper", "",
              "Tables I and II as CSV and LaTeX (booktabs): " + ", ".join(f"[{t}]({t})" for t in r.get("tables", []))
              + f"; one leaderboard entry per model (saat-dist/leaderboard-entry/v1, {len(r.get('leaderboard', []))} "
              "in all): [leaderboard/](leaderboard/); every plot below also as PDF beside its PNG: "
              + ", ".join(f"[{Path(p).name}]({p})" for p in r.get("plots_pdf", [])) + "."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    return "\n".join(lines)


def _md_settings(cfg: RunConfig, r: dict) -> list[str]:
    s, a = r["settings"], cfg.attack
    lines = [f"# Experiment `{cfg.name}`", "",
             f"{s['backbone']} at {s['image_size']} px; data `{s['shard_dir']}` ({s['counts']['train']} train / "
             f"{s['counts']['test']} query / {s['counts']['database']} database); {s['queries']} queries attacked; "
             f"mAP@{s['top_k']}; attack budget eps = {a.eps * 255:.1f}/255; defences trained at "
             + ", ".join(f"{k} {v * 255:.1f}/255" for k, v in s["defence_eps"].items()) + ".", ""]
    secs = s["seconds"]
    if secs.get("total") is not None:
        lines += [f"Wall time {secs['total'] / 60:.1f} min; per stage (s): " + "; ".join(
            f"{cell}: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) for cell, stages in secs["cells"].items()),
                  ""]
    return lines


def _md_table1(r: dict, cols: list[str]) -> list[str]:
    lines = ["## Table I: attacks on the benign model", "",
             "mAP under each attack (lower: a stronger untargeted attack); targeted rows: mAP / **t-mAP** "
             "(higher t-mAP: a stronger targeted attack).", ""]
    return lines + table1_markdown(table1_rows(r, cols, ATTACK_NAMES), cols)


def _md_table2(cells: dict, r: dict, cols: list[str]) -> list[str]:
    lines = ["", "## Table II: defences", "",
             "Paper layout: mAP under the mainstay attack / under the worst case over every attack, clean mAP in "
             "brackets (higher: more robust).", ""]
    return lines + table2_markdown(table2_rows(r, cols, DEFENCE_NAMES), cols)


def _md_every_attack(cells: dict) -> list[str]:
    lines: list[str] = []
    for (h, b), by in cells.items():
        ds = list(by)
        lines += ["", f"Every attack, {h} {b} bits (mAP):", "",
                  "| attack | " + " | ".join(DEFENCE_NAMES.get(d, d) for d in ds) + " |", "|---" * (1 + len(ds)) + "|"]
        for name in ["none", *next(iter(by.values()))["attacks"], "worst_case"]:
            vals = []
            for d in ds:
                res = by[d]
                v = res["clean_map"] if name == "none" else (res.get("worst_case", {}).get("map") if name == "worst_case"
                                                             else res["attacks"].get(name, {}).get("map"))
                vals.append(fmt(v))
            lines.append(f"| {ATTACK_NAMES.get(name, name)} | " + " | ".join(vals) + " |")
        lines.append("| random codes (floor) | " + " | ".join(f"{by[d]['random_map']:.4f}" for d in ds) + " |")
    return lines


def _md_transfer(r: dict) -> list[str]:
    if not r["transfer"]:
        return []
    targets = list(dict.fromkeys(row["target"] for row in r["transfer"]))
    lines = ["", "## Transfer: crafted on the benign model, scored on each defence (mAP)", "",
             "| generator | cell | " + " | ".join(DEFENCE_NAMES.get(t, t) for t in targets) + " |",
             "|---" * (2 + len(targets)) + "|"]
    rows: dict = {}
    for row in r["transfer"]:
        rows.setdefault((row["attack"], f"{row['hash']} {row['bits']}"), {})[row["target"]] = row["map"]
    for (name, cell), per in rows.items():
        lines.append(f"| {ATTACK_NAMES.get(name, name)} | {cell} | " + " | ".join(fmt(per.get(t)) for t in targets) + " |")
    return lines


def _md_checks(r: dict) -> list[str]:
    lines = ["", "## Checks", ""]
    triggered = [d for d in r["check_details"] if not d["detail"].startswith("not run")]
    skipped = [d for d in r["check_details"] if d["detail"].startswith("not run")]
    if triggered:
        lines += ["**Triggered:**", ""] + [f"- **{d['check']}** ({d['hash']} {d['bits']}, {d['defence']}): {d['detail']}"
                                           for d in triggered] + [""]
    passed = [k for k, v in r["checks"].items() if v is False]
    if passed:
        lines.append("Passed in every evaluation where they ran: " + ", ".join(passed) + ".")
    if skipped:
        lines += ["", "**Not run** (a check that did not run says nothing):", ""] + [
            f"- {d['check']} ({d['hash']} {d['bits']}, {d['defence']}): {d['detail']}" for d in skipped]
    return lines


def _md_certified(cells: dict) -> list[str]:
    """Per cell, the certified table (experiment.certify) beside Table II."""
    lines = []
    for (h, b), by in cells.items():
        certified = {DEFENCE_NAMES.get(d, d): res["certified"] for d, res in by.items() if "certified" in res}
        lines += certify_markdown(certified, f"Certified robustness beside Table II ({h} {b})")
    return lines


def _md_orderings(r: dict) -> list[str]:
    lines = ["", "## The paper's orderings, as measured", "",
             "Paired over the same queries: difference of mAP (lower side minus upper side) and its standard error; "
             "within two standard errors the two are tied at this number of queries. Attacks are compared one run "
             "each: the mainstay attack's first restart against HAG's and SDHA's single run, at the gradient "
             "steps per query named in each line (the worst case of Table II uses every restart).", ""]
    for k, v in r["orderings"].items():
        d = r["orderings_detail"].get(k)
        stats = "" if d is None else (f" (difference {d['difference']:+.4f} ± {d['standard_error']:.4f}"
                                      + ("" if d["clear"] else ", a tie within noise")
                                      + ("" if d.get("like_for_like", True) else ", NOT like for like: the budgets differ")
                                      + ")")
        lines.append(f"- {'holds' if v else 'does NOT hold'}: {k}{stats}")
    return lines


def _plots(cfg: RunConfig, cells: dict, source, out: Path, cost: list[dict] | None = None) -> list[str]:
    plt = _pyplot()
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    for (h, b), by in cells.items():
        tag = f"{h}-{b}"
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for d, res in by.items():
            if "eps_sweep" not in res:  # not measured: no line (never a line at 0)
                continue
            sw = res["eps_sweep"]
            ax.plot([e * 255 for e in sw["eps"]], sw["map"], "-o", ms=4, label=DEFENCE_NAMES.get(d, d))
        ax.axhline(next(iter(by.values()))["random_map"], color="gray", ls=":", label="random codes")
        ax.set(xlabel="eps (x 1/255)", ylabel=f"mAP@{cfg.eval.top_k}", ylim=(0, 1.02),
               title=f"mAP vs eps, mainstay attack ({tag})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, plots / f"map_vs_eps_{tag}.png", out))
        rows = [r for r in cost or [] if (r["hash"], r["bits"]) == (h, b)]
        if rows:
            fig = cost_figure(rows, tag, plt, next(iter(by.values())).get("random_map"))
            written.append(_save(fig, plots / f"robustness_vs_cost_{tag}.png", out))

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for i, (d, res) in enumerate(by.items()):
            color = f"C{i}"
            pr = res["pr_curve"]
            axes[0].plot(pr["recall"], pr["clean"], "-", color=color, label=f"{DEFENCE_NAMES.get(d, d)} clean")
            if "worst_case" in pr:
                axes[0].plot(pr["recall"], pr["worst_case"], "--", color=color, label=f"{DEFENCE_NAMES.get(d, d)} worst case")
            p_at = res["precision_at"]
            ns = [int(k) for k in p_at["clean"]]
            axes[1].plot(ns, list(p_at["clean"].values()), "-o", ms=3, color=color, label=f"{DEFENCE_NAMES.get(d, d)} clean")
            if "worst_case" in p_at:
                axes[1].plot(ns, list(p_at["worst_case"].values()), "--o", ms=3, color=color,
                             label=f"{DEFENCE_NAMES.get(d, d)} worst case")
        axes[0].set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall ({tag})")
        axes[1].set(xlabel="N", ylabel="precision@N", ylim=(0, 1.02), title=f"Precision@N ({tag})")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        written.append(_save(fig, plots / f"pr_and_precision_at_n_{tag}.png", out))
        written += _retrieval_pictures(cfg, tag, by, source, out, plots, plt)
        trainings = {}
        for d in by:
            train_json = out / "cells" / tag / model_folder(d) / "train.json"
            if train_json.is_file():
                trainings[DEFENCE_NAMES.get(d, d)] = json.loads(train_json.read_text())
        fig = loss_curve_figure(trainings)
        if fig is not None:
            written.append(_save(fig, plots / f"loss_curves_{tag}.png", out))
    return written


def _retrieval_pictures(cfg, tag, by, source, out, plots, plt) -> list[str]:
    cell_dir = Path(cfg.output_dir) / "cells" / tag
    wanted = {i for res in by.values() for key in ("clean_top", "mainstay_top") for row in res["retrieval"].get(key, [])
              for i in row}
    if not wanted:
        return []
    db = source.images("database", wanted, cfg.data.image_size, cfg.data.resize)
    written = []
    for d, res in by.items():
        ret = res["retrieval"]
        path = cell_dir / model_folder(d) / RETRIEVAL_IMAGES
        if not path.is_file() or "mainstay_top" not in ret:
            continue
        shown = load_state(path)
        rows = []
        for i in range(len(ret["queries"])):
            for kind, img in (("clean", shown["clean"][i]), ("mainstay", shown["adversarial"][i])):
                found = [(db[idx], GREEN if rel else RED)
                         for idx, rel in zip(ret[f"{kind}_top"][i], ret[f"{kind}_relevant"][i])]
                rows.append([(img, BLACK), *found])
        # one image of framed thumbnails (a grid of subplots took seconds per picture)
        grid = _thumbnail_grid(rows)
        height, width = grid.shape[:2]
        fig, ax = plt.subplots(figsize=(width / 100, height / 100 + 0.4))
        ax.imshow(grid, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"{DEFENCE_NAMES.get(d, d)} ({tag}): per query, its top {len(rows[0]) - 1} clean (upper row) "
                     "and under the mainstay attack (lower row); first column: the query; green = relevant",
                     fontsize=7)
        written.append(_save(fig, plots / f"retrieval_{tag}_{d}.png", out))
    return written


BLACK, GREEN, RED = (0, 0, 0), (0, 160, 0), (220, 0, 0)
THUMB, FRAME, GAP = 64, 3, 4  # thumbnail side, frame width, space between thumbnails (pixels)


def _thumbnail_grid(rows: list[list[tuple[torch.Tensor, tuple[int, int, int]]]]) -> np.ndarray:
    """uint8 H x W x 3: row r, column c holds image rows[r][c] (uint8 3 x S x S)
    at THUMB pixels inside a frame of its colour; a wider gap after every
    second row (a query's pair) and after the first column (the query)."""
    cell = THUMB + 2 * FRAME
    cols = max(len(r) for r in rows)
    height = len(rows) * (cell + GAP) + (len(rows) // 2) * GAP
    width = cols * (cell + GAP) + GAP
    grid = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        top = r * (cell + GAP) + (r // 2) * GAP
        for c, (img, colour) in enumerate(row):
            left = c * (cell + GAP) + (GAP if c else 0)
            thumb = F.interpolate(img[None].float(), size=(THUMB, THUMB), mode="bilinear", antialias=True,
                                  align_corners=False)[0].round().clamp(0, 255).byte()
            grid[top : top + cell, left : left + cell] = colour
            grid[top + FRAME : top + FRAME + THUMB, left + FRAME : left + FRAME + THUMB] = thumb.permute(1, 2, 0).numpy()
    return grid


def _save(fig, path: Path, out: Path, dpi: int = 110) -> str:
    """``path`` (PNG) and the same figure as a PDF beside it; returns the PNG's path relative to ``out``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    # no creation date: the same figure gives the same PDF bytes
    fig.savefig(path.with_suffix(".pdf"), metadata={"CreationDate": None})
    _pyplot().close(fig)
    return str(path.relative_to(out))
