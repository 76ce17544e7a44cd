"""Certified retrieval from certified query codes: what a query code moved by
at most r bits (the Hamming radius that center smoothing certifies) can do
to its ranking and to its AP@k.

Distances: item i sits at d_i from the center code; a query code within r
bits of the center puts it anywhere in [lo_i, hi_i] = [max(d_i - r, 0),
min(d_i + r, K)]. The bounds below hold for every choice of distances in
those intervals (a relaxation: one real query code couples them), so they
are sound, not exact.

Ties (``ties``): "against" (the default) assumes nothing about how the
ranker orders equal distances: a tie always goes the query's worst way;
"index" certifies this project's rankers, which order equal distances by
database index (``saat_dist.metrics.ranking``); with it the bound at r = 0
is the project's AP@k exactly.

Certified top-k: item i stays in the top k for every move when fewer than k
other items can come before it: #{j != i : lo_j <= hi_i} < k ("against";
with "index", (lo_j, j) < (hi_i, i)); for r > 0 that is the margin
"d_(k+1) - d_i > 2r" of the item at rank k + 1.

AP@k lower bound. AP@k here is the project's (DeepHash) one: the mean of
precision@i over the relevant positions i <= k, normalised by the relevant
items *retrieved*, 0 when there are none. That AP is not monotone in the
ranking: pushing a late relevant item out of the top k can raise it
([R, I, I, R] -> [R, I, I, I] goes from 0.75 to 1), so the AP of the
worst-case ordering W (relevant items at hi, irrelevant ones at lo, ties
against the query) is NOT a lower bound (tests/test_certify.py has a case).
What is sound: W puts the j-th relevant item at its latest position P_j
and has the fewest relevant items in every prefix, and the best-case
ordering B (relevant at lo, irrelevant at hi) the most; so any reachable
ranking with m relevant items in its top k has m_W <= m <= m_B and its j-th
relevant item at a position <= min(P_j, k - m + j) (P_j = inf for j > m_W).
Hence
    AP@k >= min over m in [m_W, m_B] of (1/m) sum_{j<=m} j / min(P_j, k - m + j),
computed in O(k) per query (harmonic numbers); 0 when m_W = 0. At r = 0
(index ties) W = B = the ranking and the bound is its AP@k.

Certified mAP@k: the mean of the bound over queries, an abstained query
(radius inf) counting 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from saat_dist.evaluation.center_smoothing import Certificate
from saat_dist.metrics import average_precision

Ties = Literal["against", "index"]
CHUNK_ELEMENTS = 2**22  # query x database entries per chunk (a few int64 tensors of 32 MiB)


@dataclass
class RetrievalCertificate:
    """Per query: ``ap_lower`` (the certified AP@k lower bound, 0 when
    abstained), ``clean_ap`` (AP@k of the center codes, the project's
    metric), ``topk`` (Q x k database indices of the center's ranking, ties
    by index) and ``topk_certified`` (Q x k: that item stays in the top k
    under every move within the radius)."""

    ap_lower: torch.Tensor
    clean_ap: torch.Tensor
    topk: torch.Tensor
    topk_certified: torch.Tensor
    radius: torch.Tensor
    abstained: torch.Tensor
    top_k: int
    ties: str

    @property
    def certified_map(self) -> float:
        return float(self.ap_lower.mean()) if len(self.ap_lower) else 0.0

    @property
    def clean_map(self) -> float:
        return float(self.clean_ap.mean()) if len(self.clean_ap) else 0.0


def harmonic(n: int) -> np.ndarray:
    """H[0..n] with H[i] = 1 + 1/2 + ... + 1/i (H[0] = 0)."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1, dtype=np.float64))])


def ap_lower_bound(positions_w: np.ndarray, m_best: int, k: int, h: np.ndarray | None = None) -> float:
    """min over m in [m_W, m_best] of (1/m) sum_{j<=m} j / min(P_j, k - m + j)
    (the module docstring), P = ``positions_w``: the 1-based positions of the
    relevant items in the worst-case top k, increasing; ``h`` = harmonic(k)."""
    m_w = len(positions_w)
    if m_w == 0:
        return 0.0
    h = harmonic(k) if h is None else h
    j = np.arange(1, m_w + 1, dtype=np.float64)
    p = positions_w.astype(np.float64)
    gaps = p - j  # non-decreasing: positions increase by at least 1
    prefix = np.concatenate([[0.0], np.cumsum(j / p)])
    m = np.arange(m_w, max(m_best, m_w) + 1)
    c = k - m
    s = np.minimum(np.searchsorted(gaps, c, side="right"), m_w)  # j <= s keep P_j, the rest k - m + j
    # sum_{j=s+1}^{m} j / (c + j) = (m - s) - c (H[c + m] - H[c + s]), with c + m = k
    tail = (m - s) - c * (h[k] - h[c + s])
    return float(np.min((prefix[s] + tail) / m))


def _topk_keys(key: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(key, k, dim=1, largest=False, sorted=True).indices


def certified_retrieval(query_codes: torch.Tensor, radius: torch.Tensor, db_codes: torch.Tensor,
                        query_labels: torch.Tensor, db_labels: torch.Tensor, top_k: int | None = None,
                        ties: Ties = "against") -> RetrievalCertificate:
    """The certified top-k sets and AP@k lower bounds of center codes
    ``query_codes`` (Q x K, +-1) whose every move is within ``radius`` (Q,)
    bits (inf or NaN: abstained), against ``db_codes`` (N x K, +-1);
    relevant = sharing at least one label. ``top_k`` None: the whole database."""
    if ties not in ("against", "index"):
        raise ValueError(f"ties {ties!r} is not one of ['against', 'index']")
    if query_codes.shape[1] != db_codes.shape[1] or len(query_codes) != len(radius):
        raise ValueError("certified_retrieval: query codes, radii and database codes do not match")
    q_all = query_codes.detach().cpu().to(torch.float32)
    db = db_codes.detach().cpu().to(torch.float32)
    ql = (query_labels.detach().cpu() > 0).to(torch.float32)
    dl = (db_labels.detach().cpu() > 0).to(torch.float32)
    n, bits = db.shape
    k = n if top_k is None or top_k <= 0 else min(top_k, n)
    radius = radius.detach().cpu().to(torch.float64)
    abstained = ~torch.isfinite(radius)
    r_all = torch.where(abstained, 0.0, radius).clamp(0, bits).floor().to(torch.int64)
    idx = torch.arange(n, dtype=torch.int64)
    h = harmonic(k)

    ap_lower = torch.zeros(len(q_all), dtype=torch.float64)
    topk = torch.zeros(len(q_all), k, dtype=torch.int64)
    certified = torch.zeros(len(q_all), k, dtype=torch.bool)
    chunk = max(1, CHUNK_ELEMENTS // max(n, 1))
    for s in range(0, len(q_all), chunk):
        q, r = q_all[s : s + chunk], r_all[s : s + chunk, None]
        d = ((bits - q @ db.T) / 2).round().to(torch.int64)
        rel = (ql[s : s + chunk] @ dl.T) > 0
        lo, hi = (d - r).clamp(min=0), (d + r).clamp(max=bits)
        # worst case: relevant late, irrelevant early; best case the other way
        worst = torch.where(rel, hi, lo)
        best = torch.where(rel, lo, hi)
        if ties == "against":
            worst_key = (worst * 2 + rel.to(torch.int64)) * n + idx
            best_key = (best * 2 + (~rel).to(torch.int64)) * n + idx
        else:
            worst_key, best_key = worst * n + idx, best * n + idx
        rel_w = rel.gather(1, _topk_keys(worst_key, k)).numpy()
        m_best = rel.gather(1, _topk_keys(best_key, k)).sum(1).numpy()
        for row in range(len(q)):
            if not abstained[s + row]:
                ap_lower[s + row] = ap_lower_bound(np.flatnonzero(rel_w[row]) + 1, int(m_best[row]), k, h)

        # the center's ranking and which of its top k no move can push out
        top = _topk_keys(d * n + idx, k)
        hi_top = hi.gather(1, top)
        if ties == "against":
            before = torch.searchsorted(lo.sort(1).values, hi_top, right=True) - 1  # every j with lo_j <= hi_i, not i
        else:
            lo_key = lo * n + idx
            hi_key = hi_top * n + top
            own = (lo.gather(1, top) < hi_top).to(torch.int64)  # i's own lo key lies below its hi key
            before = torch.searchsorted(lo_key.sort(1).values, hi_key) - own
        topk[s : s + chunk] = top
        certified[s : s + chunk] = (before < k) & ~abstained[s : s + chunk, None]

    clean = average_precision(q_all, db, query_labels, db_labels, k)
    return RetrievalCertificate(ap_lower, clean, topk, certified, radius, abstained, k, ties)


def certified_map_at_radii(cert: Certificate, db_codes: torch.Tensor, query_labels: torch.Tensor,
                           db_labels: torch.Tensor, top_k: int | None = None, ties: Ties = "against") -> list[dict]:
    """Per l2 radius of a ``Certificate``: certified mAP@k (abstentions 0),
    clean mAP@k of the center codes, the certified queries and the mean size
    of the certified top-k set."""
    out = []
    for i, eps in enumerate(cert.radii):
        rc = certified_retrieval(cert.center, cert.hamming_radius[:, i], db_codes, query_labels, db_labels,
                                 top_k, ties)
        out.append({"radius_l2": eps, "linf_equivalent": cert.linf[i], "certified_map": rc.certified_map,
                    "clean_map": rc.clean_map, "certified_queries": int((~rc.abstained).sum()),
                    "queries": len(rc.abstained), "top_k": rc.top_k,
                    "mean_certified_topk": float(rc.topk_certified.sum(1).to(torch.float64).mean())
                    if len(rc.abstained) else math.nan})
    return out
