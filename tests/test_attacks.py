"""The mainstay-code attack: bounds, targets, strength against noise."""

import pytest
import torch

from saat_dist.attacks import ALPHA_SCHEDULE, attack_loss, choose_targets, perceptibility, pgd_attack
from saat_dist.attacks.mainstay_pgd import alpha_at
from saat_dist.mainstay import mainstay_codes
from saat_dist.metrics import mean_average_precision
from saat_dist.training.encode import encode


def test_alpha_schedule_has_ten_equal_phases():
    alphas = [alpha_at(i, 100, ALPHA_SCHEDULE) for i in range(100)]
    assert alphas[:50] == [0.1] * 50
    assert alphas[50:60] == [0.2] * 10 and alphas[-1] == 1.0
    assert alpha_at(0, 7, None) is None


def test_sharp_loss_matches_definition():
    codes = torch.tensor([[0.9, -0.8, 0.2, -0.1]])
    guide = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    s = codes * guide  # [0.9, -0.8, -0.2, 0]
    keep = s > -0.5  # untargeted drops bit 2
    ref = ((s + 2) * s)[keep].sum() / keep.sum()
    assert float(attack_loss(codes, guide, targeted=False, kind="sharp")) == pytest.approx(float(ref))
    keep_t = s < 0.5
    ref_t = -((s + 2) * s)[keep_t].sum() / keep_t.sum()
    assert float(attack_loss(codes, guide, targeted=True, kind="sharp")) == pytest.approx(float(ref_t))
    assert float(attack_loss(codes, guide, targeted=False, kind="plain")) == pytest.approx(float(s.mean()))


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("restarts", [1, 2])
def test_bounds_hold(trained_small, targeted, restarts):
    model, splits = trained_small
    x = splits["test"][0][:16].float() / 255
    guide = torch.sign(torch.randn(16, 16))
    params = [p.detach().clone() for p in model.parameters()]
    eps = 8 / 255
    x_adv = pgd_attack(model, x, guide, eps=eps, step_size=2 / 255, iters=5, targeted=targeted, restarts=restarts)
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float((x_adv - x).abs().max()) > eps / 2  # it did move
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # weights untouched
    assert all(p.grad is None for p in model.parameters())
    p = perceptibility(x, x_adv)
    assert p["linf"] <= eps + 1e-6 and p["l2"] > 0 and p["mse"] <= eps**2


def test_attack_beats_uniform_noise(trained_small):
    model, splits = trained_small
    (x_tr, y_tr, _), (x_q, y_q, _), (x_db, y_db, _) = splits["train"], splits["test"], splits["database"]
    guide = mainstay_codes(y_q, encode(model, x_tr, "cpu"), y_tr)
    x = x_q.float() / 255
    eps = 16 / 255
    x_adv = pgd_attack(model, x, guide, eps=eps, step_size=2 / 255, iters=20, loss="sharp")
    noise = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    clean, adv, noisy = (encode(model, t, "cpu") for t in (x, x_adv, noise))

    def agreement(codes):  # mean agreement with the query's mainstay code
        return float((codes * guide).mean())

    assert agreement(adv) < agreement(noisy) - 0.3
    db_codes = encode(model, x_db, "cpu")
    clean_map = mean_average_precision(clean, db_codes, y_q, y_db, 300)
    noisy_map = mean_average_precision(noisy, db_codes, y_q, y_db, 300)
    adv_map = mean_average_precision(adv, db_codes, y_q, y_db, 300)
    assert adv_map < noisy_map - 0.1 and adv_map < clean_map - 0.1
    # the theory bound (-b* as the query) is at least as damaging as a real attack is on average
    theory = mean_average_precision(-guide, db_codes, y_q, y_db, 300)
    assert theory <= clean_map - 0.1


def test_targeted_attack_pulls_toward_target(trained_small):
    model, splits = trained_small
    (x_tr, y_tr, _), (x_q, y_q, _), (_, y_db, _) = splits["train"], splits["test"], splits["database"]
    targets, valid = choose_targets(y_q, torch.unique(y_db, dim=0), torch.Generator().manual_seed(0))
    assert valid.all()
    assert ((targets * y_q).sum(1) == 0).all()  # share no label with the query
    db_sets = {tuple(r) for r in y_db.int().tolist()}
    assert all(tuple(t) in db_sets for t in targets.int().tolist())  # exist in the database
    guide = mainstay_codes(targets, encode(model, x_tr, "cpu"), y_tr)
    x = x_q.float() / 255
    x_t = pgd_attack(model, x, guide, eps=16 / 255, step_size=2 / 255, iters=20, targeted=True)
    before = float((encode(model, x, "cpu") * guide).mean())
    after = float((encode(model, x_t, "cpu") * guide).mean())
    assert after > before + 0.3


def test_choose_targets_flags_queries_without_disjoint_set():
    q = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    sets = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    targets, valid = choose_targets(q, sets)
    assert valid.tolist() == [False, True]
    assert targets[1].tolist() == [0, 1, 1] and targets[0].sum() == 0


def test_reference_perceptibility_is_the_reference_matrix_norms():
    """The reference's cal_perceptibility: torch matrix norms (induced L-inf and
    spectral) of each image channel's H x W perturbation, averaged."""
    from saat_dist.attacks.perceptibility import reference_perceptibility_from_sums, reference_perceptibility_sums

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 12, 12, generator=g)
    x_adv = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.1).clamp(0, 1)
    got = reference_perceptibility_from_sums(reference_perceptibility_sums(x[:2], x_adv[:2])
                                             + reference_perceptibility_sums(x[2:], x_adv[2:]))
    d = (x_adv - x).double()
    row_sums = d.abs().sum(-1).amax(-1)  # the induced L-inf norm: the largest row sum
    assert got["linf_matrix_norm"] == pytest.approx(float(row_sums.mean()), rel=1e-10)
    spectral = torch.stack([torch.linalg.svdvals(m)[0] for m in d.reshape(-1, 12, 12)])
    assert got["spectral_norm"] == pytest.approx(float(spectral.mean()), rel=1e-10)
