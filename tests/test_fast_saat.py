"""The fast SAAT modes (issue 19): each mode's defining property, the cost
the trainer counts, the cyclic lr, and the catastrophic-overfitting guard."""

from __future__ import annotations

import json

import pytest
import torch

from saat_dist.defences.saat_curriculum import CurriculumPhase, SAATCurriculumConfig, phase_at, resized
from saat_dist.attacks.single_step import single_step_examples
from saat_dist.defences.saat_fgsm import SAATFGSMConfig, saat_fgsm_step
from saat_dist.defences.saat_free import SAATFreeConfig, saat_free_step
from saat_dist.hashing import DPHLoss
from saat_dist.keyed_random import ItemKeys
from saat_dist.mainstay import CodeBank
from saat_dist.models import build_hash_model
from saat_dist.stages import DEFENCE_STAGES, TRAIN
from saat_dist.training import TorchStepper
from saat_dist.training.optim import OptimConfig, lr_multiplier
from saat_dist.training.trainer import PassCounter
from tests.test_trainer import run_in_process, tiny_cfg


class Counting:
    """A stepper that counts backward passes and updates."""

    def __init__(self, inner: TorchStepper) -> None:
        self.inner, self.backwards, self.steps = inner, 0, 0

    def backward(self, loss):
        self.backwards += 1
        self.inner.backward(loss)

    def step(self):
        self.steps += 1
        self.inner.step()


def _setup(batch: int = 6, bits: int = 16):
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", bits, width=8)
    x = torch.rand(batch, 3, 32, 32)
    y = torch.zeros(batch, 4)
    y[torch.arange(batch), torch.arange(batch) % 4] = 1
    index = torch.arange(100, 100 + batch)
    bank = CodeBank(y, bits, index=index)
    with torch.no_grad():
        bank.update(index, torch.sign(model.eval()(x)))
    model.train()
    stepper = Counting(TorchStepper(torch.optim.SGD(model.parameters(), lr=0.01)))
    return model, stepper, (x, y, index), bank


def _input_gradients(monkeypatch) -> list[int]:
    """Records the batch size of every torch.autograd.grad call (an input gradient)."""
    calls: list[int] = []
    real = torch.autograd.grad

    def grad(outputs, inputs, *a, **k):
        calls.append(inputs.shape[0] if torch.is_tensor(inputs) else inputs[0].shape[0])
        return real(outputs, inputs, *a, **k)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


def test_single_step_saat_takes_one_input_gradient_per_image(monkeypatch):
    model, stepper, batch, bank = _setup()
    counter = PassCounter(model, 32)
    calls = _input_gradients(monkeypatch)
    settings = SAATFGSMConfig(eps=16 / 255)
    saat_fgsm_step(model, stepper, batch, bank, DPHLoss(), settings, 0,
                   keys=ItemKeys.of(batch[2], 0, "saat_fgsm", 0))
    assert calls == [6]  # one gradient of the input, for the whole batch: one per image
    assert (stepper.backwards, stepper.steps) == (1, 1)
    assert counter.passes == 3 * 6  # the inner pass, the clean and the adversarial forward


def test_n_fgsm_is_noise_plus_one_signed_step_of_eps():
    model, _, (x, y, index), bank = _setup()
    eps, keys = 16 / 255, ItemKeys.of(index, 0, "t")
    guide = bank.mainstay(y, "cosine")
    x_adv = single_step_examples(model, x, guide, eps=eps, noise=2.0, step=1.0, project_to_ball=False, keys=keys)
    start = (x + (keys.uniform(tuple(x.shape[1:])) * 2 - 1) * 2 * eps).clamp(0, 1)
    moved = (x_adv - start).abs()
    inside = (x_adv > 0) & (x_adv < 1)  # where [0, 1] did not clip the step
    assert moved[inside].sub(eps).abs().max() < 1e-6
    assert (x_adv - x).abs().max() > 1.5 * eps  # no projection: N-FGSM's perturbation reaches past eps
    projected = single_step_examples(model, x, guide, eps=eps, noise=1.0, step=1.25, project_to_ball=True, keys=keys)
    assert (projected - x).abs().max() <= eps + 1e-6


def test_free_saat_replays_each_batch_with_one_backward_per_replay(monkeypatch):
    model, stepper, batch, bank = _setup()
    counter = PassCounter(model, 32)
    calls = _input_gradients(monkeypatch)
    before = [p.detach().clone() for p in model.parameters()]
    out = saat_free_step(model, stepper, batch, bank, DPHLoss(), SAATFreeConfig(eps=16 / 255, replays=3), 0,
                         keys=ItemKeys.of(batch[2], 0, "saat_free", 0))
    assert calls == []  # no separate inner attack: the perturbation's gradient comes from the update's backward
    assert (stepper.backwards, stepper.steps) == (3, 3)
    assert counter.passes == 2 * 3 * 6  # clean and adversarial forward per replay
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.isfinite(out["loss"])


def test_free_saat_moves_the_perturbation_by_eps_along_the_input_gradient():
    """Replay 2 sees x + clip(delta_1 + eps * sign(grad_1)): check against a replay done by hand."""
    eps = 16 / 255
    seen = []
    model, stepper, batch, bank = _setup()
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    saat_free_step(model, stepper, batch, bank, DPHLoss(), SAATFreeConfig(eps=eps, replays=2, start="zero"), 0,
                   keys=ItemKeys.of(batch[2], 0, "s", 0))
    handle.remove()
    x = batch[0]
    assert torch.equal(seen[1], x)  # start: zero, so replay 1's adversarial images are the clean ones
    step = seen[3] - x
    moved = step.abs()[(seen[3] > 0) & (seen[3] < 1)]
    assert moved.sub(eps).abs().max() < 1e-6  # one signed step of eps from zero


def test_curriculum_phases_and_resolution():
    phases = SAATCurriculumConfig().phases
    assert [phase_at(phases, s, 100).iters for s in (0, 74, 75, 99)] == [1, 1, 3, 3]
    assert resized(torch.rand(2, 3, 32, 32), 0.5).shape[-2:] == (16, 16)
    assert resized(torch.rand(2, 3, 32, 32), 0.5, min_side=32).shape[-2:] == (32, 32)  # the default floor
    assert resized(torch.rand(2, 3, 224, 224), 0.5, min_side=32).shape[-2:] == (112, 112)
    assert SAATCurriculumConfig().min_side == 32
    with pytest.raises(ValueError, match="the last at 1.0"):
        SAATCurriculumConfig(phases=[CurriculumPhase(until=0.5, iters=1)])
    model, _, (x, _, _), _ = _setup()
    counter = PassCounter(model, 32)
    model(resized(x, 0.5))
    assert counter.passes == pytest.approx(6 / 4)  # half the side: a quarter of a full pass


def test_cyclic_lr_rises_to_its_peak_and_falls_to_zero():
    cfg = OptimConfig(name="sgd", lr=0.1, schedule="cyclic", cycle_peak=0.5)
    m = [lr_multiplier(cfg, s, 100, 10, 1.0) for s in range(100)]
    assert max(m) == pytest.approx(1.0, abs=0.011) and m.index(max(m)) in (49, 50)
    assert m[0] < 0.011 and m[-1] < 0.011
    assert all(a < b for a, b in zip(m[:49], m[1:50])) and all(a > b for a, b in zip(m[50:], m[51:]))


@pytest.mark.parametrize("name,per_sample", [("saat_fgsm", 3.0), ("saat_free", 8.0), ("saat_curriculum", None)])
def test_each_mode_trains_in_the_loop_and_records_its_cost(tiny_demo, tmp_path, name, per_sample):
    shards = tiny_demo[1]["shard_dir"]
    cfg = tiny_cfg(tmp_path, shards, f"{name}.epochs=2", f"{name}.batch_size=40", f"{name}.guard.probe_size=8"
                   if name != "saat_curriculum" else "saat_curriculum.min_side=8")  # the 16-px phase runs
    run_in_process(cfg, TRAIN)
    run_in_process(cfg, DEFENCE_STAGES[name])
    t = json.loads((tmp_path / name / "train.json").read_text())
    cost = t["cost"]
    phases = cfg.saat_curriculum.phases
    expected = per_sample or sum(  # each phase: (iters + 2) passes at scale^2 of a full image, over its steps
        (p.until - (phases[i - 1].until if i else 0)) * (p.iters + 2) * p.scale**2 for i, p in enumerate(phases))
    assert cost["passes_per_sample"] == pytest.approx(expected, rel=1e-6)
    assert cost["passes_per_image"] == pytest.approx(expected * 2, rel=1e-6)  # over the 2 epochs
    assert cost["seconds"] > 0
    if name != "saat_curriculum":  # the guard probed every epoch
        assert all({"probe_clean", "probe_pgd", "probe_single_step", "overfit"} <= set(h) for h in t["history"])


def test_free_saat_refuses_gradient_accumulation(tiny_demo, tmp_path):
    from saat_dist.config import ConfigError
    from saat_dist.data.source import DataSource
    from saat_dist.pipeline import check_layout

    cfg = tiny_cfg(tmp_path, tiny_demo[1]["shard_dir"], "distributed.grad_accum=2", "saat_free.batch_size=40")
    with pytest.raises(ConfigError, match="distributed.grad_accum: saat_free"):
        check_layout(cfg, DataSource.open(cfg.data.shard_dir), [DEFENCE_STAGES["saat_free"]])


class Linear(torch.nn.Module):
    """logits = W x + b on flattened images: its robustness is known (a bit
    flips under an L-inf budget eps iff eps x ||w_j||_1 exceeds its margin)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(b)

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def _collapsing_pair(n: int = 16, bits: int = 16, eps: float = 8 / 255):
    """(robust, collapsed, probe, bank): two linear models with the same
    logits on every probe image; the first keeps every bit's margin above
    eps x ||w_j||_1, the second adds a large weight orthogonal to the probe
    images, which no clean code sees and any attack exploits."""
    torch.manual_seed(1)
    x = torch.rand(n, 3, 8, 8)
    y = torch.zeros(n, 4)
    y[torch.arange(n), torch.arange(n) % 4] = 1
    index = torch.arange(n)
    d = x[0].numel()
    w = torch.randn(bits, d) * 0.01
    codes = torch.sign(torch.randn(4, bits))[y.argmax(1)]  # one code per label
    b = codes * 3.0 - (x.flatten(1) @ w.T).mean(0)  # margins ~3, against eps x ||w||_1 ~ 0.1
    q, _ = torch.linalg.qr(x.flatten(1).T)  # an orthonormal basis of the probe images' span
    p = torch.randn(bits, d)
    p = p - (p @ q) @ q.T  # orthogonal to every probe image
    robust = Linear(w, b)
    collapsed = Linear(w + 1000.0 * p / p.abs().sum(1, keepdim=True), b.clone())  # eps x 1000 ~ 31 >> 3
    bank = CodeBank(y, bits, index=index)
    bank.update(index, codes)
    return robust, collapsed, (x, y, index), bank, eps


def test_the_guard_fires_when_robustness_collapses_while_clean_codes_hold():
    from saat_dist.defences.overfit_guard import GuardConfig, OverfitGuard

    robust, collapsed, probe, bank, eps = _collapsing_pair()
    with torch.no_grad():  # the same clean logits on the probe: clean numbers cannot show the collapse
        assert torch.allclose(robust(probe[0]), collapsed(probe[0]), atol=1e-3)
    guard = OverfitGuard(GuardConfig(probe_size=16), lambda n: probe)
    before = guard.check(robust, bank, eps, 0, "saat_fgsm", 0)
    assert before["probe_pgd"] == before["probe_clean"] > 0.5 and before["overfit"] == 0.0  # no bit flips
    after = guard.check(collapsed, bank, eps, 0, "saat_fgsm", 1)
    assert after["probe_clean"] == before["probe_clean"] and after["probe_pgd"] < before["probe_pgd"] - 1.0
    assert after["overfit"] == 1.0 and guard.fired_epoch == 1 and guard.fallen_back
    again = OverfitGuard(GuardConfig(probe_size=16), lambda n: probe)
    again.load_state_dict(guard.state_dict())  # checkpointed: a resumed stage stays on multi-step
    assert again.fallen_back and again.fired_epoch == 1
    quiet = OverfitGuard(GuardConfig(probe_size=16, fallback=False), lambda n: probe)
    quiet.check(robust, bank, eps, 0, "s", 0)
    assert quiet.check(collapsed, bank, eps, 0, "s", 1)["overfit"] == 1.0 and not quiet.fallen_back


def test_after_the_guard_fires_the_stage_trains_multi_step(monkeypatch):
    from saat_dist.defences import DEFENCES
    from saat_dist.defences.base import StepContext
    from saat_dist.defences.overfit_guard import GuardConfig, OverfitGuard

    model, stepper, batch, bank = _setup()
    guard = OverfitGuard(GuardConfig(fallback_iters=5), lambda n: None)
    section = SAATFGSMConfig(eps=16 / 255)
    ctx = StepContext(model, stepper, bank, DPHLoss(), section, 0, "saat_fgsm", extras={"guard": guard})
    calls = _input_gradients(monkeypatch)
    DEFENCES["saat_fgsm"].step(ctx, batch, 0)
    assert len(calls) == 1
    guard.fallen_back = True
    DEFENCES["saat_fgsm"].step(ctx, batch, 1)
    assert len(calls) == 1 + 5  # the fallback: 5 PGD steps
