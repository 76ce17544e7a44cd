"""Metrics against plain per-query implementations, on data with many ties."""

import numpy as np
import pytest
import torch

from saat_dist.metrics import (
    average_precision,
    mean_average_precision,
    precision_at_n,
    precision_recall_curve,
)
from saat_dist.metrics import ranking
from saat_dist.metrics.reference import map_per_query_numpy


def random_case(seed, q=60, n=900, k=6, c=7, p=0.2, zeros=False):
    g = torch.Generator().manual_seed(seed)
    qc = torch.randint(0, 2, (q, k), generator=g).float() * 2 - 1
    dc = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
    if zeros:  # mainstay codes may hold 0 bits: the dense kernel handles them
        qc[torch.rand(q, k, generator=g) < 0.2] = 0
    ql = (torch.rand(q, c, generator=g) < p).float()
    dl = (torch.rand(n, c, generator=g) < p).float()
    return qc, dc, ql, dl


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k", [1, 50, 400, 900])
@pytest.mark.parametrize("zeros", [False, True])
def test_map_equals_per_query_numpy(seed, top_k, zeros):
    qc, dc, ql, dl = random_case(seed, zeros=zeros)  # 6 bits, 900 items: heavy Hamming ties
    got = mean_average_precision(qc, dc, ql, dl, top_k)
    ref = map_per_query_numpy(qc.numpy(), dc.numpy(), ql.numpy(), dl.numpy(), top_k)
    assert got == pytest.approx(ref, abs=1e-6)


def test_many_classes_and_bits():
    """Over 63 classes (no bit masks) and over 64 bits (two packed words)."""
    qc, dc, ql, dl = random_case(5, q=40, n=700, k=70, c=80, p=0.05)
    got = mean_average_precision(qc, dc, ql, dl, 300)
    ref = map_per_query_numpy(qc.numpy(), dc.numpy(), ql.numpy(), dl.numpy(), 300)
    assert got == pytest.approx(ref, abs=1e-6)


def test_packed_and_dense_kernels_rank_identically():
    qc, dc, _, _ = random_case(7, q=70, n=20_000, k=16)
    packed = ranking.Ranker(qc, dc, 600)
    assert packed.packed
    dense = ranking._dense_topk(qc, dc, 600).numpy()
    got = np.concatenate([packed(s) for s in packed.starts])
    assert np.array_equal(got, dense)


def test_threshold_fallback_keeps_exact_ranking():
    """All database codes equal: every item ties, the sample threshold admits everything."""
    qc = torch.ones(5, 8)
    dc = torch.ones(10_000, 8)
    dc[::7] = -1
    idx = ranking.Ranker(qc, dc, 50)(0)
    expected = np.array([i for i in range(10_000) if i % 7][:50])
    assert all(np.array_equal(row, expected) for row in idx)


def test_query_without_relevant_counts_zero():
    qc, dc, ql, dl = random_case(1)
    ql[0] = 0
    ap = average_precision(qc, dc, ql, dl, 100)
    assert ap[0] == 0


def plain_pr(qc, dc, ql, dl, levels):
    out = np.zeros(levels)
    count = 0
    r_levels = np.linspace(0, 1, levels)
    for i in range(len(qc)):
        rel = (dl.numpy() @ ql[i].numpy() > 0).astype(float)
        ham = 0.5 * (qc.shape[1] - dc.numpy() @ qc[i].numpy())
        rel = rel[np.argsort(ham, kind="stable")]
        if rel.sum() == 0:
            continue
        count += 1
        hits = np.cumsum(rel)
        prec = hits / np.arange(1, len(rel) + 1)
        rec = hits / rel.sum()
        for j, r in enumerate(r_levels):
            out[j] += prec[rec >= r - 1e-12].max()
    return out / count


def test_pr_curve_and_precision_at_n():
    qc, dc, ql, dl = random_case(2, k=8)
    recall, prec = precision_recall_curve(qc, dc, ql, dl, 11)
    assert torch.allclose(recall, torch.linspace(0, 1, 11, dtype=torch.float64))
    assert np.allclose(prec.numpy(), plain_pr(qc, dc, ql, dl, 11), atol=1e-9)
    assert torch.all(prec[:-1] >= prec[1:] - 1e-12)  # interpolated precision never rises
    pn = precision_at_n(qc, dc, ql, dl, (10, 100))
    for n, value in pn.items():
        ref = np.mean([
            (dl.numpy()[np.argsort(0.5 * (8 - dc.numpy() @ qc[i].numpy()), kind="stable")[:n]] @ ql[i].numpy() > 0).mean()
            for i in range(len(qc))
        ])
        assert value == pytest.approx(ref, abs=1e-9)


def test_perfect_and_reversed_codes():
    labels = torch.eye(4).repeat_interleave(5, 0)  # 4 classes, 5 items each
    codes = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [-1, -1, 1, 1], [1, -1, -1, 1]]).float()
    db = codes.repeat_interleave(5, 0)
    assert mean_average_precision(codes, db, torch.eye(4), labels, 20) == pytest.approx(1.0)
    assert mean_average_precision(-codes, db, torch.eye(4), labels, 5) < 0.5


def test_shape_errors():
    qc, dc, ql, dl = random_case(0)
    with pytest.raises(ValueError, match="bits"):
        mean_average_precision(qc[:, :3], dc, ql, dl, 10)
    with pytest.raises(ValueError, match="classes"):
        mean_average_precision(qc, dc, ql[:, :3], dl, 10)
