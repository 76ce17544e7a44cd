"""Library use: a plain ``forward(x)`` module of hash logits works with every
attack, every defence's step and the evaluation, exactly as the built-in
hash model does; ``evaluate_robustness`` (and the README's snippet that
shows it); ``model.factory``; ``evaluate --model-file`` and its checks of
an untrusted state_dict."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import saat_dist
from saat_dist.attacks import (GENERATORS, hag_attack, pgd_attack, sdha_attack, square_attack, target_code_attack,
                               transfer_attack, transfer_codes)
from saat_dist.checkpoint import CheckpointError
from saat_dist.cli import main
from saat_dist.config import ConfigError, load_config
from saat_dist.defences.atrdh import ATRDHConfig, atrdh_step
from saat_dist.defences.cgat import CgATConfig, cgat_step
from saat_dist.defences.pgd_at import PGDATConfig, pgd_at_step
from saat_dist.defences.saat import SAATConfig, saat_step
from saat_dist.hashing import DPHLoss
from saat_dist.mainstay import CodeBank
from saat_dist.models import HashAdapter, as_hash_model, build_hash_model
from saat_dist.models.factory import FactoryError, resolve_factory
from saat_dist.models.model_file import build_model, load_weights_file
from saat_dist.training import TorchStepper

ROOT = Path(__file__).resolve().parents[1]
EPS = 8 / 255


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LogitsOnly(nn.Module):
    """A user's module: ``forward(x)`` returns the hash logits, nothing else
    (here a built-in model's, so every number can be compared with it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(x)


def _pair(seed: int = 0, bits: int = 8):
    """A hash model and the same weights behind a plain forward(x)."""
    torch.manual_seed(seed)
    model = build_hash_model("small_cnn", bits, width=8)
    return model, LogitsOnly(copy.deepcopy(model))


def test_the_adapter_gives_a_plain_module_the_hash_model_interface():
    model, plain = _pair()
    model.eval(), plain.eval()
    assert as_hash_model(model) is model  # the built-in interface is used as it is
    adapted = as_hash_model(plain)
    assert isinstance(adapted, HashAdapter) and adapted.net is plain
    assert as_hash_model(adapted) is adapted
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(adapted(x), model(x)) and torch.equal(adapted(x, alpha=0.3), model(x, alpha=0.3))
    assert torch.equal(adapted.logits(x), model.logits(x))
    assert adapted.training is False  # starts in the module's own mode
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        as_hash_model(lambda x: x)
    with pytest.raises(ValueError, match="returns 8 columns, model.bits is 16"):
        as_hash_model(plain, bits=16)(x)
    with pytest.raises(ValueError, match=r"must return B x K hash logits .* got \(4, 8, 1\)"):
        as_hash_model(nn.Unflatten(1, (8, 1)))(torch.rand(4, 8))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_attack_gives_a_plain_module_the_built_in_models_examples(mode):
    """Bit for bit: the adapter computes what HashModel computes, and the
    module comes back in the mode it was in."""
    model, plain = _pair()
    model.train(mode == "train"), plain.train(mode == "train")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    guide = torch.sign(torch.randn(4, 8, generator=g))
    pool, pool_lab = torch.sign(torch.randn(20, 8, generator=g)), (torch.rand(20, 3, generator=g) < 0.5).float()
    y = (torch.rand(4, 3, generator=g) < 0.5).float()
    attacks = {
        "pgd": lambda m: pgd_attack(m, x, guide, eps=EPS, step_size=2 / 255, iters=3, restarts=2,
                                    generator=torch.Generator().manual_seed(1)),
        "targeted": lambda m: target_code_attack(m, x, guide, eps=EPS, step_size=2 / 255, iters=3),
        "hag": lambda m: hag_attack(m, x, eps=EPS, iters=3),
        "sdha": lambda m: sdha_attack(m, x, y, pool, pool_lab, eps=EPS, iters=3),
        "square": lambda m: square_attack(m, x, guide, eps=EPS, iters=10, generator=torch.Generator().manual_seed(1)),
        **{name: (lambda m, n=name: transfer_attack(n, m, x, guide, eps=EPS, iters=2,
                                                   generator=torch.Generator().manual_seed(1))) for name in GENERATORS},
    }
    for name, attack in attacks.items():
        want, got = attack(model), attack(plain)
        assert torch.equal(got, want), name
        assert float((got - x).abs().max()) <= EPS + 1e-6 and not torch.equal(got, x), name
        assert plain.training is (mode == "train") and plain.inner.training is (mode == "train"), name
    codes = transfer_codes({"plain": plain, "model": model}, x)
    assert torch.equal(codes["plain"], codes["model"])


@pytest.mark.parametrize("name", ["saat", "cgat", "pgd_at", "atrdh"])
def test_every_defence_step_trains_a_plain_module_as_the_built_in_model(name):
    from saat_dist.attacks import PrototypeTrainer

    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(64, 4, generator=g) < 0.4).float()
    codes = torch.randint(0, 2, (64, 8), generator=g).float() * 2 - 1
    x = torch.rand(16, 3, 16, 16, generator=g)
    batch = (x, labels[:16], torch.arange(16))
    step, section = {"saat": (saat_step, SAATConfig), "cgat": (cgat_step, CgATConfig),
                     "pgd_at": (pgd_at_step, PGDATConfig), "atrdh": (atrdh_step, ATRDHConfig)}[name]
    settings = section(eps=EPS, step_size=2 / 255, iters=2)
    outs, weights = [], []
    for which in (0, 1):
        model, plain = _pair()
        net = model if which == 0 else plain
        bank = CodeBank(labels, 8)
        bank.update(torch.arange(64), codes)
        stepper = TorchStepper(torch.optim.SGD(net.parameters(), lr=0.05))
        extra = (PrototypeTrainer(4, 8, bank.set_labels, total_steps=10, seed=0, device="cpu", lr=1e-3),) \
            if name == "atrdh" else ()
        outs.append(step(net, stepper, batch, bank, DPHLoss(), settings, 0, torch.Generator().manual_seed(2), *extra))
        weights.append((model if which == 0 else plain.inner).state_dict())
        assert net.training  # trained in train mode, as the step found it
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert float(outs[1]["bits_flipped"]) >= 0 and torch.isfinite(outs[1]["loss"])


def _structured(n: int, classes: int = 4, size: int = 16, seed: int = 0):
    """Images whose class is visible (a class pattern plus noise) and one-hot labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.eye(classes)[torch.randint(0, classes, (n,), generator=g)]
    pattern = labels @ torch.rand(classes, 3 * size * size, generator=g)
    return (0.5 * torch.rand(n, 3, size, size, generator=g) + 0.5 * pattern.view(n, 3, size, size)), labels


def test_evaluate_robustness_on_tensors_matches_for_a_plain_module_and_echoes_the_settings():
    model, plain = _pair(bits=16)
    images, labels = _structured(64)
    query, database = (images[:16], labels[:16]), (images[16:], labels[16:])
    kw = dict(eps=4 / 255, iters=5, device="cpu", overrides=["eval.top_k=40", "attack.strong_queries=8"])
    res = saat_dist.evaluate_robustness(plain, query, database, **kw)
    ref = saat_dist.evaluate_robustness(model, query, database, **kw)
    assert res["eps"] == 4 / 255 and res["bits"] == 16 and res["queries"] == 16 and res["top_k"] == 40
    assert list(res["attacks"]) == ["mainstay", "mainstay_targeted", "mainstay_strong"]
    assert res["attacks"]["mainstay"]["iters"] == 5 and res["attacks"]["mainstay"]["restarts"] == 1
    assert res["attacks"]["mainstay_strong"]["queries"] == 8
    assert all(a["eps"] == 4 / 255 for a in res["attacks"].values())
    assert res["worst_case"]["map"] <= min(res["clean_map"], res["attacks"]["mainstay"]["map"])
    assert set(res["checks"]) >= {"zero_perturbation", "nonfinite_codes", "zero_input_gradient"}
    assert res["eps_sweep"]["map"][0] == res["clean_map"]
    for key in ("clean_map", "theory_map", "random_map"):
        assert res[key] == ref[key], key
    assert {k: v["map"] for k, v in res["attacks"].items()} == {k: v["map"] for k, v in ref["attacks"].items()}
    # class indices are one-hot labels; a list of attacks runs as the experiment runs it (attack.restarts)
    by_index = saat_dist.evaluate_robustness(plain, (query[0], query[1].argmax(1)),
                                             (database[0], database[1].argmax(1)), **kw, attacks=["mainstay"],
                                             sweep=False)
    assert by_index["clean_map"] == res["clean_map"] and list(by_index["attacks"]) == ["mainstay"]
    assert by_index["attacks"]["mainstay"]["restarts"] == 3 and "eps_sweep" not in by_index


def test_evaluate_robustness_refuses_bad_input_naming_the_argument():
    _, plain = _pair()
    images, labels = _structured(8)
    with pytest.raises(ValueError, match=r"query: float images must lie in \[0, 1\]"):
        saat_dist.evaluate_robustness(plain, (images * 2, labels), (images, labels))
    with pytest.raises(ValueError, match="database: labels must be N x C"):
        saat_dist.evaluate_robustness(plain, (images, labels), (images, labels[:3]))
    with pytest.raises(ValueError, match="database: .* is needed"):
        saat_dist.evaluate_robustness(plain, (images, labels))
    with pytest.raises(ConfigError, match="attack.eps"):
        saat_dist.evaluate_robustness(plain, (images, labels), (images, labels), eps=2.0)
    with pytest.raises(ValueError, match=r"attacks: unknown attack\(s\) \['hagg'\]; choose from bim, "):
        saat_dist.evaluate_robustness(plain, (images, labels), (images, labels), attacks=["mainstay", "hagg"])
    with pytest.raises(ValueError, match=r"model: forward\(x\) returns 4 hash logits per image"):
        saat_dist.evaluate_robustness(nn.Sequential(nn.Flatten(), nn.LazyLinear(4)), (images, labels),
                                      (images, labels))


def test_one_attack_named_as_a_string_is_that_attack():
    from saat_dist.evaluation.robustness import _attack_names

    assert _attack_names("hag") == ("hag",) and _attack_names(["hag", "sdha"]) == ("hag", "sdha")
    assert _attack_names("paper")[0] == "mainstay" and len(_attack_names("paper")) > 5
    assert _attack_names(None) == ("mainstay", "mainstay_targeted", "mainstay_strong")


def test_evaluate_robustness_on_a_shard_directory(tiny_demo):
    out, _ = tiny_demo
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", 16, width=8)
    res = saat_dist.evaluate_robustness(LogitsOnly(model), out / "shards", eps=EPS, iters=3, sweep=False,
                                        overrides=["eval.num_queries=12", "attack.strong_queries=4", "eval.top_k=100"])
    assert res["queries"] == 12 and res["eps"] == EPS and "eps_sweep" not in res
    assert res["checks"]["map_not_falling_with_eps"] is None
    assert 0 < res["worst_case"]["map"] <= res["clean_map"]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- snippet: library -->\s*```python\n(.*?)```\s*<!-- /snippet -->", text, re.S)
    assert found, "README.md has no python block between <!-- snippet: library --> and <!-- /snippet -->"
    return found.group(1)


def test_the_readme_snippet_runs_and_returns_the_numbers_it_prints(capsys):
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 15
    scope: dict = {}
    exec(compile(code, "README.md:library", "exec"), scope)
    res = scope["res"]
    assert res["eps"] == 8 / 255 and res["bits"] == 16 and res["queries"] == 32
    assert res["attacks"]["mainstay"]["iters"] == 20 and res["attacks"]["mainstay"]["eps"] == 8 / 255
    assert res["random_map"] < res["clean_map"]  # the images show their class: the codes carry it
    assert res["worst_case"]["map"] <= res["attacks"]["mainstay"]["map"] <= res["clean_map"]
    assert res["worst_case"]["attacks"] == ["mainstay", "mainstay_targeted", "mainstay_strong"]
    assert res["checks"]["nonfinite_codes"] is False and res["checks"]["zero_input_gradient"] is False
    assert f"clean mAP {res['clean_map']:.3f}" in capsys.readouterr().out


# ---------------------------------------------------------------- model.factory
def tiny_hasher(bits: int, width: int = 8) -> nn.Module:
    """A factory of the contract: bits (and width) from the model section."""
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, bits))


def small_cnn_logits(bits: int, width: int) -> nn.Module:
    """The built-in small CNN and a hash layer, as a plain logits module."""
    from saat_dist.models.backbones import SmallCNN

    return nn.Sequential(SmallCNN(width), nn.Linear(4 * width, bits, bias=False), nn.BatchNorm1d(bits))


def eight_bits() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(8))


def not_a_module(bits: int):
    return "a string"


def failing(bits: int) -> nn.Module:
    raise RuntimeError("no weights here")


def _factory_config(spec: str, *overrides: str):
    return load_config(None, [f"model.factory={spec}", *overrides])


def test_a_factory_builds_the_users_module_as_a_hash_model():
    cfg = _factory_config("tests.test_library:tiny_hasher", "model.bits=16", "model.width=4")
    model = build_model(cfg.model, 0, "cpu", image_size=32)
    assert isinstance(model, HashAdapter) and model.bits == 16
    assert model.net[0].out_channels == 4  # width reached the factory
    again = build_model(cfg.model, 0, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        codes = model(torch.rand(3, 3, 32, 32))
    assert codes.shape == (3, 16) and float(codes.abs().max()) < 1


def test_a_factory_model_trains_with_saat_through_the_cli(tmp_path, tiny_demo):
    """The trainer, the SAAT step and the model files with a plain logits module."""
    spec = "tests.test_library:small_cnn_logits"
    args = _tiny_args(tmp_path, tiny_demo[0] / "shards", "--set", f"model.factory={spec}", "--set", "train.epochs=1")
    assert main(["train", *args]) == 0 and main(["saat", *args]) == 0
    run = tmp_path / "run"
    benign, saat = (torch.load(run / f / "model.pt", weights_only=True) for f in ("benign", "saat"))
    assert saat["factory"] == spec and set(saat["model"]) == {f"net.{k}" for k in small_cnn_logits(16, 8).state_dict()}
    assert any(not torch.equal(benign["model"][k], saat["model"][k]) for k in saat["model"])
    history = json.loads((run / "saat" / "train.json").read_text())["history"]
    assert history[-1]["bits_flipped"] > 0 and history[-1]["adv"] < 0  # the inner attack moved the codes


@pytest.mark.parametrize("spec, message", [
    ("tests.test_library:eight_bits", r"model.factory: .*eight_bits.*8 columns, model.bits is 32"),
    ("tests.test_library:not_a_module", r"model.factory: .* returned a str, not a torch.nn.Module"),
    ("tests.test_library:failing", r"model.factory: .* raised RuntimeError: no weights here"),
    ("tests.test_library:nothing", r"model.factory: module 'tests.test_library' has no 'nothing'"),
    ("tests.no_such_module:f", r"model.factory: cannot import 'tests.no_such_module'"),
])
def test_a_factory_that_does_not_fit_is_one_error_naming_the_key(spec, message):
    cfg = _factory_config(spec)
    with pytest.raises(FactoryError, match=message):
        build_model(cfg.model, 0, "cpu", image_size=32)


def test_the_cli_refuses_a_factory_that_does_not_fit_before_any_work(tmp_path, capsys):
    code = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
                 "--set", "model.factory=tests.test_library:eight_bits"])
    err = capsys.readouterr().err
    assert code == 2 and "model.factory" in err and "8 columns, model.bits is 16" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_factory_spec_without_a_function_is_refused_by_the_config_and_the_library():
    with pytest.raises(ConfigError, match="model.factory"):
        _factory_config("tests.test_library")
    with pytest.raises(FactoryError, match="model.factory: 'tests.test_library' is not of the form"):
        resolve_factory("tests.test_library")


# ---------------------------------------------------------------- evaluate --model-file
def _tiny_args(tmp_path: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
            "--set", f"data.shard_dir={shards}", "--set", "data.build_demo=false", "--set", "distributed.num_workers=0",
            "--set", "metrics.enabled=false", "--set", "eval.num_queries=8", "--set", "log_every_s=0", *extra]


def _user_weights(tmp_path: Path, **change) -> Path:
    torch.manual_seed(5)
    state = build_hash_model("small_cnn", 16, width=8).state_dict()  # tiny.yaml's model
    state.update(change)
    path = tmp_path / "mine.pt"
    torch.save(state, path)
    return path


def test_evaluate_model_file_evaluates_the_users_weights(tmp_path, tiny_demo, capsys):
    from saat_dist.data.source import DataSource
    from saat_dist.metrics import mean_average_precision
    from saat_dist.training.encode import encode

    shards = tiny_demo[0] / "shards"
    path = _user_weights(tmp_path)
    assert main(["evaluate", "--model-file", str(path), *_tiny_args(tmp_path, shards)]) == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads((tmp_path / "run" / "model_file" / "eval.json").read_text())
    assert printed["clean_map"] == res["clean_map"] and printed["results"].endswith("model_file/eval.json")
    assert set(res["attacks"]) == {"mainstay", "mainstay_targeted", "mainstay_strong"}
    assert json.loads((tmp_path / "run" / "model_file" / "source.json").read_text())["path"] == str(path.resolve())
    # the clean mAP is that of the file's weights
    model = build_hash_model("small_cnn", 16, width=8)
    model.load_state_dict(torch.load(path, weights_only=True))
    source = DataSource.open(shards)
    q, q_lab, _ = source.read_items("test", list(range(8)), 32)
    db = [b for b in source.batches("database", 32, 1000)]
    db_img, db_lab = torch.cat([b[0] for b in db]), torch.cat([b[1] for b in db])
    order = torch.argsort(torch.cat([b[2] for b in db]))
    want = mean_average_precision(encode(model, q, "cpu"), encode(model, db_img[order], "cpu"), q_lab, db_lab[order], 100)
    assert res["clean_map"] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("content, message", [
    ({"backbone.features.0.0.weight": torch.zeros(8, 3, 3, 3) + float("nan")}, "backbone.features.0.0.weight: holds NaN"),
    ({"backbone.features.0.0.weight": torch.zeros(8, 3, 5, 5)}, r"backbone.features.0.0.weight: shape \(8, 3, 5, 5\)"),
    ({"head.weight": torch.zeros(2)}, "head.weight: not a key of the configured model"),
    ({"hash_layer.weight": [1.0, 2.0]}, "hash_layer.weight: expected a tensor, found list"),
    ({3: torch.zeros(1)}, "key 3 is a int"),
])
def test_a_model_file_that_does_not_fit_names_the_file_and_the_first_bad_key(tmp_path, content, message):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: {message}"):
        load_weights_file(cfg.model, 0, path, "cpu")


def test_a_model_file_is_untrusted_input(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    partial = tmp_path / "partial.pt"
    state = build_hash_model("small_cnn", 16, width=8).state_dict()
    state.pop("hash_bn.running_var")
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(partial))}: hash_bn.running_var: missing"):
        load_weights_file(cfg.model, 0, partial, "cpu")
    pickled = tmp_path / "pickled.pt"
    torch.save({"hash_layer.weight": torch.zeros(16, 128), "how": Path("/")}, pickled)  # an object, not weights
    with pytest.raises(CheckpointError, match=f"{re.escape(str(pickled))}: not a loadable state file"):
        load_weights_file(cfg.model, 0, pickled, "cpu")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="expected a dict of tensors, found list"):
        load_weights_file(cfg.model, 0, listed, "cpu")
    # wrapped in {"state_dict": ...} (as many trainers save it): accepted
    wrapped = tmp_path / "wrapped.pt"
    full = build_hash_model("small_cnn", 16, width=8).state_dict()
    torch.save({"state_dict": full}, wrapped)
    loaded = load_weights_file(cfg.model, 0, wrapped, "cpu")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())


def test_a_factory_models_file_holds_the_users_own_keys(tmp_path):
    cfg = _factory_config("tests.test_library:tiny_hasher", "model.bits=16", "model.width=8")
    torch.manual_seed(3)
    mine = tiny_hasher(16, width=8)
    path = tmp_path / "mine.pt"
    torch.save(mine.state_dict(), path)
    model = load_weights_file(cfg.model, 0, path, "cpu")
    assert isinstance(model, HashAdapter)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.logits(x), mine(x))


def test_evaluate_model_file_refuses_a_bad_file_with_exit_2_before_any_work(tmp_path, tiny_demo, capsys):
    path = _user_weights(tmp_path, **{"hash_layer.weight": torch.zeros(16, 3)})
    assert main(["evaluate", "--model-file", str(path), *_tiny_args(tmp_path, tiny_demo[0] / "shards")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: hash_layer.weight: shape (16, 3), the configured model has (16, 32)" in err
    assert not (tmp_path / "run").exists()
