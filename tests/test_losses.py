"""Each benign loss against a direct, loop-by-loop transcription of docs/method.md §2."""

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


def test_dpn_centres_and_hinge():
    from saat_dist.hashing import DPNLoss
    from saat_dist.hashing.losses import dpn_centres

    centres = dpn_centres(6, 16, seed=2)
    assert torch.equal((centres == -1).sum(1), torch.full((6,), 8))  # exactly half the bits -1
    loss = DPNLoss(num_classes=6, bits=16, seed=2)
    assert torch.equal(loss.centre_of.centres, centres)
    g = torch.Generator().manual_seed(1)
    u = torch.tanh(torch.randn(4, 16, generator=g))
    y = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]]).float()
    ref = 0.0
    for i in range(4):
        summed = y[i] @ centres
        t = torch.where(summed == 0, loss.centre_of.tie_centre, summed).sign()
        ref += sum(max(0.0, 1.0 - float(u[i, k] * t[k])) for k in range(16)) / (4 * 16)
    got, parts = loss(u, y)
    assert float(got) == pytest.approx(ref, rel=1e-6)
    # a code past the margin on its centre's side costs nothing
    t0 = loss.centre_of(y[:1])
    assert float(loss(t0 * 1.0, y[:1])[0]) == 0.0


def test_hswd_adds_the_sliced_wasserstein_term_to_hashnet():
    from saat_dist.hashing import HSWDLoss
    from saat_dist.hashing.losses import sliced_wasserstein_quantisation

    u, y, bank, labels = data(1)
    torch.manual_seed(5)
    got, parts = HSWDLoss()(u, y, bank, labels)
    hashnet, _ = HashNetLoss()(u, y, bank, labels)
    assert float(parts["hash"]) == pytest.approx(float(hashnet), rel=1e-12)
    # the same draws, by hand: per bit, sort both columns and compare
    torch.manual_seed(5)
    target = torch.randint(0, 2, u.shape).double() * 2 - 1
    b, k = u.shape
    ref = 0.0
    for j in range(k):
        a, t = sorted(u[:, j].tolist()), sorted(target[:, j].tolist())
        ref += sum((ai - ti) ** 2 for ai, ti in zip(a, t))
    ref /= b * k
    assert float(parts["quant"]) == pytest.approx(0.1 * ref, rel=1e-10)
    assert float(got) == pytest.approx(float(hashnet) + 0.1 * ref, rel=1e-10)
    # codes equal to the draws themselves are at distance 0
    torch.manual_seed(7)
    draws = torch.randint(0, 2, (6, 4)).float() * 2 - 1
    torch.manual_seed(7)
    assert float(sliced_wasserstein_quantisation(draws)) == 0.0
    assert HSWDLoss().tanh_scale(400) == HashNetLoss().tanh_scale(400)


def test_ortho_cross_entropy_with_cosine_margin():
    from saat_dist.hashing import OrthoLoss

    loss = OrthoLoss(num_classes=4, bits=8, seed=3)
    assert set(loss.codebook.unique().tolist()) == {-1.0, 1.0}
    g = torch.Generator().manual_seed(0)
    u = torch.tanh(torch.randn(5, 8, generator=g, dtype=torch.float64))
    y = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.float64)
    mean, var = u.mean(0), u.var(0, unbiased=False)
    v = (u - mean) / torch.sqrt(var + 1e-5)
    ref = 0.0
    for i in range(5):
        cos = [float(v[i] @ loss.codebook[c].double() / (v[i].norm() * loss.codebook[c].double().norm()))
               for c in range(4)]
        logits = [8.0 * (cos[c] - 0.2 * float(y[i, c])) for c in range(4)]
        lse = math.log(sum(math.exp(z) for z in logits))
        ref += -sum(float(y[i, c]) / float(y[i].sum()) * (logits[c] - lse) for c in range(4)) / 5
    got, _ = loss(u, y)
    assert float(got) == pytest.approx(ref, rel=1e-6)
    # one-hot labels: plain cross entropy on the margin logits
    one_hot = torch.eye(4, dtype=torch.float64)[[0, 1, 2, 3, 0]]
    cos = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(loss.codebook.double(), dim=1).T
    ce = torch.nn.functional.cross_entropy(8 * (cos - 0.2 * one_hot), one_hot.argmax(1))
    assert float(loss(u, one_hot)[0]) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize("name", ["dph", "dpsh", "hashnet", "csq", "dpn", "hswd", "ortho"])
def test_every_loss_trains_a_step_and_is_finite(name):
    from saat_dist.hashing import LOSSES, build_hash_loss

    assert name in LOSSES
    loss_fn = build_hash_loss(name, num_classes=4, bits=8)
    u, y, bank, labels = data(2)
    u = u.float().requires_grad_(True)
    total, parts = loss_fn(u, y.float(), bank.float(), labels.float()) if loss_fn.uses_bank else loss_fn(u, y.float())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(u.grad).all() and float(u.grad.abs().sum()) > 0
    assert "hash" in parts
