"""mAP@k, t-mAP, precision-recall and precision@N over Hamming rankings.

Relevance: a database item is relevant to a query when they share at least
one label (for t-mAP, pass the *target* labels as query labels). AP@k is the
mean of precision@i over the relevant positions i <= k (the DeepHash
convention: normalised by the relevant items retrieved in the top k); a query
with no relevant item in its top k scores 0. Ties in Hamming distance are
ranked by database index (see ``ranking``). Work is done per query chunk, so
memory stays bounded whatever the number of queries.
"""

from __future__ import annotations

import numpy as np
import torch

from saat_dist.metrics.ranking import Ranker, map_chunks, rank_database

PR_BLOCK_BYTES = 8 * 2**20  # one float64 row block of the PR curve


class _Relevance:
    """Q x k bool for ranked items: does item j share a label with query i.

    With at most 63 classes labels become bit masks (one AND per ranked
    item); the database side is prepared once, not per query chunk.
    """

    def __init__(self, query_labels: torch.Tensor, db_labels: torch.Tensor) -> None:
        ql = (query_labels.detach().cpu() > 0).numpy()
        dl = (db_labels.detach().cpu() > 0).numpy()
        self.masks = dl.shape[1] <= 63
        if self.masks:
            weights = 2 ** np.arange(dl.shape[1], dtype=np.int64)
            self.q, self.db = ql @ weights, dl @ weights
        else:
            self.q, self.db = ql.astype(np.float32), dl.astype(np.float32)

    def __call__(self, start: int, top_idx: np.ndarray) -> np.ndarray:
        q = self.q[start : start + len(top_idx)]
        if self.masks:
            return (self.db[top_idx] & q[:, None]) != 0
        return np.einsum("qkc,qc->qk", self.db[top_idx], q) > 0


def _ap_from_relevance(rel: np.ndarray) -> np.ndarray:
    hits = np.cumsum(rel, axis=1, dtype=np.int64)
    found = hits[:, -1]
    pos = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    ap = np.where(rel, hits / pos, 0.0).sum(1) / np.maximum(found, 1)
    return np.where(found > 0, ap, 0.0)


def average_precision(query_codes, db_codes, query_labels, db_labels, top_k: int | None = None) -> torch.Tensor:
    """AP@top_k of every query (float64, CPU); top_k None or <= 0 means the whole database."""
    _check(query_codes, db_codes, query_labels, db_labels)
    ranker = Ranker(query_codes, db_codes, top_k)
    relevance = _Relevance(query_labels, db_labels)
    out = np.empty(len(query_codes), dtype=np.float64)
    for s, ap in map_chunks(lambda s: _ap_from_relevance(relevance(s, ranker(s))), ranker.starts):
        out[s : s + len(ap)] = ap
    return torch.from_numpy(out)


def mean_average_precision(query_codes, db_codes, query_labels, db_labels, top_k: int | None = None) -> float:
    """mAP@top_k: torch tensors in (+-1 codes, 0/1 labels), a float out."""
    return float(average_precision(query_codes, db_codes, query_labels, db_labels, top_k).mean())


def precision_recall_curve(query_codes, db_codes, query_labels, db_labels, num_levels: int = 11):
    """Interpolated precision at recall levels 0, 1/(L-1), ..., 1 over the full ranking.

    Precision at recall r is the best precision reached at any recall >= r,
    averaged over queries that have at least one relevant item.
    Returns (recall, precision), float64 tensors of length ``num_levels``.
    """
    _check(query_codes, db_codes, query_labels, db_labels)
    levels = torch.linspace(0, 1, num_levels, dtype=torch.float64)
    total = torch.zeros(num_levels, dtype=torch.float64)
    counted = 0
    relevance = _Relevance(query_labels, db_labels)
    # a few queries at a time: the curve needs ~10 full-length float64 rows per
    # query, and memory must not grow with the database beyond its codes
    sub = max(1, PR_BLOCK_BYTES // (8 * len(db_codes)))
    for s, idx in rank_database(query_codes, db_codes, None):
        idx = idx.numpy()
        for b in range(0, len(idx), sub):
            rel = torch.from_numpy(relevance(s + b, idx[b : b + sub])).to(torch.float64)
            hits = rel.cumsum(1)
            del rel
            n_rel = hits[:, -1:]
            keep = n_rel.squeeze(1) > 0
            hits, n_rel = hits[keep], n_rel[keep]
            precision = hits / torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
            recall = hits / n_rel
            del hits
            # best precision at recall >= r: running max from the end
            best = precision.flip(1).cummax(1).values.flip(1)
            del precision
            # a small tolerance so that recall 3/10 counts as reaching level 0.3
            first = torch.searchsorted(recall.contiguous(), (levels - 1e-12).expand(len(recall), -1).contiguous())
            first = first.clamp(max=best.shape[1] - 1)
            total += best.gather(1, first).sum(0)
            counted += int(keep.sum())
    return levels, total / max(counted, 1)


def precision_recall_reference(query_codes, db_codes, query_labels, db_labels, num_points: int = 10):
    """The PR curve at the reference code's points (its ``cal_pr``): recall
    r_i = i / num_points, i = 1..num_points; per query with R relevant items,
    n_i = floor(R r_i) and precision n_i / (rank of the n_i-th relevant item)
    (0 when n_i = 0), averaged over *all* queries (a query with no relevant
    item counts 0). No interpolation. Returns (recall, precision) float64."""
    _check(query_codes, db_codes, query_labels, db_labels)
    recall = torch.arange(1, num_points + 1, dtype=torch.float64) / num_points
    total = np.zeros(num_points)
    relevance = _Relevance(query_labels, db_labels)
    sub = max(1, PR_BLOCK_BYTES // (8 * len(db_codes)))
    for s, idx in rank_database(query_codes, db_codes, None):
        idx = idx.numpy()
        for b in range(0, len(idx), sub):
            for rel in relevance(s + b, idx[b : b + sub]):
                pos = np.flatnonzero(rel) + 1  # 1-based ranks of the relevant items
                n = (len(pos) * np.arange(1, num_points + 1)) // num_points  # exact floor(R i / points)
                prec = np.zeros(num_points)
                ok = n > 0
                prec[ok] = n[ok] / pos[n[ok] - 1]
                total += prec
    return recall, torch.from_numpy(total / max(len(query_codes), 1))


def precision_at_n(query_codes, db_codes, query_labels, db_labels, ns=(100, 200, 500, 1000)) -> dict[int, float]:
    """Mean precision of the top N retrieved items, for each N."""
    _check(query_codes, db_codes, query_labels, db_labels)
    ns = [min(int(n), len(db_codes)) for n in ns]
    sums = {n: 0.0 for n in ns}
    relevance = _Relevance(query_labels, db_labels)
    for s, idx in rank_database(query_codes, db_codes, max(ns)):
        rel = torch.from_numpy(relevance(s, idx.numpy())).to(torch.float64)
        for n in ns:
            sums[n] += float(rel[:, :n].mean(1).sum())
    return {n: v / len(query_codes) for n, v in sums.items()}


def _check(query_codes, db_codes, query_labels, db_labels) -> None:
    if query_codes.shape[1] != db_codes.shape[1]:
        raise ValueError(f"query codes have {query_codes.shape[1]} bits, database codes {db_codes.shape[1]}")
    if len(query_codes) != len(query_labels) or len(db_codes) != len(db_labels):
        raise ValueError("codes and labels must have the same number of rows")
    if query_labels.shape[1] != db_labels.shape[1]:
        raise ValueError(f"query labels have {query_labels.shape[1]} classes, database labels {db_labels.shape[1]}")
