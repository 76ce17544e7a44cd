"""The paper presets run: each configs/paper/*.yaml starts on the embedded
demo data with only data and size overrides (AlexNet at 224 px from random
weights, 2 Ray workers on the CPU, a few steps and attack iterations)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from saat_dist.cli import main
from saat_dist.data.demo import DemoSpec, build_demo

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.relative_to(ROOT) for p in ROOT.joinpath("configs", "paper").glob("*.yaml")
                 if p.name != "reference.yaml")

# sizes only: few items, one epoch, a few attack iterations, CPU workers, no weights file
SIZES = ["model.pretrained_path=null", "distributed.use_gpu=false", "device=cpu", "distributed.num_workers=2",
         "distributed.cpus_per_worker=1", "distributed.checkpoint_every=0", "data.loader_workers=0",
         "train.epochs=1", "saat.epochs=1", "cgat.epochs=1", "atrdh.epochs=1", "pgd_at.epochs=1",
         "experiment.bits=[16]", "experiment.num_queries=4", "attack.iters=2", "attack.hag.iters=2",
         "attack.sdha.iters=2", "attack.dhta.iters=2", "attack.p2p.iters=2", "attack.tha.iters=2",
         "attack.tha.pnet_steps=3", "attack.square.iters=3", "attack.transfer.iters=2", "attack.batch_size=2",
         "saat.iters=1", "cgat.iters=1", "atrdh.iters=1", "pgd_at.iters=1", "eval.batch_size=32",
         "eval.precision_at=[10]", "eval.top_k=50", "log_every_s=60", "metrics.linger_s=0"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """64 train / 8 query / 48 database mosaics, 12 train shards (2 workers divide them)."""
    out = tmp_path_factory.mktemp("paper_demo")
    return build_demo(out, DemoSpec(train=64, query=8, database=48, seed=5, shard_size=6))["shard_dir"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_paper_preset_starts_on_the_demo_data(preset, small_demo, tmp_path, caplog):
    out = tmp_path / "run"
    data = [f"data.shard_dir={small_demo}", "data.build_demo=false", f"output_dir={out}"]
    full = preset.name == "nus-wide.yaml"  # one preset through the whole protocol, the others through training
    command = "experiment" if full else "train"
    sets = data + SIZES + (["experiment.defences=[none,saat]"] if full else [])
    if preset.name == "nus-wide-large-batch.yaml":  # 64 of the demo's 64 images per step: 2x the reference's 32
        sets.append("train.batch_size=64")
    with caplog.at_level(logging.WARNING, logger="saat_dist"):
        assert main([command, "--config", str(preset), *[a for s in sets for a in ("--set", s)]]) == 0
    assert "alexnet starts from random weights" in caplog.text
    cell = out / "cells" / "dph-16" if full else out
    train = json.loads((cell / "benign" / "train.json").read_text())
    s = train["schedule"]
    # the reference's global batch whatever the worker count: 32 = 2 workers x 16
    assert (s["workers"], s["micro_batch"], s["steps_per_epoch"]) == (2, s["global_batch"] // 2, 64 // s["global_batch"])
    assert train["parameters_identical"]
    if preset.name == "nus-wide-large-batch.yaml":  # 2x the reference's batch, the lr x 2 by the linear rule
        assert s["global_batch"] == 64 and "linear scaling" in s["lr_rule"] and s["lr"] == pytest.approx(0.02)
    else:
        assert s["global_batch"] == 32 and s["lr"] == pytest.approx(0.01)
    if full:
        report = json.loads((out / "experiment.json").read_text())
        assert {row["defence"] for row in report["table2"]} == {"none", "saat"}
