"""One model's evaluation, streamed: the one pipeline of ``saat-dist run``
and ``saat-dist experiment`` (and of any later evaluation).

No process holds a split's images. Each rank encodes its shards of the
database and train splits, takes its share of the global query batches and
runs every attack of the stage's plan on each batch (``evaluation.suite``);
codes, labels and per-query flags are gathered; rank 0 computes the results
(``evaluation.results``) and writes them. Every random draw is keyed by the
query, encoding batches never span shards and rank 0 sums in query order,
so the numbers do not depend on the number of workers.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from saat_dist.attacks.transfer import GENERATORS
from saat_dist.checkpoint import save_state, write_text_atomic
from saat_dist.comm.collectives import all_gather_json, all_gather_ragged, barrier
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.device import Place
from saat_dist.evaluation.plan import EvaluationStage, encode_split, iter_query_batches, query_batches, query_labels
from saat_dist.evaluation.results import Scored, results
from saat_dist.evaluation.suite import SINGLE_RUN, Collected, Suite, attack_batch, gather, plan_attacks
from saat_dist.metrics import average_precision
from saat_dist.models.model_file import load_model
from saat_dist.progress import Progress

RETRIEVAL_IMAGES = "retrieval_images.pt"


def sweep_budgets(cfg: RunConfig, attacks: list[str]) -> list[float]:
    """The budgets of ``experiment.eps_sweep`` that need a run of their own:
    not 0 (the clean mAP), and not ``attack.eps`` when the mainstay attack
    runs (its first restart is that point)."""
    a = cfg.attack
    return [v for v in cfg.experiment.eps_sweep if v > 0 and not (abs(v - a.eps) < 1e-12 and "mainstay" in attacks)]


def evaluate(cfg: RunConfig, model: nn.Module, source: DataSource, stage: EvaluationStage, place: Place = Place(),
             transfer_to: dict[str, nn.Module] | None = None, run_dir: Path | None = None) -> dict | None:
    """Every number of one model's evaluation (rank 0; None elsewhere).
    ``transfer_to``: models that also score the transfer generators' examples;
    ``run_dir``: where rank 0 writes the retrieval picture's images."""
    if stage.restarts:
        cfg = replace(cfg, attack=replace(cfg.attack, restarts=stage.restarts))
    transfer_to = transfer_to or {}
    attacks = plan_attacks(stage.attacks)
    database = encode_split(model, source, "database", cfg, place)
    train = encode_split(model, source, "train", cfg, place)
    targets_db = {name: encode_split(m, source, "database", cfg, place).codes for name, m in transfer_to.items()}
    q_lab = query_labels(source)
    n = min(cfg.eval.num_queries or len(q_lab), len(q_lab))
    q_lab = q_lab[:n]
    t0 = time.monotonic()
    suite = Suite(cfg, model, place, train, database, q_lab, attacks)
    sweep = sweep_budgets(cfg, stage.attacks) if stage.sweep else []
    transfers = [a.name for a in attacks if a.name in GENERATORS] if transfer_to else []
    keys = ["clean", *stage.attacks, *([SINGLE_RUN] if "mainstay" in stage.attacks else []),
            *[f"eps:{v!r}" for v in sweep], *[f"transfer:{t}:{a}" for t in transfer_to for a in transfers]]
    col = Collected(keys, attacks)
    rank, world = place.rank, place.world
    batches = query_batches(n, cfg.attack.batch_size, rank, world)
    who = f"{stage.folder} evaluation (rank {rank}/{world})" if world > 1 else f"{stage.folder} evaluation"
    progress = Progress(who, sum(map(len, batches)) * (len(attacks) + len(sweep)), unit="query-attack",
                        every_s=cfg.log_every_s if rank == 0 else 1e9)
    for batch in iter_query_batches(source, cfg, batches, place.device):
        attack_batch(suite, col, batch, sweep, transfer_to, progress)
    g = gather(col, cfg.model.bits, cfg.data.image_size)
    attack_seconds = time.monotonic() - t0
    if rank != 0:
        return None
    assert torch.equal(g.index, torch.arange(n)), "every query is evaluated exactly once"
    if run_dir is not None:
        shown_index, shown_clean, shown_adv = g.shown
        save_state({"index": shown_index, "clean": shown_clean, "adversarial": shown_adv}, run_dir / RETRIEVAL_IMAGES)
    res = results(Scored(cfg, stage.folder, attacks, suite, q_lab, *database, g, sweep=stage.sweep))
    res["transfer"] = {t: {a: _map(g.codes[f"transfer:{t}:{a}"], targets_db[t], q_lab, database.labels, cfg)
                           for a in transfers} for t in transfer_to}
    res["resources"] = {"attack_seconds": round(attack_seconds, 1)}
    return res


def _map(q_codes, db_codes, q_lab, db_lab, cfg: RunConfig) -> float:
    return float(average_precision(q_codes, db_codes, q_lab, db_lab, cfg.eval.top_k).mean())


def evaluate_stage(cfg: RunConfig, stage: EvaluationStage, run_dir: Path, place: Place,
                   source: DataSource, where: dict | None = None) -> dict | None:
    """Evaluate ``run_dir/<stage.folder>/model.pt`` (and score its transfer
    examples on the models of ``stage.transfer_to``); rank 0 writes the
    results file and the retrieval picture's images into the folder."""

    def load(folder):
        m = load_model(cfg.model, cfg.seed, run_dir / folder / "model.pt", place.device)
        return m.to(torch.bfloat16) if cfg.distributed.precision == "bf16" else m  # codes come back in fp32

    model = load(stage.folder)
    others = {name: load(name) for name in stage.transfer_to}
    t = time.monotonic()
    res = evaluate(cfg, model, source, stage, place, others, run_dir / stage.folder)
    # peak resident memory of every rank: streaming keeps it flat in the split sizes
    peak = all_gather_ragged(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64))
    ranks = [{"rank": r, **w} for r, w in enumerate(all_gather_json(where or {}))]  # where each rank ran
    if place.rank == 0:
        res["resources"].update({"seconds": round(time.monotonic() - t, 2), "ranks": place.world, "where": ranks,
                                 "peak_rss_mib_per_rank": [round(int(v) / 1024, 1) for v in peak]})
        write_text_atomic(run_dir / stage.folder / stage.results, json.dumps(res, indent=1))
    barrier()
    return res
