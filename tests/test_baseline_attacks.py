"""The baseline attacks and the transfer generators: each one's defining
property against a hand-computed case or a loop transcription, its budget,
and that it moves codes the way its paper says."""

from __future__ import annotations

import pytest
import torch

from saat_dist.attacks import (
    GENERATORS,
    PrototypeTrainer,
    anchor_codes,
    hag_attack,
    hag_loss,
    pgd_attack,
    sdha_attack,
    sdha_surrogate,
    square_attack,
    target_code_attack,
    transfer_attack,
    transfer_codes,
)
from saat_dist.attacks.prototype import circle_logsumexps, prototype_loss
from saat_dist.attacks.square import hamming_objective, square_share
from saat_dist.attacks.transfer import input_diversity
from saat_dist.mainstay import mainstay_codes
from saat_dist.training.encode import encode
from tests.gloo import run_on_group

EPS = 16 / 255


@pytest.fixture(scope="module")
def setting(trained_small):
    """(model, clean queries, their labels, train codes, train labels, guide codes)."""
    model, splits = trained_small
    x = splits["test"][0][:12].float() / 255
    y = splits["test"][1][:12]
    tr_codes = encode(model, splits["train"][0], "cpu")
    guide = mainstay_codes(y, tr_codes, splits["train"][1])
    return model, x, y, tr_codes, splits["train"][1], guide


def agreement(model, x, code):
    """Mean per-bit agreement of sign(F(x)) with ``code``."""
    with torch.no_grad():
        return float((torch.sign(model(x)) * code).mean())


def within_budget(x, x_adv, eps=EPS):
    return float((x_adv - x).abs().max()) <= eps + 1e-6 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def noise(x, eps=EPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + eps * (torch.randint(0, 2, x.shape, generator=g).float() * 2 - 1)).clamp(0, 1)


# ---------------------------------------------------------------- HAG
def test_hag_loss_by_hand():
    u = torch.tensor([[0.9, -0.2, 0.3, -0.8]])
    h = torch.tensor([[0.5, 0.6, -0.7, -0.1]])  # sign +, +, -, -
    # |u - sign h| = 0.1, 1.2, 1.3, 0.2: all < 1.5 count
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    agreement_ = float((u * h * m).sum() / m.sum())
    ref = (agreement_ + 1) ** 2 + float((u * m).mean()) ** 2
    assert float(hag_loss(u, h)) == pytest.approx(ref, rel=1e-6)
    # a bit that moved past the opposite side (|u - sign h| > 1.5) stops counting
    u2 = torch.tensor([[0.9, -0.6, 0.3, -0.8]])  # bit 1: |-0.6 - 1| = 1.6
    m2 = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    ref2 = (float((u2 * h * m2).sum() / m2.sum()) + 1) ** 2 + float((u2 * m2).mean()) ** 2
    assert float(hag_loss(u2, h)) == pytest.approx(ref2, rel=1e-6)


def test_hag_moves_codes_away_from_the_clean_code(setting):
    model, x, *_ = setting
    clean = torch.sign(model(x)).detach()
    params = [p.detach().clone() for p in model.parameters()]
    x_adv = hag_attack(model, x, eps=EPS, iters=30)
    assert within_budget(x, x_adv)
    assert agreement(model, x_adv, clean) < min(0.0, agreement(model, noise(x), clean) - 0.5)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_hag_step_is_the_references_at_its_batch_of_128(setting, trained_small):
    """One HAG step on 4 images equals the reference's first step for those
    images inside its batch of 128 (model/attack_model/hag.py, transcribed:
    SGD(lr 100, momentum 0.9) on the batch mean of hag_loss), whatever the
    other 124 images are."""
    from saat_dist.attacks.mainstay_pgd import ALPHA_SCHEDULE

    model = setting[0]
    x128 = trained_small[1]["test"][0][:128].float() / 255
    assert len(x128) >= 32
    x128 = x128.repeat(4, 1, 1, 1)[:128] if len(x128) < 128 else x128
    with torch.no_grad():
        h = model(x128, alpha=1.0)

    def reference_hag_loss(adv_code, ori_code, threshold_t=0.5, beta=1.0):  # hag.py, as written there
        mask = (torch.sign((1 + threshold_t) - torch.abs(adv_code - torch.sign(ori_code))) + 1) / 2
        adv_code, ori_code = mask * adv_code, mask * ori_code
        m = torch.sum(mask, dim=1)
        return torch.mean(torch.square(torch.sum(adv_code * ori_code, dim=1) / (m + 1e-8) + 1)) \
            + beta * torch.mean(torch.square(torch.mean(adv_code, dim=1)))

    x_hat = x128.clone().requires_grad_(True)
    opt = torch.optim.SGD([x_hat], lr=100, momentum=0.9)
    reference_hag_loss(model(x_hat, alpha=ALPHA_SCHEDULE[0]), h).backward()
    opt.step()
    with torch.no_grad():
        ref = torch.max(torch.min(x_hat, x128 + EPS), x128 - EPS).clamp(0, 1)
    ours = hag_attack(model, x128[:4], eps=EPS, iters=1)
    assert torch.allclose(ours, ref[:4], atol=1e-6)
    moved = float((ours - x128[:4]).abs().max())
    assert moved > 0  # a real step, not a no-op


# ---------------------------------------------------------------- SDHA
def test_sdha_surrogate_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.tanh(torch.randn(3, 6, generator=g, dtype=torch.float64))
    pool = torch.randint(0, 2, (7, 6), generator=g).double() * 2 - 1
    own = torch.randint(0, 2, (3, 6), generator=g).double() * 2 - 1
    rel = torch.tensor([[1, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sigma, z = 5.0, 0.5

    def term(qi, r):
        dis = sum(0.5 * abs(float(qi[k] - r[k])) * float(torch.sigmoid(sigma * qi[k] * r[k]))
                  + 1 - float(torch.sigmoid(sigma * qi[k] * r[k])) for k in range(6))
        ham = 0.5 * (6 - float(torch.sign(qi) @ r))
        return dis * (ham + 1e-8) ** -z

    ref = []
    for i in range(3):
        rs = [pool[j] for j in range(7) if rel[i, j]] or [own[i]]  # no relevant item: the query's own code
        ref.append(sum(term(q[i], r) for r in rs) / len(rs))
    got = sdha_surrogate(q, rel, pool, own, sigma, z)
    assert got.tolist() == pytest.approx(ref, rel=1e-10)


def test_sdha_pushes_codes_away_from_relevant_training_codes(setting):
    model, x, y, tr_codes, tr_lab, _ = setting
    relevant = (y @ tr_lab.T) > 0

    def distance_to_relevant(images):
        with torch.no_grad():
            c = torch.sign(model(images))
        ham = 0.5 * (c.shape[1] - c @ tr_codes.T)
        return float((ham * relevant).sum() / relevant.sum())

    x_adv = sdha_attack(model, x, y, tr_codes, tr_lab, eps=EPS, iters=30)
    assert within_budget(x, x_adv)
    assert distance_to_relevant(x_adv) > distance_to_relevant(noise(x)) + 1.0


# ---------------------------------------------------------------- DHTA / P2P
def test_anchor_codes_by_hand():
    db_labels = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]])
    db_codes = torch.tensor([[1, 1, -1, -1], [-1, -1, -1, -1], [1, -1, 1, -1], [1, 1, 1, 1], [1, 1, 1, -1]]).float()
    targets = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0]])  # the last set is in no database item
    gen = torch.Generator().manual_seed(0)
    one = anchor_codes(targets, db_codes, db_labels, 1, gen)
    exact = db_codes[[0, 2, 4]]  # the items whose label set is exactly [1, 0, 0] (not [1, 1, 0])
    assert any(torch.equal(one[0], c) for c in exact)
    assert torch.equal(one[1], db_codes[3]) and torch.equal(one[2], torch.zeros(4))
    # DHTA: the sign of the sum of 9 codes drawn (with replacement) from those items
    gen = torch.Generator().manual_seed(1)
    nine = anchor_codes(targets[:1], db_codes, db_labels, 9, gen)
    pick = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(nine[0], torch.sign(exact[pick].sum(0)))


def test_target_code_attack_pulls_toward_the_code(setting):
    model, x, *_ = setting
    target = torch.sign(torch.randn(len(x), 16, generator=torch.Generator().manual_seed(3)))
    x_adv = target_code_attack(model, x, target, eps=EPS, step_size=1 / 255, iters=30)
    assert within_budget(x, x_adv)
    assert agreement(model, x_adv, target) > agreement(model, x, target) + 0.4
    # no random start: the same call gives the same images
    assert torch.equal(x_adv, target_code_attack(model, x, target, eps=EPS, step_size=1 / 255, iters=30))


# ---------------------------------------------------------------- THA / ATRDH PrototypeNet
def test_circle_logsumexps_match_a_loop():
    g = torch.Generator().manual_seed(0)
    codes = torch.tanh(torch.randn(3, 8, generator=g, dtype=torch.float64))
    bank = torch.randint(0, 2, (6, 8), generator=g).double() * 2 - 1
    t_lab = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.float64)
    b_lab = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [1, 1]], dtype=torch.float64)
    pos, neg = [], []
    for i in range(3):
        for j in range(6):
            s = float(codes[i] @ bank[j]) / 8
            if float(t_lab[i] @ b_lab[j]) > 0:
                pos.append(-max(0.0, 2 - s) * s)
            else:
                neg.append(max(0.0, s + 2) * s)
    lse_p, lse_n = circle_logsumexps(codes, t_lab, bank, b_lab)
    assert float(lse_p) == pytest.approx(float(torch.logsumexp(torch.tensor(pos, dtype=torch.float64), 0)), rel=1e-12)
    assert float(lse_n) == pytest.approx(float(torch.logsumexp(torch.tensor(neg, dtype=torch.float64), 0)), rel=1e-12)
    ref = float(torch.nn.functional.softplus(lse_p + lse_n)) / 3 + float((codes.sign() - codes).pow(2).sum()) / 3e4
    assert float(prototype_loss(codes, t_lab, bank, b_lab)) == pytest.approx(ref, rel=1e-12)


def _class_bank(classes=4, per=10, bits=16):
    """A bank where each of 4 classes has its own code, every bit balanced over
    the classes (bit k follows row 1 + k % 3 of the 4 x 4 Hadamard matrix)."""
    h4 = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]).float()
    class_codes = torch.stack([h4[1 + k % 3] for k in range(bits)], 1)  # classes x bits
    labels = torch.eye(classes).repeat_interleave(per, 0)
    return class_codes, class_codes.repeat_interleave(per, 0), labels


def test_tha_prototypes_train_on_database_label_sets_at_the_reference_batch(setting, trained_small):
    """THA (tha.py): batches of 128 target label sets drawn from the
    database's label sets, circle loss against the model's training codes."""
    from saat_dist.config import load_config
    from saat_dist.attacks.prototype import tha_prototypes

    model, x, y, tr_codes, tr_lab, _ = setting
    cfg = load_config(None, ["model.bits=16", "attack.tha.pnet_steps=3"])
    assert cfg.attack.tha.pnet_batch == 128
    db_sets = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    drawn = []
    draw = PrototypeTrainer.draw_targets
    PrototypeTrainer.draw_targets = lambda self, n: drawn.append(draw(self, n)) or drawn[-1]
    try:
        trainer = tha_prototypes(cfg.attack.tha, tr_codes, tr_lab, db_sets, 16, cfg.seed, "cpu")
    finally:
        PrototypeTrainer.draw_targets = draw
    assert torch.equal(trainer.label_sets, db_sets.float())  # not the train split's label sets
    assert [len(b) for b in drawn] == [128] * 3
    assert all(any(torch.equal(row, s) for s in db_sets.float()) for b in drawn for row in b)


@pytest.mark.slow
def test_a_prototype_net_reaches_its_target_codes():
    """Trained on a bank where each class has its own code, the PrototypeNet's
    code of a class is that class's code."""
    class_codes, bank, labels = _class_bank()
    trainer = PrototypeTrainer(4, 16, torch.eye(4), total_steps=150, seed=0, device="cpu", lr=1e-3)
    trainer.fit(bank, labels, 150, 8)
    got = trainer.target_codes(torch.eye(4))
    assert torch.equal(got, class_codes)


def _prototype_worker(rank, world):
    from saat_dist.comm.collectives import all_gather_ragged, all_reduce_sum

    _, bank, labels = _class_bank()
    half = slice(0, 23) if rank == 0 else slice(23, 40)  # unequal parts
    trainer = PrototypeTrainer(4, 16, torch.eye(4), total_steps=6, seed=0, device="cpu", lr=1e-3,
                               gather=all_gather_ragged, all_reduce=all_reduce_sum, world=world)
    trainer.step(bank[half], labels[half], 8)
    return {k: p.grad.clone() for k, p in trainer.net.named_parameters()}


@pytest.mark.slow
def test_prototype_training_split_over_processes_equals_one_process():
    """The circle loss's logsumexps combine exactly across two gloo processes
    holding unequal parts of the bank."""
    out = run_on_group(_prototype_worker, 2)  # a 2-process gloo group (tests/gloo.py)
    _, bank, labels = _class_bank()
    single = PrototypeTrainer(4, 16, torch.eye(4), total_steps=6, seed=0, device="cpu", lr=1e-3)
    single.step(bank, labels, 8)
    # the step's gradient (after the all-reduce) is the one process's gradient;
    # later weights are not compared: Adam's first steps are sign steps and
    # would blow rounding differences up to lr
    for rank in (0, 1):
        for k, p in single.net.named_parameters():
            scale = float(p.grad.abs().max())
            assert scale > 0 and float((out[rank][k] - p.grad).abs().max()) <= 1e-5 * scale, k


# ---------------------------------------------------------------- black-box random search
def test_square_share_halves_on_schedule():
    assert square_share(0.1, 0, 1000) == 0.1
    assert square_share(0.1, 2, 1000) == 0.05  # past 10 of 10,000
    assert square_share(0.1, 999, 1000) == pytest.approx(0.1 / 2**9)


class NoGradModel(torch.nn.Module):
    """Fails if anything asks it for gradients."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, alpha=None):
        assert not torch.is_grad_enabled(), "the black-box attack asked for gradients"
        return self.model(x, alpha=alpha)


def test_square_attack_uses_forward_passes_only_and_lowers_the_hamming_objective(setting):
    model, x, _, _, _, guide = setting
    x_adv = square_attack(NoGradModel(model), x, guide, eps=EPS, iters=150,
                          generator=torch.Generator().manual_seed(0))
    assert within_budget(x, x_adv)
    with torch.no_grad():
        before = hamming_objective(model(x), guide)
        after = hamming_objective(model(x_adv), guide)
        stripes = hamming_objective(model(noise(x)), guide)
    assert float(after.mean()) < float(before.mean()) - 2 and float(after.mean()) < float(stripes.mean())
    # targeted: toward the code
    x_t = square_attack(model, x, guide, eps=EPS, iters=50, targeted=True, generator=torch.Generator().manual_seed(0))
    assert agreement(model, x_t, guide) >= agreement(model, x, guide)


# ---------------------------------------------------------------- transfer generators
@pytest.mark.parametrize("name", GENERATORS)
def test_transfer_generators_keep_the_budget_and_lower_the_mainstay_agreement(setting, name):
    model, x, _, _, _, guide = setting
    x_adv = transfer_attack(name, model, x, guide, eps=EPS, iters=10, decay=0.5,
                            generator=torch.Generator().manual_seed(0))
    assert within_budget(x, x_adv)
    assert agreement(model, x_adv, guide) < agreement(model, noise(x), guide) - 0.5


def test_bim_steps_from_the_clean_image(setting):
    model, x, _, _, _, guide = setting
    one = transfer_attack("bim", model, x, guide, eps=EPS, iters=1, step_size=1 / 255)
    moved = (one - x).abs()
    interior = (x > 1 / 255) & (x < 1 - 1 / 255)
    assert torch.allclose(moved[interior & (moved > 0)], torch.tensor(1 / 255), atol=1e-6)
    assert float((moved[interior] > 0).float().mean()) > 0.5  # no random start: exactly one step from x
    assert torch.equal(one, transfer_attack("bim", model, x, guide, eps=EPS, iters=1, step_size=1 / 255))


def test_si_ni_fgsm_with_one_scale_copy_is_ni_fgsm(setting):
    model, x, _, _, _, guide = setting
    ni = transfer_attack("nifgsm", model, x, guide, eps=EPS, iters=6)
    si = transfer_attack("sinifgsm", model, x, guide, eps=EPS, iters=6, si_copies=1)
    assert torch.equal(ni, si)
    assert not torch.equal(ni, transfer_attack("sinifgsm", model, x, guide, eps=EPS, iters=6, si_copies=3))


def test_input_diversity_shrinks_and_pads():
    x = torch.rand(2, 3, 32, 32) + 1  # every value > 0: padding is the only zero
    g = torch.Generator().manual_seed(0)
    out = input_diversity(x, 0.9, 1.0, g)
    assert out.shape == x.shape
    rows_zero = (out == 0).all(dim=(1, 3)).any(1) | (out == 0).all(dim=(1, 2)).any(1)
    assert bool(rows_zero.all())  # a zero border on some side
    assert torch.equal(input_diversity(x, 0.9, 0.0, g), x)  # probability 0: unchanged


def test_transfer_codes_score_examples_on_other_models(setting, trained_small):
    from saat_dist.models import build_hash_model

    model, x, _, _, _, guide = setting
    other = build_hash_model("small_cnn", 16, width=8).eval()
    x_adv = pgd_attack(model, x, guide, eps=EPS, step_size=2 / 255, iters=5)
    codes = transfer_codes({"a": model, "b": other}, x_adv)
    assert torch.equal(codes["a"], encode(model, x_adv, "cpu"))
    assert torch.equal(codes["b"], encode(other, x_adv, "cpu"))
