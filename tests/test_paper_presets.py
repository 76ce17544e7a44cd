"""The paper presets run: each configs/paper/*.yaml starts on the embedded
demo data with only data and size overrides (AlexNet at 224 px from random
weights, a few steps and attack iterations): every preset's benign training
on 2 DeepSpeed workers (one gloo process group, as in a Ray worker group),
and one preset through the whole protocol (`saat-dist experiment`, at 64 px)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from saat_dist.cli import main
from saat_dist.config import config_from_dict, load_config
from saat_dist.data.demo import DemoSpec, build_demo
from saat_dist.data.source import DataSource
from tests.gloo import run_on_group
from tests.test_scale_invariance import NoCheckpoints

pytestmark = pytest.mark.slow  # AlexNet at 224 px

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.relative_to(ROOT) for p in ROOT.joinpath("configs", "paper").glob("*.yaml")
                 if p.name != "reference.yaml")

# sizes only: few items, one epoch, a few attack iterations, CPU workers, no weights file
SIZES = ["model.pretrained_path=null", "distributed.use_gpu=false", "device=cpu", "distributed.num_workers=2",
         "distributed.cpus_per_worker=1", "distributed.checkpoint_every=0", "data.loader_workers=0",
         "train.epochs=1", "saat.epochs=1", "cgat.epochs=1", "atrdh.epochs=1", "pgd_at.epochs=1",
         "experiment.bits=[16]", "eval.num_queries=4", "attack.iters=2", "attack.hag.iters=2",
         "attack.sdha.iters=2", "attack.dhta.iters=2", "attack.p2p.iters=2", "attack.tha.iters=2",
         "attack.tha.pnet_steps=3", "attack.square.iters=3", "attack.transfer.iters=2", "attack.batch_size=2",
         "saat.iters=1", "cgat.iters=1", "atrdh.iters=1", "pgd_at.iters=1", "eval.batch_size=32",
         "eval.precision_at=[10]", "eval.top_k=50", "log_every_s=60", "metrics.enabled=false"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """64 train / 8 query / 48 database mosaics, 12 train shards (2 workers divide them)."""
    out = tmp_path_factory.mktemp("paper_demo")
    return build_demo(out, DemoSpec(train=64, query=8, database=48, seed=5, shard_size=6))["shard_dir"]


def preset_overrides(preset: Path, shards: str, out: Path) -> list[str]:
    sets = [f"data.shard_dir={shards}", "data.build_demo=false", f"output_dir={out}", *SIZES]
    if preset.name == "nus-wide-large-batch.yaml":  # 64 of the demo's 64 images per step: 2x the reference's 32
        sets.append("train.batch_size=64")
    return sets


def _benign(rank, world, trees: dict, shards: str):
    """Each preset's benign training on this group; rank 0 returns every train.json."""
    from saat_dist.distributed.deepspeed_setup import DeepSpeedBackend
    from saat_dist.stages import TRAIN
    from saat_dist.training.trainer import Launch, NullMetrics, train_stage

    source = DataSource.open(shards)
    out = {}
    for name, tree in trees.items():
        cfg = config_from_dict(tree)
        launch = Launch(rank, world, torch.device("cpu"),
                        lambda m, o, s, cfg=cfg: DeepSpeedBackend(m, o, cfg.distributed, s, world), NoCheckpoints(),
                        NullMetrics())
        train_stage(cfg, TRAIN, Path(cfg.output_dir), launch, source)
        if rank == 0:
            out[name] = json.loads((Path(cfg.output_dir) / "benign" / "train.json").read_text())
    return out


def test_every_paper_preset_trains_on_two_workers(small_demo, tmp_path, caplog):
    configs = {}
    with caplog.at_level(logging.WARNING, logger="saat_dist"):
        for preset in PRESETS:
            cfg = load_config(ROOT / preset, preset_overrides(preset, small_demo, tmp_path / preset.stem))
            assert any("alexnet starts from random weights" in w for w in cfg.warnings()), preset
            configs[preset.name] = cfg.to_dict()
    trained = run_on_group(_benign, 2, configs, small_demo)[0]
    assert set(trained) == {p.name for p in PRESETS}
    for name, train in trained.items():
        s = train["schedule"]
        # the reference's global batch whatever the worker count: 32 = 2 workers x 16
        assert (s["workers"], s["micro_batch"], s["steps_per_epoch"]) == (2, s["global_batch"] // 2,
                                                                           64 // s["global_batch"]), name
        assert train["parameters_identical"], name
        if name == "nus-wide-large-batch.yaml":  # 2x the reference's batch, the lr x 2 by the linear rule
            assert s["global_batch"] == 64 and "linear scaling" in s["lr_rule"] and s["lr"] == pytest.approx(0.02)
        else:
            assert s["global_batch"] == 32 and s["lr"] == pytest.approx(0.01), name


def test_a_paper_preset_runs_the_whole_protocol(small_demo, tmp_path, caplog):
    """configs/paper/nus-wide.yaml through `saat-dist experiment` (in this
    process: its stages are the same values a Ray worker runs), with AlexNet
    at 64 px (its adaptive pooling takes any size from 63 up; the test above
    trains every preset at its 224): a twelfth of the work.
    Table I's attacks of each kind (the mainstay attack, its targeted form,
    HAG, SDHA, THA); every other attack and the transfer examples run in the
    experiment tests (tests/test_experiment.py) on the tiny model."""
    preset = ROOT / "configs" / "paper" / "nus-wide.yaml"
    sets = [*preset_overrides(preset, small_demo, tmp_path / "run"), "distributed.num_workers=0",
            "experiment.defences=[none,saat]", "data.image_size=64",
            "experiment.attacks=[mainstay,mainstay_targeted,hag,sdha,tha]", "experiment.transfer=false"]
    with caplog.at_level(logging.WARNING, logger="saat_dist"):
        assert main(["experiment", "--config", str(preset), *[a for s in sets for a in ("--set", s)]]) == 0
    assert "alexnet starts from random weights" in caplog.text
    report = json.loads((tmp_path / "run" / "experiment.json").read_text())
    assert {row["defence"] for row in report["table2"]} == {"none", "saat"}
    assert {row["attack"] for row in report["table1"]} >= {"mainstay", "hag", "sdha", "tha"}
