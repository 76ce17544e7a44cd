"""Configs: every shipped file loads; bad input fails early, naming the key."""

from pathlib import Path

import pytest

from saat_dist.cli import main
from saat_dist.config import ConfigError, RunConfig, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_says_how_to_run(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first == f"# Run: saat-dist run --config configs/{path.name}"


def test_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "saat.eps=0.05", "model.pretrained_path=/w.pth",
                             "eval.precision_at=[5, 10]", "data.base_url=null"])
    assert cfg.train.epochs == 3 and cfg.saat.eps == 0.05 and cfg.eval.precision_at == [5, 10]
    assert cfg.model.pretrained_path == "/w.pth" and cfg.data.base_url is None


@pytest.mark.parametrize("override, message", [
    ("train.lr=0.1", r"unknown key 'train.lr' \(known keys here: \['batch_size', 'epochs', 'loss', 'optim'\]\)"),
    ("model.backbone=vgg13", r"model.backbone: 'vgg13' is not one of \['small_cnn', 'alexnet'"),
    ("train.loss=dtsh", r"train.loss: 'dtsh' is not one of \['dph', 'dpsh', 'hashnet', 'csq', 'dpn', 'hswd', 'ortho'\]"),
    ("model.bits=many", r"model.bits: expected an integer"),
    ("saat.eps=3", r"saat.eps: must be in \[0, 1\]"),
    ("saat.optim.milestones=[0.5, 2]", r"saat.optim.milestones: milestones are fractions"),
    ("data.build_demo=maybe", r"data.build_demo: expected true or false"),
    ("train.epochs", r"expected key=value"),
    ("attack.step_size=0", r"attack.step_size: must be in \(0, 1\]"),
    ("saat.step_size=-0.1", r"saat.step_size: must be in \(0, 1\]"),
    ("attack.eps=-1", r"attack.eps: must be in \[0, 1\]"),
    ("attack.iters=0", r"attack.iters: must be >= 1"),
    ("eval.top_k=0", r"eval.top_k: must be >= 1"),
    ("attack.batch_size=0", r"attack.batch_size: must be >= 1"),
    ("model.bits=4", r"model.bits: must be in \[8, 1024\]"),
    ("train.optim.milestones=[0]", r"train.optim.milestones: milestones are fractions"),
    ("distributed.cpus_per_worker=-1", r"distributed.cpus_per_worker: must be >= 0"),
    ("metrics.port=70000", r"metrics.port: must be in \[0, 65535\]"),
    ("saat.optim.momentum=1.5", r"saat.optim.momentum: must be in \[0, 1\)"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("override, message", [("saat.iters=0", "saat.iters: must be >= 1"),
                                               ("attack.step_size=0", "attack.step_size: must be in (0, 1]")])
def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys, override, message):
    import ray

    out = tmp_path / "run"
    ray_before = ray.is_initialized()
    code = main(["run", "--config", "configs/tiny.yaml", "--set", f"output_dir={out}", "--set", override])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"saat-dist: error: configs/tiny.yaml: {message}"
    assert not out.exists() and ray.is_initialized() == ray_before  # nothing started, nothing written


def test_options_without_effect_are_warned_about():
    cfg = load_config(None, ["distributed.num_workers=0", "distributed.bank_sync_every=4"])
    (warning,) = cfg.warnings()
    assert warning.startswith("distributed.bank_sync_every=4 has no effect with distributed.num_workers=0")
    assert load_config("configs/demo.yaml").warnings() == []
