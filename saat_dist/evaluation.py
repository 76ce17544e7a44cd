"""Robustness evaluation of one hash model (SAAT.md §6), streamed.

No process holds a split's images. Each rank streams its own shards
(``DataSource.rank_shards``) of the database and train splits and encodes
them batch by batch; then it takes its share of the global query batches
(``query_batches``) and, batch by batch, encodes them, attacks them
(untargeted mainstay attack, targeted attack, and on the first
``attack.strong_queries`` queries the strong check) and encodes the
adversarial images. Only codes, labels, global indices and per-query
perturbation norms are gathered across ranks; rank 0 computes the metrics:
clean mAP, mAP under the attacks, t-mAP, the theory bounds, PR curves,
precision@N, the perturbation's perceptibility and the random-code floor.

The numbers do not depend on the number of workers: a query's batch is a
global one, every random start is keyed by the query's index
(``attack_keys``), encoding batches never span shards, and rank 0 sums in
query order.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import torch
from torch import nn

from saat_dist.attacks import choose_targets, pgd_attack
from saat_dist.checkpoint import write_text_atomic
from saat_dist.attacks.perceptibility import perceptibility_from_rows, perceptibility_rows
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.distributed.collectives import all_gather_ragged, barrier
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import label_set_table, mainstay_from_table
from saat_dist.metrics import (
    mean_average_precision,
    precision_at_n,
    precision_recall_curve,
    precision_recall_reference,
)
from saat_dist.progress import Progress
from saat_dist.training.encode import encode

log = logging.getLogger("saat_dist")


def random_map(query_labels: torch.Tensor, db_labels: torch.Tensor, bits: int, top_k: int, seed: int) -> float:
    """mAP of random +-1 codes: the floor below which numbers carry no meaning."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2, (len(query_labels), bits), generator=g).float() * 2 - 1
    db = torch.randint(0, 2, (len(db_labels), bits), generator=g).float() * 2 - 1
    return mean_average_precision(q, db, query_labels, db_labels, top_k)


def gather_sorted(index: torch.Tensor, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Gather (index, rows...) from every rank and order them by global index."""
    index = all_gather_ragged(index)
    order = torch.argsort(index)
    return [index[order], *(all_gather_ragged(r)[order] for r in rows)]


def _cat(parts: list[torch.Tensor], width: int, dtype=torch.float32) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, width, dtype=dtype)


def encode_split(model: nn.Module, source: DataSource, split: str, cfg: RunConfig, device, rank: int,
                 world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes N x K, labels N x C) of a whole split ordered by global index, on
    every rank; each rank encodes its own shards, one batch at a time (a batch
    never spans two shards, so a code does not depend on the worker count)."""
    shards = source.rank_shards(split, rank, world)
    n = sum(source.counts(split)[j] for j in shards)
    # Filled in place: per-batch results kept in lists would pin the freed
    # image buffers of every batch in the allocator's heap, and peak memory
    # would grow with the split by far more than the codes.
    index = torch.empty(n, dtype=torch.int64)
    codes = torch.empty(n, cfg.model.bits)
    labels = torch.empty(n, source.num_classes)
    filled = 0
    for images, lab, idx in source.batches(split, cfg.data.image_size, cfg.eval.batch_size, shards,
                                            resize=cfg.data.resize):
        b = len(idx)
        codes[filled : filled + b] = encode(model, images, device, b)
        labels[filled : filled + b] = lab
        index[filled : filled + b] = idx
        filled += b
    _, codes_NK, labels_NC = gather_sorted(index[:filled], codes[:filled], labels[:filled])
    return codes_NK, labels_NC


def query_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of the first ``n`` queries: they are cut, in index
    order, into global batches of ``batch_size`` and batch b goes to rank
    b % world. A query's batch, and so everything computed on it, is the
    same whatever the number of workers."""
    starts = range(0, n, batch_size)
    return [list(range(s, min(n, s + batch_size))) for b, s in enumerate(starts) if b % world == rank]


def query_labels(source: DataSource, n: int | None = None) -> torch.Tensor:
    """Labels of the first ``n`` queries (all: None) in index order, from the metadata only."""
    index, labels = source.labels("test")
    labels = labels[torch.argsort(index)]
    return labels if n is None else labels[:n]


def iter_query_batches(source: DataSource, cfg: RunConfig, batches: list[list[int]]):
    """(uint8 images, labels, index) of each of these query batches, reading
    only the query shards that hold them."""
    for batch in batches:
        yield source.read_items("test", batch, cfg.data.image_size, cfg.data.resize)


def attack_keys(cfg: RunConfig, index: torch.Tensor, attack: str) -> ItemKeys:
    """The keys of an attack's random draws for these queries: the same in
    every evaluation (run, experiment) of every model, whatever the worker."""
    return ItemKeys.of(index, cfg.seed, "attack", attack)


def evaluate_model(cfg: RunConfig, model: nn.Module, source: DataSource, device, stage: str,
                   strong: bool = False, rank: int = 0, world: int = 1) -> dict | None:
    """Every number of one model's evaluation (on rank 0; None on the others)."""
    e, a = cfg.eval, cfg.attack
    db_codes, db_lab = encode_split(model, source, "database", cfg, device, rank, world)
    tr_codes, tr_lab = encode_split(model, source, "train", cfg, device, rank, world)
    set_labels, set_sums, set_counts = label_set_table(tr_codes, tr_lab)

    def guide_of(labels):
        return mainstay_from_table(labels, set_labels, set_sums, set_counts)

    # Targets are drawn once from all query labels (labels only: no images), so
    # they do not depend on how queries are split over ranks.
    q_lab_all = query_labels(source)
    n = min(e.num_queries or len(q_lab_all), len(q_lab_all))
    q_lab_all = q_lab_all[:n]
    targets_all, valid_all = choose_targets(q_lab_all, torch.unique(db_lab, dim=0),
                                            torch.Generator().manual_seed(cfg.seed + 11))
    n_strong = min(a.strong_queries or n, n) if strong else 0

    def attack(x, guide, keys, *, targeted=False, iters=a.iters, restarts=1):
        return pgd_attack(model, x, guide.to(device), eps=a.eps, step_size=a.step_size, iters=iters,
                          targeted=targeted, loss=a.loss, restarts=restarts, keys=keys.to(device))

    batches = query_batches(n, a.batch_size, rank, world)
    progress = Progress(f"{stage} attacks (rank {rank}/{world})" if world > 1 else f"{stage} attacks",
                        sum(map(len, batches)), unit="query", every_s=cfg.log_every_s if rank == 0 else 1e9)
    out = {k: [] for k in ("index", "clean", "adv", "pert", "t_index", "t", "s_index", "s")}
    for images, lab, idx in iter_query_batches(source, cfg, batches):
        x = images.to(device).float().div_(255)
        guide = guide_of(lab)
        out["index"].append(idx)
        out["clean"].append(encode(model, x, device, len(x)))
        x_adv = attack(x, guide, attack_keys(cfg, idx, "mainstay"))
        out["adv"].append(encode(model, x_adv, device, len(x)))
        out["pert"].append(perceptibility_rows(x, x_adv))
        v = valid_all[idx]
        if v.any():
            x_t = attack(x[v.to(device)], guide_of(targets_all[idx[v]]), attack_keys(cfg, idx[v], "mainstay_targeted"),
                         targeted=True)
            out["t_index"].append(idx[v])
            out["t"].append(encode(model, x_t, device, len(x_t)))
        s = idx < n_strong
        if s.any():
            # the strong check: strong_factor x iters, strong_restarts random starts, worst case per query
            x_s = attack(x[s.to(device)], guide[s], attack_keys(cfg, idx[s], "mainstay_strong"),
                         iters=a.iters * a.strong_factor, restarts=a.strong_restarts)
            out["s_index"].append(idx[s])
            out["s"].append(encode(model, x_s, device, len(x_s)))
        progress.update(len(x))

    k = cfg.model.bits
    empty = torch.zeros(0, dtype=torch.int64)
    q_index, q_codes, adv_codes, pert = gather_sorted(torch.cat(out["index"]) if out["index"] else empty,
                                                      _cat(out["clean"], k), _cat(out["adv"], k),
                                                      _cat(out["pert"], 7, torch.float64))
    t_index, t_codes = gather_sorted(torch.cat(out["t_index"]) if out["t_index"] else empty, _cat(out["t"], k))
    s_index, s_codes = gather_sorted(torch.cat(out["s_index"]) if out["s_index"] else empty, _cat(out["s"], k))
    if rank != 0:
        return None
    assert torch.equal(q_index, torch.arange(n)), "every query is evaluated exactly once"
    targets = targets_all[t_index]
    return _metrics(cfg, stage, q_codes, adv_codes, q_lab_all, db_codes, db_lab, guide_of(q_lab_all),
                    t_index, t_codes, targets, guide_of(targets), int(valid_all.sum()), s_codes, n_strong, pert)


def _metrics(cfg, stage, q_codes, adv_codes, q_lab, db_codes, db_lab, guide, t_index, t_codes, targets,
             t_guide, n_targeted, s_codes, n_strong, pert) -> dict:
    e, a = cfg.eval, cfg.attack

    def mAP(codes, labels):
        return mean_average_precision(codes, db_codes, labels, db_lab, e.top_k)

    res: dict = {"clean_map": mAP(q_codes, q_lab),
                 "random_map": random_map(q_lab, db_lab, cfg.model.bits, e.top_k, cfg.seed + 20)}
    log.info("%s: clean mAP@%d = %.4f", stage, e.top_k, res["clean_map"])
    res["attacked_map"] = mAP(adv_codes, q_lab)
    res["perceptibility"], res["perceptibility_reference"] = perceptibility_from_rows(pert)
    res["theory_map"] = mAP(-guide, q_lab)
    log.info("%s: attacked mAP = %.4f (theory bound %.4f)", stage, res["attacked_map"], res["theory_map"])

    res["targeted_tmap"] = mAP(t_codes, targets)
    res["clean_tmap"] = mAP(q_codes[t_index], targets)
    res["theory_tmap"] = mAP(t_guide, targets)
    res["targeted_queries"] = n_targeted
    log.info("%s: targeted t-mAP = %.4f (clean %.4f, theory %.4f)", stage, res["targeted_tmap"],
             res["clean_tmap"], res["theory_tmap"])

    if n_strong:
        # The strong check costs strong_factor x strong_restarts times the plain
        # attack, so it runs on the first strong_queries queries; the plain
        # attack's mAP on the same queries is reported beside it.
        res["attacked_map_strong"] = mAP(s_codes, q_lab[:n_strong])
        res["strong_check"] = {"queries": n_strong, "iters": a.iters * a.strong_factor,
                               "restarts": a.strong_restarts,
                               "attacked_map_same_queries": mAP(adv_codes[:n_strong], q_lab[:n_strong])}
        log.info("%s: strong attack (%d iters, %d restarts, %d queries) mAP = %.4f (plain attack on them: %.4f)",
                 stage, a.iters * a.strong_factor, a.strong_restarts, n_strong, res["attacked_map_strong"],
                 res["strong_check"]["attacked_map_same_queries"])

    if e.pr_points == "reference":
        recall, prec_clean = precision_recall_reference(q_codes, db_codes, q_lab, db_lab, e.pr_levels - 1)
        _, prec_adv = precision_recall_reference(adv_codes, db_codes, q_lab, db_lab, e.pr_levels - 1)
    else:
        recall, prec_clean = precision_recall_curve(q_codes, db_codes, q_lab, db_lab, e.pr_levels)
        _, prec_adv = precision_recall_curve(adv_codes, db_codes, q_lab, db_lab, e.pr_levels)
    res["pr_curve"] = {"points": e.pr_points, "recall": recall.tolist(), "clean": prec_clean.tolist(),
                       "attacked": prec_adv.tolist()}
    res["precision_at"] = {
        "clean": {str(k): v for k, v in precision_at_n(q_codes, db_codes, q_lab, db_lab, e.precision_at).items()},
        "attacked": {str(k): v for k, v in precision_at_n(adv_codes, db_codes, q_lab, db_lab, e.precision_at).items()},
    }
    return res


def evaluate_stage(cfg: RunConfig, which: str, run_dir: Path, rank: int, world: int, device,
                   source: DataSource) -> dict | None:
    """Evaluate ``run_dir/<which>/model.pt`` (the SAAT model also gets the
    strong check); rank 0 writes ``eval.json`` and returns the results."""
    from saat_dist.training.trainer import load_model

    model = load_model(cfg, run_dir / which / "model.pt", device)
    if cfg.distributed.precision == "bf16":
        model = model.to(torch.bfloat16)  # the model casts its inputs; codes come back in fp32
    t = time.monotonic()
    res = evaluate_model(cfg, model, source, device, which, strong=(which == "saat"), rank=rank, world=world)
    # peak resident memory of every rank: streaming keeps it flat in the split sizes
    peak = all_gather_ragged(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64))
    if rank == 0:
        res["resources"] = {"seconds": round(time.monotonic() - t, 2), "ranks": world,
                            "peak_rss_mib_per_rank": [round(int(v) / 1024, 1) for v in peak]}
        write_text_atomic(run_dir / which / "eval.json", json.dumps(res, indent=1))
    barrier()
    return res
