"""The benign and SAAT steps as plain functions."""

import sys

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


# ---------------------------------------------------------------- optimizers and schedules
def _schedule(global_batch=32, micro_batch=32, grad_accum=1, spe=10, epochs=4):
    from saat_dist.training.trainer import Schedule

    return Schedule(global_batch, micro_batch, grad_accum, spe, spe * epochs)


def test_adam_gets_its_betas_in_process():
    from saat_dist.config import load_config
    from saat_dist.training.backend import LocalBackend

    cfg = load_config(None)
    backend = LocalBackend(build_hash_model("small_cnn", 16, width=8), cfg.atrdh.optim, _schedule())
    group = backend.stepper.optimizer.param_groups[0]
    assert isinstance(backend.stepper.optimizer, torch.optim.Adam)
    assert group["betas"] == (0.5, 0.999) and group["lr"] == pytest.approx(1e-4)


def _deepspeed_optimizer(rank, world, optim):
    from saat_dist.config import DistributedConfig
    from saat_dist.distributed.deepspeed_setup import DeepSpeedBackend

    backend = DeepSpeedBackend(build_hash_model("small_cnn", 16, width=8), optim, DistributedConfig(),
                               _schedule(global_batch=8, micro_batch=8), world)
    opt = backend.engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the client optimizer
    group = inner.param_groups[0]
    inner.zero_grad()
    inner.step()  # no gradients: the update skips every parameter, the wrappers run
    state = inner.state_dict()
    inner.load_state_dict(state)
    from deepspeed.runtime.zero.utils import is_zero_supported_optimizer

    # a fresh process from the fork server, which imported torch, DeepSpeed and the package
    return (type(inner).__name__, group["betas"], group["lr"], "torch._dynamo" in sys.modules,
            is_zero_supported_optimizer(inner))


@pytest.mark.slow
def test_adam_gets_its_betas_through_deepspeed():
    from saat_dist.config import load_config
    from tests.gloo import run_on_group

    (name, betas, lr, dynamo, zero_tested), = run_on_group(_deepspeed_optimizer, 1, load_config(None).atrdh.optim)
    assert name == "Adam" and tuple(betas) == (0.5, 0.999) and lr == pytest.approx(1e-4)
    assert not dynamo, "building and stepping the optimizer imported torch._dynamo (~2 CPU-s a Ray worker)"
    assert zero_tested  # ZeRO 1-3 would warn of an untested optimizer


def _both_optimizers(rank, world, name):
    """(ours, torch's) parameters and optimizer state after the same steps,
    a state_dict round trip between them, weight decay and momentum on; and
    whether torch._dynamo was loaded while ours ran (before torch's, which
    imports it)."""
    from saat_dist import optimizers

    ours_cls, torch_cls = {"adam": (optimizers.Adam, torch.optim.Adam), "sgd": (optimizers.SGD, torch.optim.SGD)}[name]
    extra = {"adam": {"betas": (0.5, 0.99)}, "sgd": {"momentum": 0.9}}[name]

    def train(cls):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        opt = cls(net.parameters(), lr=0.05, weight_decay=0.01, **extra)
        for step in range(4):
            opt.zero_grad()
            net(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            if step == 1:
                opt.load_state_dict(opt.state_dict())
        return [p.detach() for p in net.parameters()], opt.state_dict()

    ours = train(ours_cls)
    dynamo = "torch._dynamo" in sys.modules
    assert isinstance(ours_cls([torch.nn.Parameter(torch.zeros(1))]), torch_cls)
    return ours, train(torch_cls), dynamo


def _assert_equal(ours, theirs):
    (params, state), (their_params, their_state) = ours, theirs
    assert all(torch.equal(a, b) for a, b in zip(params, their_params, strict=True))
    assert state["param_groups"] == their_state["param_groups"]
    for key, value in their_state["state"][0].items():
        assert torch.equal(state["state"][0][key], value), key


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_package_optimizers_step_as_torchs_to_the_bit_with_dynamo_loaded(name):
    """saat_dist.optimizers are torch's classes without their import of
    torch._dynamo: with Dynamo loaded (a torchvision backbone loads it),
    their wrappers are Dynamo's, and they end where torch's do."""
    import importlib

    importlib.import_module("torch._dynamo")
    ours, theirs, dynamo = _both_optimizers(0, 1, name)
    assert dynamo
    _assert_equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_the_package_optimizers_step_as_torchs_to_the_bit_without_dynamo(name):
    """The path a Ray worker of a small_cnn run takes: a fresh process
    (from the fork server, which imported torch, DeepSpeed and the package)
    where nothing loaded torch._dynamo; ours load nothing and end where
    torch's do."""
    from tests.gloo import run_on_group

    ours, theirs, dynamo = run_on_group(_both_optimizers, 1, name)[0]
    assert not dynamo
    _assert_equal(ours, theirs)


def test_lr_scaling_rules_and_warmup():
    from saat_dist.config import OptimConfig
    from saat_dist.training.optim import build_optimizer, build_scheduler, lr_factor

    p = [torch.nn.Parameter(torch.zeros(2))]
    linear = OptimConfig(name="sgd", lr=0.05, lr_scaling="linear", base_batch=32, warmup_epochs=2)
    assert lr_factor(linear, 256) == 8 and lr_factor(OptimConfig(lr_scaling="sqrt", base_batch=32), 128) == 2
    assert lr_factor(OptimConfig(lr_scaling="linear"), 256) == 1  # no base batch: nothing to scale
    opt = build_optimizer(p, linear, 256)
    sched = build_scheduler(opt, linear, total_steps=100, steps_per_epoch=10, global_batch=256)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Goyal et al.: from the batch-32 lr, linearly, to 8 x over 2 epochs (20 steps), then flat
    assert lrs[0] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.05 + 0.5 * (0.4 - 0.05))
    assert lrs[20:] == pytest.approx([0.4] * 5)
    unscaled = build_optimizer(p, OptimConfig(name="sgd", lr=0.05), 256)
    assert unscaled.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_reference_benign_schedule():
    """hashing.py: after each epoch e, lr = 0.01 x 0.1 ** (e // (100 // 3)), i.e.
    epoch k runs at 0.01 x 0.1 ** ((k - 1) // 33): decays at epochs 34 and 67 only."""
    from pathlib import Path

    from saat_dist.config import load_config
    from saat_dist.training.optim import lr_multiplier

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper" / "nus-wide.yaml")
    o, spe = cfg.train.optim, 10500 // cfg.train.batch_size
    for epoch in range(cfg.train.epochs):
        want = 0.01 * 0.1 ** (0 if epoch == 0 else (epoch - 1) // (100 // 3))
        for step in (epoch * spe, (epoch + 1) * spe - 1):
            assert o.lr * lr_multiplier(o, step, 100 * spe, spe, 1.0) == pytest.approx(want), epoch


def test_gradient_accumulation_equals_one_backward_over_the_whole_batch():
    """TorchStepper(accumulate=2): two half batches give the step of one whole batch."""
    g = torch.Generator().manual_seed(0)
    x, w0 = torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    params = {}
    for accumulate in (1, 2):
        w = torch.nn.Parameter(w0.clone())
        stepper = TorchStepper(torch.optim.SGD([w], lr=0.1), accumulate=accumulate)
        for part in x.chunk(accumulate):
            stepper.backward((part @ w).pow(2).mean())
            stepper.step()
        params[accumulate] = w.detach()
    assert torch.allclose(params[1], params[2], atol=1e-7)
    assert not torch.equal(params[1], w0)
