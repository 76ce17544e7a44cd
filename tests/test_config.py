"""Configs: every shipped file loads; bad input fails early, naming the key."""

from pathlib import Path

import pytest

from saat_dist.cli import main
from saat_dist.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.joinpath("configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert names >= {"demo.yaml", "tiny.yaml", "experiments/demo.yaml", "paper/nus-wide.yaml",
                     "paper/flickr25k.yaml", "paper/ms-coco.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_loads_and_says_how_to_run(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    rel = path.relative_to(ROOT)
    command = "run" if rel.parent.name == "configs" else "experiment"
    assert path.read_text().splitlines()[0].startswith(f"# Run: saat-dist {command} --config {rel}")


@pytest.mark.parametrize("name", ["nus-wide", "flickr25k", "ms-coco"])
def test_paper_presets_hold_the_reference_settings(name):
    """The issue's list of the reference code's settings, for each data set."""
    cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.backbone, d.image_size, d.resize, m.hash_bn, m.hash_init) == ("alexnet", 224, 256, False, "reference")
    assert m.pretrained_path and not d.build_demo  # local ImageNet weights, the user's shards
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.eval.pr_points == "reference"
    assert (t.epochs, t.batch_size, t.optim.name, t.optim.lr, t.optim.momentum, t.optim.weight_decay) == (
        100, 32, "sgd", 0.01, 0.9, 5e-4)
    s = cfg.saat
    assert (s.epochs, s.batch_size, s.optim.name) == (20, 32, "sgd")
    assert s.step_size == pytest.approx(2 / 255)
    for section in ("saat", "cgat", "atrdh", "pgd_at"):
        c = getattr(cfg, section)
        assert (c.attack_mode, c.hash_bank, c.eps) == ("train", "continuous", pytest.approx(8 / 255)), section
    assert cfg.experiment.defences == ["none", "saat", "atrdh", "cgat", "pgd_at"]


def test_a_config_extends_its_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\nsaat: {epochs: 9, eps: 0.5}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nsaat: {eps: 0.25}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.seed, cfg.saat.epochs, cfg.saat.eps) == (3, 9, 0.25)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


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


def test_a_section_given_in_part_keeps_that_sections_defaults(tmp_path):
    """--set saat.optim.lr must not turn SAAT's SGD into the OptimConfig type's
    Adam, nor --set attack.p2p.iters P2P's single anchor into DHTA's nine."""
    cfg = load_config(None, ["saat.optim.lr=0.1", "attack.p2p.iters=5", "cgat.optim.momentum=0.5"])
    assert (cfg.saat.optim.name, cfg.saat.optim.lr, cfg.saat.optim.weight_decay) == ("sgd", 0.1, 1e-5)
    assert cfg.saat.optim.milestones == [0.5, 0.75]
    assert (cfg.attack.p2p.iters, cfg.attack.p2p.anchors, cfg.attack.dhta.anchors) == (5, 1, 9)
    assert (cfg.cgat.optim.name, cfg.cgat.optim.lr, cfg.cgat.optim.momentum) == ("sgd", 0.01, 0.5)
    path = tmp_path / "c.yaml"
    path.write_text("atrdh:\n  optim: {lr: 0.001}\n")
    atrdh = load_config(path).atrdh.optim
    assert (atrdh.name, atrdh.lr, atrdh.betas) == ("adam", 0.001, [0.5, 0.999])
    with pytest.raises(ConfigError, match="unknown key 'saat.optim.lrr'"):
        load_config(None, ["saat.optim.lrr=0.1"])
