"""``saat-dist certify``: certified robustness of one model's retrieval, as a
stage (in this process or on Ray, like every evaluation).

Each rank takes its share of the global query batches (``plan.query_batches``:
batch b on rank b % W), center-smooths every query of them
(``center_smoothing.certify``; every noise draw keyed by the query, so a
certificate does not depend on the worker count) and, for the first
``certify.attack_queries`` queries, attacks the smoothed code within each
radius (``center_smoothing.attack_check``). Rank 0 gathers the rows, scores
the certified retrieval against the model's database codes
(``certified_retrieval``: certified mAP@k with abstentions at 0, the smoothed
codes' clean mAP@k) and writes ``<folder>/certify.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from saat_dist.checkpoint import write_text_atomic
from saat_dist.comm.collectives import barrier
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.device import Place
from saat_dist.evaluation.center_smoothing import FLOAT_NOTE, attack_check, certify, linf_equivalent
from saat_dist.evaluation.certified_retrieval import certified_retrieval
from saat_dist.evaluation.plan import encode_split, gather_sorted, iter_query_batches, query_batches, query_labels
from saat_dist.metrics import mean_average_precision
from saat_dist.models.model_file import load_model
from saat_dist.progress import Progress
from saat_dist.training.encode import encode

CERTIFY_RESULTS = "certify.json"


@dataclass(frozen=True)
class CertifyStage:
    """One model's certification: a value, run the same in-process and on Ray."""

    folder: str  # the model folder in the run directory
    results: str = CERTIFY_RESULTS

    @property
    def name(self) -> str:
        """Run key and metrics label."""
        return f"certify_{self.folder}"


def certify_model(cfg: RunConfig, model, source: DataSource, place: Place = Place()) -> dict | None:
    """Every number of one model's certification (rank 0; None elsewhere)."""
    c = cfg.certify
    model.eval()
    database = encode_split(model, source, "database", cfg, place)
    q_lab = query_labels(source)
    n = min(c.num_queries, len(q_lab))
    rank, world = place.rank, place.world
    batches = query_batches(n, c.query_batch, rank, world)
    progress = Progress(f"certify (rank {rank}/{world})" if world > 1 else "certify", sum(map(len, batches)),
                        unit="query", every_s=cfg.log_every_s if rank == 0 else 1e9)
    radii = len(c.radii)
    rows = {k: [] for k in ("index", "center", "radius", "abstained", "base", "median", "moves", "excess",
                            "attacked", "adv_abstained")}
    certify_s = attack_s = 0.0
    dims = 0
    for batch in iter_query_batches(source, cfg, batches, place.device):
        dims = batch.x[0].numel()
        t = time.monotonic()
        cert = certify(model, batch.x, batch.index, c, seed=cfg.seed)
        certify_s += time.monotonic() - t
        rows["index"].append(batch.index.cpu())
        rows["center"].append(cert.center.cpu().float())
        rows["radius"].append(cert.hamming_radius.cpu().to(torch.float64))
        rows["abstained"].append(cert.abstained.cpu().to(torch.int64)[:, None])
        rows["base"].append(cert.base_distance.cpu().to(torch.float64)[:, None])
        rows["median"].append(cert.median_radius.cpu().to(torch.float64)[:, None])
        moves = torch.full((len(batch.index), radii), -1.0, dtype=torch.float64)  # -1: not attacked
        adv_abstained = torch.zeros(len(batch.index), radii, dtype=torch.int64)
        chosen = (batch.index < c.attack_queries).nonzero().flatten()
        t = time.monotonic()
        if len(chosen) and c.attack_queries:
            sub = _select(cert, chosen)
            for i, check in enumerate(attack_check(model, batch.x[chosen.to(batch.x.device)],
                                                   batch.index[chosen], c, sub, seed=cfg.seed)):
                certified = torch.isfinite(sub.hamming_radius[:, i]).nonzero().flatten()
                moves[chosen[certified], i] = check.moves.to(torch.float64)
                adv_abstained[chosen[certified], i] = check.adv_abstained.to(torch.int64)
        attack_s += time.monotonic() - t
        rows["moves"].append(moves)
        rows["adv_abstained"].append(adv_abstained)
        progress.update(len(batch.index))
    empty = {"index": torch.zeros(0, dtype=torch.int64), "center": torch.zeros(0, cfg.model.bits),
             "radius": torch.zeros(0, radii, dtype=torch.float64), "abstained": torch.zeros(0, 1, dtype=torch.int64),
             "base": torch.zeros(0, 1, dtype=torch.float64), "median": torch.zeros(0, 1, dtype=torch.float64),
             "moves": torch.zeros(0, radii, dtype=torch.float64),
             "adv_abstained": torch.zeros(0, radii, dtype=torch.int64)}
    cat = {k: torch.cat(v) if v else empty[k] for k, v in rows.items() if k in empty}
    index, center, radius, abstained, base, median, moves, adv_abstained = gather_sorted(
        cat["index"], cat["center"], cat["radius"], cat["abstained"], cat["base"], cat["median"], cat["moves"],
        cat["adv_abstained"])
    mine = sum(map(len, batches))  # this rank's queries: its seconds per query are a worker's rate
    if rank != 0:
        return None
    assert torch.equal(index, torch.arange(n)), "every query is certified exactly once"
    top_k = c.top_k or cfg.eval.top_k
    q_lab = q_lab[:n]
    per_radius = []
    for i, eps in enumerate(c.radii):
        r = radius[:, i]
        rc = certified_retrieval(center, r, database.codes, q_lab, database.labels, top_k, c.ties)
        ok = torch.isfinite(r)
        attacked = moves[:, i] >= 0
        valid = attacked & (adv_abstained[:, i] == 0)
        per_radius.append({
            "radius_l2": eps, "linf_equivalent": linf_equivalent(eps, dims), "level": c.level(eps),
            "certified_map": rc.certified_map, "certified_queries": int(ok.sum()),
            "abstention_rate": float(1 - ok.to(torch.float64).mean()),
            "mean_hamming_radius": float(r[ok].mean()) if ok.any() else None,
            "mean_certified_topk": float(rc.topk_certified.sum(1).to(torch.float64).mean()),
            "attack_check": {"attacked": int(attacked.sum()), "adv_abstained": int((attacked & ~valid).sum()),
                             "violations": int((moves[:, i][valid] > r[valid]).sum()),
                             "max_move": float(moves[:, i][valid].max()) if valid.any() else None,
                             "max_certified_radius": float(r[valid].max()) if valid.any() else None}})
    smoothed = certified_retrieval(center, torch.zeros(n, dtype=torch.float64), database.codes, q_lab,
                                   database.labels, top_k, c.ties)
    # the unsmoothed model's clean mAP over the same queries, for scale
    images = next(iter_query_batches(source, cfg, [list(range(n))], "cpu")).images
    base_codes = encode(model, images, place.device, cfg.eval.batch_size)
    return {
        "format": "saat-dist/certify/v1", "method": "center smoothing (Kumar & Goldstein, NeurIPS 2021), Hamming "
        "output space; retrieval bounds of saat_dist.evaluation.certified_retrieval",
        "queries": n, "top_k": top_k, "ties": c.ties, "sigma": c.sigma, "alpha": c.alpha, "delta": c.delta,
        "n_center": c.n_center, "n_certify": c.n_certify, "forwards_per_query": c.forwards_per_query,
        "attack": {"iters": c.attack_iters, "samples": c.attack_samples, "queries": min(c.attack_queries, n),
                   "norm": "l2"},
        "center_abstention_rate": float(abstained.to(torch.float64).mean()),
        "smoothed_clean_map": smoothed.clean_map,
        "base_clean_map": mean_average_precision(base_codes, database.codes, q_lab, database.labels, top_k),
        "mean_base_distance": float(base[:, 0].mean()), "mean_median_radius": float(median[:, 0].mean()),
        "radii": per_radius, "float_sound": False, "float_note": FLOAT_NOTE,
        # one worker's rate (rank 0's): the certificates alone, and the attack check apart
        "seconds": round(certify_s, 1), "seconds_per_query": round(certify_s / max(1, mine), 2),
        "attack_seconds": round(attack_s, 1),
        # per query (index order), per radius: the certified Hamming radius (null: abstained)
        "per_query_hamming_radius": [[None if math.isinf(v) else v for v in row] for row in radius.tolist()],
    }


def _select(cert, chosen: torch.Tensor):
    """The certificate of the chosen rows (for the attack check)."""
    from dataclasses import replace

    return replace(cert, center=cert.center[chosen], abstained=cert.abstained[chosen],
                   hamming_radius=cert.hamming_radius[chosen], median_radius=cert.median_radius[chosen],
                   p_hat=cert.p_hat[chosen], base_distance=cert.base_distance[chosen])


def certify_stage(cfg: RunConfig, stage: CertifyStage, run_dir: Path, place: Place, source: DataSource,
                  where: dict | None = None) -> dict | None:
    """Certify ``run_dir/<stage.folder>/model.pt``; rank 0 writes the results file."""
    model = load_model(cfg.model, cfg.seed, run_dir / stage.folder / "model.pt", place.device)
    res = certify_model(cfg, model, source, place)
    if place.rank == 0:
        res["workers"] = place.world
        write_text_atomic(run_dir / stage.folder / stage.results, json.dumps(res, indent=1))
    barrier()
    return res
