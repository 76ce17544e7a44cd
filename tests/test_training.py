"""The benign and SAAT steps as plain functions."""

import pytest
import torch

from saat_dist.hashing import CSQLoss, DPHLoss, DPSHLoss, HashNetLoss
from saat_dist.mainstay import CodeBank, mainstay_codes
from saat_dist.models import build_hash_model
from saat_dist.training import SAATSettings, TorchStepper, benign_step, saat_step


def batches(tiny_demo, n=4, size=32):
    from saat_dist.data.stream import load_split

    x, y, idx = load_split(tiny_demo[1]["shard_dir"], "train", size)
    return x.float() / 255, y, idx


@pytest.mark.parametrize("loss_name", ["dph", "dpsh", "hashnet", "csq"])
def test_benign_step_learns(tiny_demo, loss_name):
    x, y, idx = batches(tiny_demo)
    loss_fn = {"dph": DPHLoss(), "dpsh": DPSHLoss(), "hashnet": HashNetLoss(), "csq": CSQLoss(10, 16)}[loss_name]
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", 16, width=8)
    bank = CodeBank(y, 16)
    stepper = TorchStepper(torch.optim.Adam(model.parameters(), lr=3e-3))
    batch = (x[:64], y[:64], idx[:64])
    first = float(benign_step(model, stepper, batch, bank, loss_fn, 0)["loss"])
    for step in range(1, 25):
        last = benign_step(model, stepper, batch, bank, loss_fn, step)
    assert float(last["loss"]) < first
    if loss_fn.uses_bank:  # the batch's codes are in the bank, the rest still 0
        assert (bank.codes[idx[:64]] != 0).all() and (bank.codes[idx[64:]] == 0).all()


def test_saat_step(tiny_demo):
    x, y, idx = batches(tiny_demo)
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", 16, width=8)
    bank = CodeBank(y, 16)
    bank.update(idx, torch.sign(torch.randn(len(idx), 16)))
    stepper = TorchStepper(torch.optim.SGD(model.parameters(), lr=0.05))
    settings = SAATSettings(eps=8 / 255, step_size=2 / 255, iters=3)
    batch = (x[:32], y[:32], idx[:32])
    before = [p.detach().clone() for p in model.parameters()]
    out = saat_step(model, stepper, batch, bank, DPHLoss(), settings, 0)
    assert set(out) == {"loss", "hash", "adv", "quant", "bits_flipped"}
    assert 0 <= float(out["bits_flipped"]) <= 1
    assert float(out["loss"]) == pytest.approx(float(out["hash"] + settings.lam * out["adv"] + settings.mu * out["quant"]), rel=1e-5)
    # the bank holds sign codes of the batch and its table is still exact
    assert set(bank.codes[idx[:32]].unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(bank.mainstay(y[:10]), mainstay_codes(y[:10], bank.codes, y))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_finite_loss_stops_loudly(tiny_demo):
    x, y, idx = batches(tiny_demo)
    model = build_hash_model("small_cnn", 16, width=8)
    bank = CodeBank(y, 16)
    stepper = TorchStepper(torch.optim.SGD(model.parameters(), lr=0.05))
    bad = x[:8].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite at step 3"):
        benign_step(model, stepper, (bad, y[:8], idx[:8]), bank, DPHLoss(), 3)
