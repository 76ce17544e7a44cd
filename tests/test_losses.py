"""Each benign loss against a direct, loop-by-loop transcription of SAAT.md §2."""

import math

import pytest
import torch

from saat_dist.hashing import CSQLoss, DPHLoss, DPSHLoss, HashNetLoss
from saat_dist.hashing.losses import csq_centres, hadamard


def data(seed=0, b=5, n=9, k=8, c=4):
    g = torch.Generator().manual_seed(seed)
    u = torch.tanh(torch.randn(b, k, generator=g, dtype=torch.float64))
    bank = torch.tanh(torch.randn(n, k, generator=g, dtype=torch.float64))
    y = (torch.rand(b, c, generator=g) < 0.4).double()
    labels = (torch.rand(n, c, generator=g) < 0.4).double()
    return u, y, bank, labels


def shares(a, b):
    return 1.0 if float(a @ b) > 0 else 0.0


@pytest.mark.parametrize("seed", range(3))
def test_dph(seed):
    u, y, bank, labels = data(seed)
    b, n, k = len(u), len(bank), u.shape[1]
    ref = 0.0
    for i in range(b):
        for j in range(n):
            s = 2 * shares(y[i], labels[j]) - 1
            ref += (float(u[i] @ bank[j]) / k - s) ** 2
    ref /= n * b
    got, parts = DPHLoss()(u, y, bank, labels)
    assert float(got) == pytest.approx(ref, rel=1e-10)
    assert float(parts["hash"]) == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_dpsh(seed):
    u, y, bank, labels = data(seed)
    b, n = len(u), len(bank)
    like, quant = 0.0, 0.0
    for i in range(b):
        for j in range(n):
            theta = float(u[i] @ bank[j]) / 2
            like += shares(y[i], labels[j]) * theta - math.log1p(math.exp(theta))
        quant += float(((torch.sign(u[i]) - u[i]) ** 2).sum())
    ref = -like / (n * b) + 50 * quant / (n * b)
    got, parts = DPSHLoss()(u, y, bank, labels)
    assert float(got) == pytest.approx(ref, rel=1e-10)
    assert float(parts["quant"]) == pytest.approx(50 * quant / (n * b), rel=1e-10)


def test_dpsh_is_stable_for_large_theta():
    u = torch.ones(2, 64, dtype=torch.float64) * 40
    got, _ = DPSHLoss()(u, torch.ones(2, 1), u * 1.0, torch.ones(2, 1))
    assert torch.isfinite(got)


@pytest.mark.parametrize("seed", range(3))
def test_hashnet(seed):
    u, y, bank, labels = data(seed)
    k = u.shape[1]
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    for i in range(len(u)):
        for j in range(len(bank)):
            theta = 10.0 / k * float(u[i] @ bank[j])
            s = shares(y[i], labels[j])
            nll = math.log1p(math.exp(theta)) - s * theta
            if s > 0:
                pos_sum, n_pos = pos_sum + nll, n_pos + 1
            else:
                neg_sum, n_neg = neg_sum + nll, n_neg + 1
    # weights S/S1 on positives, S/S0 on negatives, sum / S
    total = n_pos + n_neg
    ref = (pos_sum * total / n_pos + neg_sum * total / n_neg) / total
    got, _ = HashNetLoss()(u, y, bank, labels)
    assert float(got) == pytest.approx(ref, rel=1e-10)


def test_hashnet_scale_schedule():
    loss = HashNetLoss()
    assert loss.tanh_scale(0) == 1.0
    assert loss.tanh_scale(199) == 1.0
    assert loss.tanh_scale(200) == pytest.approx(math.sqrt(1 + 0.005 * 200))
    assert loss.tanh_scale(450) == pytest.approx(math.sqrt(1 + 0.005 * 400))


def test_csq_centres_and_loss():
    h = hadamard(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8))
    centres = csq_centres(10, 8)
    assert torch.equal(centres[:8], h) and torch.equal(centres[8:], -h[:2])
    loss = CSQLoss(num_classes=10, bits=8)
    u, _, _, _ = data(0, k=8)
    u = u.float()
    y = torch.zeros(5, 10)
    y[0, 1] = 1
    y[1, [0, 8]] = 1  # centres h0 and -h0 cancel: every bit ties -> the fixed tie centre
    y[2, [2, 3]] = 1
    y[3, 4] = 1
    y[4, [5, 6, 7]] = 1
    ref_total = 0.0
    for i in range(5):
        summed = y[i] @ loss.centres
        c = torch.where(summed == 0, loss.tie_centre, summed).sign()
        p, t = (u[i] + 1) / 2, (c + 1) / 2
        bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
        ref_total += float(bce) / 5
    quant = float(((u.abs() - 1) ** 2).mean()) * 0.05
    got, parts = loss(u, y)
    assert float(parts["hash"]) == pytest.approx(ref_total, rel=1e-5)
    assert float(got) == pytest.approx(ref_total + quant, rel=1e-5)
    assert torch.equal(loss.centre_of(y[1:2])[0], loss.tie_centre)
    # non power-of-two bits fall back to random centres
    assert csq_centres(10, 48).shape == (10, 48)
