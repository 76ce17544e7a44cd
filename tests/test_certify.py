"""Center smoothing of hash codes and certified retrieval: the certificate
against analytic radii of a linear model, the retrieval bounds by hand and by
brute force, the l2 attack on the smoothed code, keyed draws."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from saat_dist.attacks import ATTACK_REGISTRY
from saat_dist.attacks.smoothed_l2 import smoothed_l2_attack
from saat_dist.evaluation.center_smoothing import (
    CertifyConfig, attack_check, certify, linf_equivalent, sample_center, smoothed_codes)
from saat_dist.evaluation.certified_retrieval import ap_lower_bound, certified_map_at_radii, certified_retrieval
from saat_dist.keyed_random import ItemKeys, keyed_normal
from saat_dist.metrics import average_precision
from saat_dist.models.adapter import as_hash_model

FAST = dict(n_center=2000, n_certify=10_000)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of small forwards: one thread is faster than two fighting
    over a shared machine's cores (6 s for the file instead of 25 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearCodes(nn.Module):
    """Logits W x (float64 inside): code bit j is sign(w_j . x)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).to(torch.float64) @ self.w.T).to(torch.float32)


def orthonormal_rows(bits: int = 8, dims: int = 16, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dims, dims, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q[:bits].contiguous()


def worst_case_flips(margins: torch.Tensor, eps: float) -> int:
    """Orthonormal rows: flipping the set S needs ||delta||^2 >= sum_S m_j^2,
    so the most bits flipped within eps is the longest run of the smallest
    margins whose squares fit (counting reaching the boundary as a flip)."""
    total, flips = 0.0, 0
    for m in sorted(margins.abs().tolist()):
        total += m * m
        if total > eps * eps:
            break
        flips += 1
    return flips


def linear_query(margins: list[float]):
    w = orthonormal_rows(len(margins))
    m = torch.tensor(margins, dtype=torch.float64)
    x = (w.T @ m).to(torch.float32).view(1, 1, 4, 4)  # w_j . x = m_j, |w_j| = 1
    return LinearCodes(w), x, w, m


# ---------------------------------------------------------------- the certificate
def test_clean_margins_certify_zero_and_the_worst_case_is_zero():
    sigma, radii = 0.25, [0.25, 0.5, 1.0]
    margins = [max(radii[:2]) + 3 * sigma + 0.1 * j for j in range(8)]  # > eps + 3 sigma for eps <= 0.5
    model, x, w, m = linear_query(margins)
    cfg = CertifyConfig(sigma=sigma, radii=radii, **FAST)
    cert = certify(model, x, torch.tensor([5]), cfg)
    assert not cert.abstained[0] and cert.center[0].tolist() == [1.0] * 8
    for i, eps in enumerate(radii[:2]):
        assert worst_case_flips(m, eps) == 0
        assert cert.hamming_radius[0, i] == 0.0  # equals the analytic worst case
    # sigma = 0.25, eps = 1: Phi(Phi^-1(0.55) + 4) + margin > 1: abstain at that radius only
    assert cert.levels[2] > 1 and math.isinf(cert.hamming_radius[0, 2]) and not cert.certified[0, 2]
    assert cert.levels[0] == pytest.approx(0.8700 + math.sqrt(math.log(200) / 2e4), abs=1e-3)
    assert cert.forwards_per_query == 2 * 2000 + 10_000 + 1 and cert.base_distance[0] == 0
    assert cert.linf == [pytest.approx(eps / 4) for eps in radii]  # 16 input values
    assert not cert.float_sound and "Voracek" in cert.float_note


@pytest.mark.parametrize("low", [[0.1], [0.1, 0.15]])
def test_bits_inside_the_budget_are_not_certified_away(low):
    sigma, eps = 0.25, 0.25
    margins = low + [2.0] * (8 - len(low))  # the low bits: an adversary flips them within eps
    model, x, w, m = linear_query(margins)
    cfg = CertifyConfig(sigma=sigma, radii=[eps, 0.5], **FAST)
    cert = certify(model, x, torch.tensor([0]), cfg)
    truth = worst_case_flips(m, eps)
    assert truth == len(low)
    assert not cert.abstained[0] and cert.hamming_radius[0, 0] >= truth > 0  # sound, and not 0
    # the analysis' attack (along -sum_S m_j w_j, norm eps) moves the smoothed code within the certificate
    direction = -(m[: len(low)] @ w[: len(low)])
    x_adv = x + (eps * direction / direction.norm()).to(torch.float32).view(1, 1, 4, 4)
    moved, _ = smoothed_codes(model, x_adv, cfg, ItemKeys.of(torch.tensor([0]), 0, "adv"))
    move = int((moved != cert.center).sum())
    assert 1 <= move <= cert.hamming_radius[0, 0]


def test_config_refuses_settings_where_every_query_abstains():
    with pytest.raises(ValueError, match="every query would abstain"):
        CertifyConfig(n_center=1000)  # Delta_1 = sqrt(ln 400 / 2000) = 0.055 > 0.05
    cfg = CertifyConfig()
    assert (cfg.n_center, cfg.n_certify, cfg.alpha_center, cfg.alpha_certify, cfg.delta) == (
        10_000, 1_000_000, 0.005, 0.005, 0.05)
    assert linf_equivalent(1.0, 3 * 32 * 32) == pytest.approx(1 / math.sqrt(3072))


def test_sample_center_is_the_references_min_median_sample():
    g = np.random.default_rng(0)
    for n, k in [(9, 5), (10, 6), (40, 4), (31, 7)]:
        bits = g.random((n, k)) < 0.3
        dist = (bits[:, None, :] != bits[None, :, :]).sum(2)
        medians = np.median(dist, axis=1)
        i = int(np.argmin(medians))  # the reference's meb: the first strict minimum
        center, radius = sample_center(torch.from_numpy(bits))
        assert center.tolist() == bits[i].tolist() and radius == medians[i]


# ---------------------------------------------------------------- keyed draws
def test_keyed_normal_is_standard_and_keyed_by_item():
    z = keyed_normal(7, torch.arange(4), (50_000,), torch.float64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() < 1).double().mean()) - 0.6827) < 0.005
    pairs = z.view(4, -1, 2)  # a Box-Muller pair's cos and sin halves are independent
    assert abs(float((pairs[..., 0] * pairs[..., 1]).mean())) < 0.01
    alone = keyed_normal(7, torch.tensor([2]), (10,))
    assert torch.equal(alone[0], z[2, :10].to(torch.float32))  # same item, same draw; prefix-stable
    assert not torch.equal(z[0], z[1])
    keys = ItemKeys.of(torch.tensor([3, 9]), 1, "x")
    assert torch.equal(keys.normal((2, 3))[1], keys.select(torch.tensor([False, True])).normal((2, 3))[0])


def test_a_query_certifies_the_same_alone_and_in_a_batch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(128, 12))
    model = as_hash_model(net, bits=12).eval()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([40, 41, 42, 43])
    cfg = CertifyConfig(sigma=0.1, radii=[0.05, 0.1], n_center=1300, n_certify=2000, batch_size=700)
    batch = certify(model, x, index, cfg, seed=3)
    alone = certify(model, x[2:3], index[2:3], cfg, seed=3)
    assert torch.equal(alone.center[0], batch.center[2])
    assert torch.equal(alone.hamming_radius[0], batch.hamming_radius[2])
    assert alone.p_hat[0] == batch.p_hat[2] and alone.median_radius[0] == batch.median_radius[2]
    other_seed = certify(model, x[2:3], index[2:3], cfg, seed=4)
    assert other_seed.p_hat[0] != alone.p_hat[0] or not torch.equal(other_seed.hamming_radius, alone.hamming_radius)


# ---------------------------------------------------------------- the attack check
def tiny_conv_model(bits: int = 12) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(128, bits))
    return as_hash_model(net, bits=bits).eval()


def test_the_attack_on_the_smoothed_code_moves_no_query_beyond_its_certificate():
    model = tiny_conv_model()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    index = torch.arange(4)
    cfg = CertifyConfig(sigma=0.1, radii=[0.05, 0.1], n_center=1500, n_certify=3000, attack_iters=10,
                        attack_samples=8)
    cert = certify(model, x, index, cfg)
    checks = attack_check(model, x, index, cfg, cert)
    assert [c.radius_l2 for c in checks] == [0.05, 0.1]
    assert sum(c.attacked for c in checks) >= 4
    for c in checks:
        assert c.violations == 0 and c.max_delta_l2 <= c.radius_l2 + 1e-5
        assert bool((c.moves <= c.certified_radius)[~c.adv_abstained].all())
        assert c.summary()["max_excess"] <= 0
    assert max(c.max_move for c in checks) >= 1  # the attack did move some smoothed code


def test_the_attack_moves_an_unsmoothed_code_at_a_large_budget():
    model = tiny_conv_model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        code = torch.where(model(x) >= 0, 1.0, -1.0)
    keys = ItemKeys.of(torch.arange(3), 0, "sanity")
    x_adv = smoothed_l2_attack(model, x, code, eps=3.0, iters=20, samples=1, sigma=0.0, keys=keys)
    with torch.no_grad():
        moved = (torch.where(model(x_adv) >= 0, 1.0, -1.0) != code).sum(1)
    assert bool((moved >= 3).all()), moved
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 3.0 + 1e-5
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert "smoothed_l2" not in ATTACK_REGISTRY and all("smooth" not in name for name in ATTACK_REGISTRY)


# ---------------------------------------------------------------- certified retrieval
def hand_database():
    """K = 6, center all +1; item i at distance D[i] (its first D[i] bits flipped)."""
    dists = [0, 1, 2, 3, 4, 5, 6]
    relevant = [1, 0, 1, 0, 1, 0, 0]
    db = torch.tensor([[-1.0] * d + [1.0] * (6 - d) for d in dists])
    db_labels = torch.tensor([[1, 0] if r else [0, 1] for r in relevant])
    return torch.ones(1, 6), db, torch.tensor([[1, 0]]), db_labels


@pytest.mark.parametrize("ties", ["against", "index"])
def test_retrieval_bounds_by_hand(ties):
    q, db, ql, dl = hand_database()
    # r = 1, index ties: item 1 (d 1 -> 2) stays ahead of item 3 (d 3 -> 2) by its index
    second = ties == "index"
    expect = {0: (5 / 6, [True, True, True]), 1: (1 / 2, [True, second, False]), 2: (1 / 3, [False, False, False])}
    for r, (ap, certified) in expect.items():
        rc = certified_retrieval(q, torch.tensor([float(r)]), db, ql, dl, top_k=3, ties=ties)
        assert rc.topk[0].tolist() == [0, 1, 2]
        assert rc.ap_lower[0] == pytest.approx(ap, abs=1e-12), r
        assert rc.topk_certified[0].tolist() == certified, r
        assert rc.clean_map == pytest.approx(5 / 6)
    abstained = certified_retrieval(q, torch.tensor([math.inf]), db, ql, dl, top_k=3, ties=ties)
    assert abstained.certified_map == 0.0 and not abstained.topk_certified.any()
    assert abstained.clean_map == pytest.approx(5 / 6)


def test_the_ap_of_the_worst_ordering_is_not_a_bound_but_ours_is():
    """[R, I, I, R] has AP 0.75; the worst-case ordering at r = 1 pushes the
    second R out of the top 4 and scores 1.0: above what the center itself gets."""
    dists, relevant = [0, 3, 3, 4, 5], [1, 0, 0, 1, 0]
    db = torch.tensor([[-1.0] * d + [1.0] * (8 - d) for d in dists])
    dl = torch.tensor([[1, 0] if r else [0, 1] for r in relevant])
    q, ql = torch.ones(1, 8), torch.tensor([[1, 0]])
    at_center = float(average_precision(q, db, ql, dl, 4)[0])
    assert at_center == pytest.approx(0.75)
    worst_order = [0, 1, 2, 4]  # relevant at d + 1, irrelevant at d - 1: item 3 (R, 5) falls behind item 4 (I, 4)
    assert all(not relevant[i] for i in worst_order[1:])  # so its AP would be 1.0 > 0.75
    rc = certified_retrieval(q, torch.tensor([1.0]), db, ql, dl, top_k=4)
    assert rc.ap_lower[0] == pytest.approx(0.75)
    assert ap_lower_bound(np.array([1]), 2, 4) == pytest.approx(0.75)


def test_the_harmonic_shortcut_is_the_direct_minimum():
    g = np.random.default_rng(3)
    for _ in range(200):
        k = int(g.integers(1, 30))
        positions = np.sort(g.choice(np.arange(1, k + 1), int(g.integers(1, k + 1)), replace=False))
        m_best = int(g.integers(len(positions), k + 1))
        direct = min(
            sum(j / min(positions[j - 1] if j <= len(positions) else math.inf, k - m + j) for j in range(1, m + 1)) / m
            for m in range(len(positions), m_best + 1))
        assert ap_lower_bound(positions, m_best, k) == pytest.approx(direct, abs=1e-12)
    assert ap_lower_bound(np.array([], dtype=np.int64), 5, 10) == 0.0


def all_codes_within(center: torch.Tensor, r: int) -> torch.Tensor:
    out = []
    for s in range(r + 1):
        for flips in itertools.combinations(range(len(center)), s):
            c = center.clone()
            c[list(flips)] *= -1
            out.append(c)
    return torch.stack(out)


@pytest.mark.parametrize("ties", ["against", "index"])
def test_retrieval_bounds_hold_for_every_code_within_the_radius(ties):
    g = torch.Generator().manual_seed(0)
    k_bits, checked = 6, 0
    for trial in range(60):
        n = int(torch.randint(8, 25, (1,), generator=g))
        db = torch.where(torch.rand(n, k_bits, generator=g) < 0.5, 1.0, -1.0)
        dl = (torch.rand(n, 3, generator=g) < 0.35).to(torch.int64)
        ql = torch.tensor([[1, 0, 0]])
        center = torch.where(torch.rand(k_bits, generator=g) < 0.5, 1.0, -1.0)
        top_k = int(torch.randint(2, 8, (1,), generator=g))
        for r in (0, 1, 2):
            rc = certified_retrieval(center[None], torch.tensor([float(r)]), db, ql, dl, top_k, ties)
            moved = all_codes_within(center, r)
            ap = average_precision(moved, db, ql.expand(len(moved), -1), dl, top_k)  # index ties
            assert float(ap.min()) >= float(rc.ap_lower[0]) - 1e-12, (trial, r)
            if r == 0 and ties == "index":
                assert float(rc.ap_lower[0]) == pytest.approx(float(ap[0]), abs=1e-12)
            # every certified item is in the top k of every moved code
            dist = ((k_bits - moved @ db.T) / 2).round().to(torch.int64)
            rank_of = torch.argsort(torch.argsort(dist * n + torch.arange(n), 1), 1)
            sure = rc.topk[0][rc.topk_certified[0]]
            assert bool((rank_of[:, sure] < top_k).all()), (trial, r)
            if ties == "against":  # any tie rule: also when ties go by reversed index
                rank_rev = torch.argsort(torch.argsort(dist * n + (n - 1 - torch.arange(n)), 1), 1)
                assert bool((rank_rev[:, sure] < top_k).all()), (trial, r)
            checked += len(moved)
    assert checked > 1000


def test_r_zero_reproduces_the_projects_map_and_abstentions_count_zero():
    g = torch.Generator().manual_seed(1)
    q = torch.where(torch.rand(30, 16, generator=g) < 0.5, 1.0, -1.0)
    db = torch.where(torch.rand(200, 16, generator=g) < 0.5, 1.0, -1.0)  # many Hamming ties
    ql = (torch.rand(30, 5, generator=g) < 0.3).to(torch.int64)
    dl = (torch.rand(200, 5, generator=g) < 0.3).to(torch.int64)
    project = average_precision(q, db, ql, dl, 50)
    rc = certified_retrieval(q, torch.zeros(30), db, ql, dl, top_k=50, ties="index")
    assert torch.allclose(rc.ap_lower, project, atol=1e-12) and rc.clean_map == pytest.approx(float(project.mean()))
    assert bool(rc.topk_certified.all())
    against = certified_retrieval(q, torch.zeros(30), db, ql, dl, top_k=50, ties="against")
    assert bool((against.ap_lower <= project + 1e-12).all())
    radius = torch.tensor([0.0, math.inf] * 15)
    half = certified_retrieval(q, radius, db, ql, dl, top_k=50, ties="index")
    assert half.certified_map == pytest.approx(float(project[::2].sum()) / 30)
    wider = certified_retrieval(q, torch.full((30,), 2.0), db, ql, dl, top_k=50, ties="index")
    assert bool((wider.ap_lower <= project + 1e-12).all()) and wider.certified_map < rc.certified_map


def test_certified_map_at_each_radius_of_a_certificate():
    sigma = 0.25
    model, x, w, m = linear_query([1.6 + 0.1 * j for j in range(8)])
    cfg = CertifyConfig(sigma=sigma, radii=[0.25, 1.0], **FAST)
    cert = certify(model, x, torch.tensor([1]), cfg)
    db = torch.cat([cert.center, -cert.center, torch.ones(1, 8) * torch.tensor([1, -1] * 4)])
    dl = torch.tensor([[1], [0], [1]])
    table = certified_map_at_radii(cert, db, torch.tensor([[1]]), dl, top_k=2, ties="index")
    assert [t["radius_l2"] for t in table] == [0.25, 1.0]
    assert table[0]["certified_map"] == pytest.approx(1.0) and table[0]["certified_queries"] == 1
    assert table[1]["certified_map"] == 0.0 and table[1]["certified_queries"] == 0  # abstained at eps = 1
    assert table[0]["clean_map"] == table[1]["clean_map"] == pytest.approx(1.0)
