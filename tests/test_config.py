"""Configs: every shipped file loads; bad input fails early, naming the key."""

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from saat_dist.cli import main
from saat_dist.config import (ConfigError, RunConfig, config_from_dict, config_json_schema, config_json_schema_text,
                              load_config, preset_path, presets, render_config)

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
    command = {"configs": "run", "certify": "certify"}.get(rel.parent.name, "experiment")
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
    # the --set item is named, not the file it overrides
    assert capsys.readouterr().err.strip() == f"saat-dist: error: --set {override}: {message}"
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


# --- pydantic v2 sections: N/255 budgets, one-line errors, schema, config show/check, presets ---

def test_budgets_take_n_over_255_in_set_and_in_files(tmp_path):
    cfg = load_config(None, ["attack.eps=16/255", "saat.step_size=2/255", "attack.dhta.eps=8/255",
                             "experiment.eps_sweep=[0, 4/255, 16/255]", "attack.transfer.step_size=0.5/255"])
    assert cfg.attack.eps == 16 / 255 == 0.06274509803921569 and cfg.saat.step_size == 2 / 255
    assert cfg.attack.dhta.eps == 8 / 255 and cfg.experiment.eps_sweep == [0.0, 4 / 255, 16 / 255]
    assert cfg.attack.transfer.step_size == 0.5 / 255
    path = tmp_path / "b.yaml"
    path.write_text("pgd_at: {eps: 4/255, step_size: 1/255}\ncgat:\n  eps: 12 / 255\n")
    cfg = load_config(path)
    assert (cfg.pgd_at.eps, cfg.pgd_at.step_size, cfg.cgat.eps) == (4 / 255, 1 / 255, 12 / 255)


@pytest.mark.parametrize("override, line", [
    ("attack.eps=16/0", "--set attack.eps=16/0: attack.eps: '16/0' divides by zero"),
    ("saat.eps=16//255", "--set saat.eps=16//255: saat.eps: expected a number or a fraction such as 16/255, "
                         "got '16//255'"),
    ("cgat.step_size=a/255", "--set cgat.step_size=a/255: cgat.step_size: expected a number or a fraction such as "
                             "16/255, got 'a/255'"),
    ("attack.eps=300/255", "--set attack.eps=300/255: attack.eps: must be in [0, 1]"),
    ("atrdh.step_size=0/255", "--set atrdh.step_size=0/255: atrdh.step_size: must be in (0, 1]"),
    ("experiment.eps_sweep=[0, 1/0]", "--set experiment.eps_sweep=[0, 1/0]: experiment.eps_sweep[1]: '1/0' "
                                      "divides by zero"),
])
def test_malformed_budgets_give_one_line_naming_the_key(override, line):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == line


def test_errors_name_the_file_else_the_set_item_and_the_dotted_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("saat: {eps: 1.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: saat.eps: must be in [0, 1]"
    path.write_text("attack:\n  tha: {pnet_batch: 0}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: attack.tha.pnet_batch: must be >= 1")):
        load_config(path)
    path.write_text("eval: {precision_at: [10, 0]}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: eval.precision_at[1]: must be >= 1")):
        load_config(path)
    with pytest.raises(ConfigError) as e:  # no file: the --set item that set it
        load_config(None, ["seed=1", "train.optim.lrr=1"])
    assert str(e.value).startswith("--set train.optim.lrr=1: unknown key 'train.optim.lrr' (known keys here: "
                                   "['base_batch', 'betas', 'cycle_peak', 'gamma', 'lr',")
    with pytest.raises(ConfigError) as e:  # a check across sections names its key
        load_config(None, ["distributed.num_workers=[1, 4]", "distributed.zero_stage=2"])
    assert str(e.value).startswith("--set distributed.num_workers=[1, 4]: distributed.num_workers: elastic [1, 4] "
                                   "needs distributed.zero_stage 0")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.batch_size=30", "distributed.num_workers=4"])  # the key was --set
    assert str(e.value).startswith("--set train.batch_size=30: train.batch_size: the global batch 30 must split "
                                   "evenly into 4 worker(s)")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["distributed.num_workers=3"])  # not this key: the defaults
    assert str(e.value).startswith("config: train.batch_size: the global batch 64 must split evenly into 3 worker(s)")
    with pytest.raises(ConfigError, match=r"^--set data.resize=16: data.resize: must be >= data.image_size \(32\)"):
        load_config(None, ["data.resize=16"])
    with pytest.raises(ConfigError, match=r"^--set device=cpu: device: is 'cpu' but distributed.use_gpu is true$"):
        load_config(None, ["distributed.use_gpu=true", "device=cpu"])
    with pytest.raises(ConfigError, match=r"^--set eval=3: eval: expected a mapping of \['top_k', 'num_queries'"):
        load_config(None, ["eval=3"])


def test_the_deprecated_key_is_copied_with_a_warning():
    cfg = load_config(None, ["experiment.num_queries=8"])
    assert (cfg.eval.num_queries, cfg.experiment.num_queries) == (8, None)
    assert cfg.warnings() == ["experiment.num_queries is deprecated: set eval.num_queries (copied there)"]
    with pytest.raises(ConfigError, match="experiment.num_queries \\(8\\) is deprecated and differs from"):
        load_config(None, ["experiment.num_queries=8", "eval.num_queries=4"])


def test_sections_stay_dataclasses_and_validate_on_construction():
    cfg = load_config("configs/tiny.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert dataclasses.replace(cfg.attack, restarts=1).restarts == 1
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        dataclasses.replace(cfg.attack, iters=0)
    tree = cfg.to_dict()
    tree["saat"]["eps"] = 2.0
    with pytest.raises(ConfigError, match=r"^saat.eps: must be in \[0, 1\]$"):
        config_from_dict(tree)
    assert cfg.distributed.worker_counts == [2] and not cfg.distributed.elastic
    elastic = load_config(None, ["distributed.num_workers=[1, 2]"]).distributed
    assert elastic.elastic and elastic.worker_counts == [1, 2] and not elastic.in_process


def test_shipped_configs_write_budgets_as_fractions():
    for path in CONFIGS:
        lines = [line for line in path.read_text().splitlines() if re.search(r"\b0\.0\d{8,}", line)]
        assert not lines, (path, lines)
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert (demo.attack.eps, demo.saat.eps, demo.saat.step_size) == (16 / 255, 16 / 255, 4 / 255)


def _walk_descriptions(obj, prefix=""):
    from saat_dist.config import _descriptions

    for name, text in _descriptions(type(obj)).items():
        yield f"{prefix}{name}", text
        if dataclasses.is_dataclass(getattr(obj, name)):
            yield from _walk_descriptions(getattr(obj, name), f"{prefix}{name}.")


def test_every_key_has_a_description():
    keys = dict(_walk_descriptions(RunConfig()))
    assert len(keys) > 200 and {"model.factory", "tracking.tensorboard", "attack.p2p.anchors"} <= set(keys)
    assert [k for k, text in keys.items() if not text] == []
    assert keys["train.optim.milestones"] == "fractions of all steps where lr is multiplied by gamma"
    assert keys["attack.p2p"] == "P2P: DHTA with 1 anchor code"
    assert keys["saat"].startswith("SAAT adversarial training (saat_dist.defences.saat). Defaults: the reference")


def test_the_schema_file_is_what_the_config_generates():
    assert (ROOT / "docs" / "config.schema.json").read_text() == config_json_schema_text()


def test_the_schema_accepts_the_shipped_configs_and_refuses_bad_keys():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(config_json_schema())
    for path in CONFIGS:
        tree = yaml.safe_load(path.read_text())
        assert list(validator.iter_errors(tree)) == [], path
    bad = {"saat": {"eps": "16/25x", "epochs": -1}, "model": {"factory": "no_colon"}, "train": {"lr": 0.1}}
    assert len(list(validator.iter_errors(bad))) == 4


@pytest.mark.parametrize("spec", ["my_models:build", "lab.nets.hashing:make_net", "pkg:Factory.build"])
def test_model_factory_takes_module_colon_function(spec):
    assert load_config(None, [f"model.factory={spec}"]).model.factory == spec


@pytest.mark.parametrize("spec", ["lab.nets", "lab.nets:a-b", ":build", "lab/nets:build", "lab.nets:build()",
                                  "1lab:build"])
def test_a_malformed_model_factory_is_refused(spec):
    with pytest.raises(ConfigError, match=re.escape(f"model.factory: expected 'package.module:function' (a dotted "
                                                    f"module path, a colon and a function name), got {spec!r}")):
        load_config(None, [f"model.factory={spec}"])


def test_the_tracking_section():
    t = load_config(None).tracking
    assert (t.tensorboard, t.mlflow_tracking_uri, t.mlflow_experiment) == (True, None, "saat-dist")
    cfg = load_config(None, ["tracking.tensorboard=false", "tracking.mlflow_tracking_uri=file:///tmp/mlruns",
                             "tracking.mlflow_experiment=paper"])
    assert (cfg.tracking.tensorboard, cfg.tracking.mlflow_tracking_uri) == (False, "file:///tmp/mlruns")
    assert cfg.warnings() == []
    assert load_config(None, ["tracking.mlflow_experiment=x"]).warnings() == [
        "tracking.mlflow_experiment has no effect without tracking.mlflow_tracking_uri"]
    with pytest.raises(ConfigError, match=r"unknown key 'tracking.wandb' \(known keys here: \['mlflow_experiment', "
                                          r"'mlflow_tracking_uri', 'tensorboard'\]\)"):
        load_config(None, ["tracking.wandb=true"])
    with pytest.raises(ConfigError, match="tracking.mlflow_experiment: must not be empty"):
        load_config(None, ["tracking.mlflow_experiment=''"])


def test_presets_resolve_to_the_shipped_files_and_refuse_paths():
    assert preset_path("paper/nus-wide") == (ROOT / "configs" / "paper" / "nus-wide.yaml").resolve()
    assert preset_path("demo.yaml") == (ROOT / "configs" / "demo.yaml").resolve()
    assert {"demo", "tiny", "paper/nus-wide", "experiments/demo"} <= set(presets())
    assert load_config(preset="tiny", overrides=["seed=3"]).to_dict() == load_config(
        ROOT / "configs" / "tiny.yaml", ["seed=3"]).to_dict()
    for name in ("../pyproject", "/etc/passwd", "paper/../demo", "./demo", "paper\\nus-wide", ""):
        with pytest.raises(ConfigError, match="no '..', no absolute path"):
            preset_path(name)
    with pytest.raises(ConfigError, match=r"--preset 'nope': no such preset \(shipped: .*paper/nus-wide"):
        preset_path("nope")
    with pytest.raises(ConfigError, match="not both"):
        load_config("configs/demo.yaml", preset="demo")


def test_presets_come_from_the_installed_package_when_there_is_one(tmp_path, monkeypatch):
    """After `pip install .` configs/ is the package saat_dist.configs."""
    import importlib

    import saat_dist

    shipped = tmp_path / "configs"  # a namespace package, as package-dir maps configs/ (no __init__.py)
    (shipped / "paper").mkdir(parents=True)
    (shipped / "paper" / "mine.yaml").write_text("seed: 7\nattack: {eps: 4/255}\n")
    monkeypatch.setattr(saat_dist, "__path__", [str(tmp_path), *saat_dist.__path__])
    monkeypatch.delitem(sys.modules, "saat_dist.configs", raising=False)
    importlib.invalidate_caches()
    try:
        assert preset_path("paper/mine") == (shipped / "paper" / "mine.yaml").resolve()
        cfg = load_config(preset="paper/mine")
        assert (cfg.seed, cfg.attack.eps) == (7, 4 / 255)
    finally:
        sys.modules.pop("saat_dist.configs", None)  # the next import finds the real one again


def test_config_show_prints_each_key_under_its_description_and_loads_back(tmp_path, capsys):
    assert main(["config", "show", "--preset", "paper/nus-wide", "--set", "attack.eps=4/255"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("# saat-dist config show: preset paper/nus-wide")
    assert lines[0].endswith("--set attack.eps=4/255")
    for i, line in enumerate(lines):  # every key line comes right under its comment
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), line
    assert "  eps: 4/255" in lines and "  eps_sweep: [0.0, 2/255, 4/255, 8/255, 16/255]" in lines
    assert "  # your own architecture: 'package.module:function' returning an nn.Module whose forward(x) gives" in lines
    shown = tmp_path / "shown.yaml"
    shown.write_text(text)
    want = load_config(preset="paper/nus-wide", overrides=["attack.eps=4/255"])
    assert load_config(shown) == want
    assert render_config(want) == "\n".join(lines[3:]) + "\n"  # the same text, less the header


def test_config_check_says_ok_with_warnings_or_gives_the_error(capsys):
    assert main(["config", "check", "--preset", "demo"]) == 0
    assert capsys.readouterr().out == f"ok: preset demo ({(ROOT / 'configs' / 'demo.yaml').resolve()})\n"
    assert main(["config", "check", "--config", "configs/tiny.yaml", "--set", "distributed.num_workers=0",
                 "--set", "distributed.bank_sync_every=4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "ok: configs/tiny.yaml"
    assert out[1].startswith("warning: distributed.bank_sync_every=4 has no effect with distributed.num_workers=0")
    assert main(["config", "check", "--config", "configs/tiny.yaml", "--set", "saat.eps=16/0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "saat-dist: error: --set saat.eps=16/0: saat.eps: '16/0' divides by zero\n"
    assert main(["config", "check", "--preset", "../../etc/passwd"]) == 2
    assert "no '..', no absolute path" in capsys.readouterr().err


def test_config_schema_prints_the_schema(capsys):
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_json_schema()


def test_a_bad_value_in_the_file_names_the_file_and_one_on_the_line_names_the_set(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("saat: {iters: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}: saat.iters: must be >= 1"):
        load_config(cfg, ["attack.iters=3"])
    with pytest.raises(ConfigError, match=r"^--set attack.eps=2: attack.eps: must be in \[0, 1\]"):
        load_config("configs/tiny.yaml", ["attack.eps=2"])


def test_config_check_builds_the_users_model_factory(capsys):
    from saat_dist.cli import main

    code = main(["config", "check", "--config", "configs/tiny.yaml", "--set", "model.factory=no_such_pkg.models:build"])
    err = capsys.readouterr().err
    assert code == 2 and "model.factory" in err and "no_such_pkg" in err


def test_the_readme_fault_tolerance_settings_are_the_cluster_configs_and_valid():
    """README's "Run on a cluster" block: every key a config key, its values
    the cluster config's (all but the elastic range), and the whole block
    valid on top of the cluster config."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- snippet: fault-tolerance -->\s*```yaml\n(.*?)```\s*<!-- /snippet -->", text, re.S)
    assert found, "README.md has no yaml block between <!-- snippet: fault-tolerance --> and <!-- /snippet -->"
    block = yaml.safe_load(found.group(1))
    sets = [f"resume={block['resume']}"] + [f"distributed.{k}={json.dumps(v)}" for k, v in block["distributed"].items()]
    cfg = load_config(ROOT / "configs" / "cluster-cpu.yaml", sets)
    shipped = load_config(ROOT / "configs" / "cluster-cpu.yaml")
    assert cfg.resume == shipped.resume == "auto"
    for key, value in block["distributed"].items():
        have = getattr(cfg.distributed, key)
        assert (list(have) if isinstance(have, tuple) else have) == value, key
        if key != "num_workers":
            assert getattr(shipped.distributed, key) == value, key
    assert cfg.distributed.preemption_notices and cfg.distributed.max_failures > 0
