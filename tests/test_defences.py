"""The defences as modes of the one trainer (SAAT, CgAT, ATRDH, PGD-AT): the
guide codes and loss terms that define each, the reference options, and
that a defence's extra state (continuous hash bank, ATRDH's PrototypeNet)
survives a checkpoint."""

from __future__ import annotations

import itertools

import pytest
import torch

from saat_dist.hashing import DPHLoss
from saat_dist.mainstay import CodeBank, mainstay_codes, mainstay_codes_dense
from saat_dist.models import build_hash_model
from saat_dist.stages import TRAINING
from saat_dist.training import TorchStepper
from saat_dist.training import (
    ATRDHSettings,
    PGDATSettings,
    SAATSettings,
    atrdh_step,
    cgat_step,
    pairwise_to_bank,
    pgd_at_step,
    saat_step,
)
from tests.test_trainer import Crash, CrashAfterCheckpoints, run_in_process, tiny_cfg


def _bank(n=60, c=4, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, c, generator=g) < 0.4).float()
    codes = torch.randint(0, 2, (n, k), generator=g).float() * 2 - 1
    return labels, codes


def test_centre_codes_are_the_argmax_with_uniform_weights():
    """CgAT's centre code: argmax_b b^T (mean code of relevant items - mean code
    of irrelevant items), by brute force over all 2^K codes."""
    labels, codes = _bank()
    queries = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]).float()
    got = mainstay_codes(queries, codes, labels, weighting="uniform")
    every = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=8)))
    for i, q in enumerate(queries):
        rel = (labels @ q) > 0
        if not rel.any() or rel.all():  # a side is empty: the reference's formula gives the all-zero code
            assert torch.equal(got[i], torch.zeros(8)), i
            continue
        target = codes[rel].mean(0) - codes[~rel].mean(0)
        best = every[(every @ target).argmax()]
        nonzero = target.abs() > 1e-9
        assert torch.equal(got[i][nonzero], best[nonzero])
    assert torch.equal(got[3], torch.zeros(8))  # the all-zero label: nothing relevant
    # ... and it is not SAAT's (cosine-weighted) mainstay code on multi-label data
    assert not torch.equal(got, mainstay_codes(queries, codes, labels))
    # single-label data: every relevant item has cosine 1, the two coincide
    one_hot = torch.eye(4)[torch.arange(60) % 4]
    assert torch.equal(mainstay_codes(torch.eye(4), codes, one_hot, weighting="uniform"),
                       mainstay_codes_dense(torch.eye(4), codes, one_hot))


def _step_setting(seed=0, k=8):
    torch.manual_seed(seed)
    model = build_hash_model("small_cnn", k, width=8)
    labels, codes = _bank(n=64, k=k)
    bank = CodeBank(labels, k)
    bank.update(torch.arange(64), codes)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 3, 32, 32, generator=g)
    return model, bank, (x, labels[:16], torch.arange(16)), TorchStepper(torch.optim.SGD(model.parameters(), lr=0.01))


def test_cgat_step_is_saat_with_centre_codes_and_no_quantisation():
    model, bank, batch, stepper = _step_setting()
    s = SAATSettings(eps=8 / 255, step_size=2 / 255, iters=2, lam=1.0, mu=0.0)
    out = cgat_step(model, stepper, batch, bank, DPHLoss(), s, 0, torch.Generator().manual_seed(0))
    assert float(out["loss"]) == pytest.approx(float(out["hash"] + out["adv"]), rel=1e-6)
    # the adversarial term reads the centre codes of the updated bank
    model2, bank2, batch2, stepper2 = _step_setting()
    ref = saat_step(model2, stepper2, batch2, bank2, DPHLoss(),
                    SAATSettings(eps=8 / 255, step_size=2 / 255, iters=2, lam=1.0, mu=0.0, weighting="uniform"),
                    0, torch.Generator().manual_seed(0))
    assert float(out["adv"]) == float(ref["adv"])


def test_centre_code_with_an_empty_side_is_zero_as_the_reference_computes_it():
    """CgAT's hash_center_code (xunguangwang/CgAT central_adv_train.py),
    transcribed: sign(c w1 B - (N - c) w2 B) with c the number of irrelevant
    items; with no relevant or no irrelevant item it is all zero."""
    labels, codes = _bank(n=30)

    def reference(y):
        w = (labels * y).sum(1) / torch.sign(labels + y).sum(1).clamp_min(1e-30)  # Jaccard
        w2 = 1 - torch.sign(w)
        c = w2.sum()
        w1 = 1 - w2
        return torch.sign((c * w1[:, None] * codes - (len(labels) - c) * w2[:, None] * codes).sum(0))

    labels[0] = 0  # one item without labels: the only one irrelevant to the all-ones query
    for q in (torch.tensor([1.0, 0, 0, 0]), torch.ones(4), torch.zeros(4)):
        want = reference(q)
        got = mainstay_codes(q[None], codes, labels, weighting="uniform")[0]
        assert torch.equal(got, want), q
    assert torch.equal(mainstay_codes(torch.zeros(1, 4), codes, labels, weighting="uniform"), torch.zeros(1, 8))


def test_pairwise_to_bank_is_the_dph_form_against_the_bank():
    labels, codes = _bank(n=50)
    bank = CodeBank(labels, 8)
    bank.update(torch.arange(50), codes * 0.7)
    u = torch.tanh(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)))
    y = labels[:6]
    ref = 0.0
    for i in range(6):
        for j in range(50):
            s = 1.0 if float(y[i] @ labels[j]) > 0 else -1.0
            ref += (float(u[i] @ (codes[j] * 0.7)) / 8 - s) ** 2
    ref /= 50 * 6
    assert float(pairwise_to_bank(u, y, bank)) == pytest.approx(ref, rel=1e-5)  # N-independent path
    assert float(pairwise_to_bank(u, y, type("Plain", (), {"codes": bank.codes, "labels": labels})())) \
        == pytest.approx(ref, rel=1e-5)  # the O(N) formula on a bank without statistics


def test_atrdh_step_trains_the_prototypes_and_the_pairwise_term():
    from saat_dist.attacks import PrototypeTrainer

    model, bank, batch, stepper = _step_setting()
    protos = PrototypeTrainer(4, 8, bank.set_labels, total_steps=10, seed=0, device="cpu", lr=1e-3)
    before = [p.detach().clone() for p in protos.net.parameters()]
    s = ATRDHSettings(eps=8 / 255, step_size=2 / 255, iters=2, adv_weight=2.0)
    out = atrdh_step(model, stepper, batch, bank, DPHLoss(), s, 0, torch.Generator().manual_seed(0), protos)
    assert float(out["loss"]) == pytest.approx(float(out["hash"] + 2.0 * out["adv"]), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, protos.net.parameters()))
    assert protos.scheduler.last_epoch == 1


def test_pgd_at_inner_attack_raises_the_hash_loss():
    model, bank, batch, stepper = _step_setting()
    outs = [pgd_at_step(model, stepper, batch, bank, DPHLoss(), PGDATSettings(eps=16 / 255, step_size=4 / 255,
                                                                              iters=3, clean_weight=1.0),
                        step, torch.Generator().manual_seed(step)) for step in range(3)]
    for out in outs:
        assert float(out["adv"]) > float(out["hash"])  # the examples maximise the benign loss
        assert float(out["loss"]) == pytest.approx(float(out["hash"] + out["adv"]), rel=1e-6)


def test_the_reference_attack_mode_updates_batchnorm_during_the_inner_attack():
    model, bank, batch, stepper = _step_setting()
    bn = model.hash_bn
    for mode, moved in (("eval", False), ("train", True)):
        seen = []
        hook = bn.register_forward_hook(lambda m, i, o: seen.append(m.training))
        saat_step(model, stepper, batch, bank, DPHLoss(), SAATSettings(iters=2, mode=mode), 0,
                  torch.Generator().manual_seed(0))
        hook.remove()
        # the inner attack's 2 forward passes, then the clean and adversarial forward in train mode
        assert seen[:2] == [moved, moved] and seen[2:] == [True, True]


@pytest.mark.slow
@pytest.mark.parametrize("defence", ["saat", "cgat", "atrdh", "pgd_at"])
def test_every_defence_resumes_where_an_uninterrupted_run_ends(tiny_demo, tmp_path, defence):
    """The continuous hash bank and ATRDH's PrototypeNet are part of the checkpoint."""
    shards = tiny_demo[1]["shard_dir"]
    extra = ("distributed.checkpoint_every=2", f"{defence}.epochs=1", f"{defence}.hash_bank=continuous",
             f"{defence}.iters=2", f"{defence}.batch_size=32", "train.optim.name=sgd", "train.optim.lr=0.05")
    stage = TRAINING[defence]
    clean = tiny_cfg(tmp_path / "clean", shards, *extra)
    run_in_process(clean, TRAINING["train"])
    run_in_process(clean, stage)
    broken = tiny_cfg(tmp_path / "broken", shards, *extra)
    run_in_process(broken, TRAINING["train"])
    with pytest.raises(Crash):
        run_in_process(broken, stage, CrashAfterCheckpoints(2))
    result = run_in_process(broken, stage)  # from step-4
    assert result.log_records[0]["step"] == 5
    a = torch.load(tmp_path / "clean" / stage.out / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "broken" / stage.out / "model.pt", weights_only=True)["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    state = torch.load(tmp_path / "broken" / stage.out / "checkpoints" / "step-7" / "rank-0.pt", weights_only=True)
    assert "hash_bank" in state["extras"]
    assert ("prototypes" in state["extras"]) == (defence == "atrdh")
    # the continuous bank holds continuous codes, the guide bank signs
    assert not set(state["extras"]["hash_bank"]["bank"]["codes"].unique().tolist()) <= {-1.0, 1.0}
    assert set(state["bank"]["bank"]["codes"].unique().tolist()) <= {-1.0, 1.0}
    if defence == "atrdh":  # its pairwise term's bank: continuous codes from zeros (the reference's U_ben)
        adv = state["extras"]["adv_bank"]["bank"]["codes"]
        untouched = (adv == 0).all(1)
        assert 0 < int(untouched.sum()) < len(adv)  # items not yet trained are still 0
        assert not bool((state["extras"]["hash_bank"]["bank"]["codes"] == 0).all(1).any())  # filled at the start
    else:
        assert "adv_bank" not in state["extras"]
