"""The house's promise, kept by a test: a new defence is one new file in
``saat_dist/defences/`` plus its section in ``RunConfig``. The test copies
the package, adds exactly that (FGSM adversarial training from a random
start, Wong et al. 2020, written against the library's public pieces), and
runs the new stage through the one training loop and the one evaluation
pipeline in a fresh interpreter: nothing else in the package changes."""

from __future__ import annotations

import pytest

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEW_DEFENCE = '''"""FGSM-AT: one signed gradient step from a random start (Wong, Rice and
Kolter, ICLR 2020), on the benign hash loss."""

from dataclasses import dataclass

from saat_dist.attacks.mainstay_pgd import model_mode, pgd
from saat_dist.defences.base import AdvTrainConfig, Defence, StepContext, flipped, write_codes
from saat_dist.training.steps import hash_loss, hash_module


@dataclass
class FGSMATConfig(AdvTrainConfig):
    """FGSM-AT's section: the paper's step of 1.25 x eps, one iteration."""

    step_size: float = 1.25 * 8 / 255  # the paper's alpha = 1.25 eps
    iters: int = 1  # a single step


def train_step(ctx: StepContext, batch, step: int) -> dict:
    x, y, index = batch
    net = hash_module(ctx.model)
    net.alpha = 1.0
    s = ctx.section

    def ascend(codes):
        return -hash_loss(ctx.loss_fn, codes, y, ctx.bank)[0].expand(len(codes)) / len(codes)

    with model_mode(net, s.attack_mode):
        x_adv = pgd(net, x, ascend, eps=s.eps, step_size=s.step_size, iters=s.iters, random_start=True,
                    alpha_schedule=None, keys=ctx.keys(batch, step).child("restart", 0))
    u, u_adv = ctx.model(x), ctx.model(x_adv)
    write_codes(ctx.bank, None, index, u)
    loss = hash_loss(ctx.loss_fn, u_adv, y, ctx.bank)[0]
    ctx.stepper.backward(loss)
    ctx.stepper.step()
    return {"loss": loss.detach(), "bits_flipped": flipped(u, u_adv)}


DEFENCE = Defence(name="fgsm_at", label="FGSM-AT", config=FGSMATConfig, step=train_step, seed_offset=50, order=50)
'''

CONFIG_LINES = [
    ("from saat_dist.defences.pgd_at import PGDATConfig\n",
     "from saat_dist.defences.fgsm_at import FGSMATConfig\n"),
    ("    pgd_at: PGDATConfig = field(default_factory=PGDATConfig)",
     "    fgsm_at: FGSMATConfig = field(default_factory=FGSMATConfig)  # FGSM adversarial training\n"),
]

RUN = r'''
import json, sys
import torch
from saat_dist.config import load_config
from saat_dist.data.source import DataSource
from saat_dist.evaluation import EvaluationStage, evaluate_stage
from saat_dist.stages import TRAINING, model_folder
from saat_dist.training.backend import LocalBackend
from saat_dist.training.checkpointing import LocalCheckpointer
from saat_dist.training.trainer import Launch, NullMetrics, train_stage
from saat_dist.device import Place

out, shards = sys.argv[1], sys.argv[2]
cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", f"data.shard_dir={shards}", "data.build_demo=false",
                                        "distributed.num_workers=0", "metrics.enabled=false", "log_every_s=0",
                                        "train.epochs=1", "fgsm_at.epochs=1", "fgsm_at.batch_size=32",
                                        "experiment.defences=[none,fgsm_at]", "eval.num_queries=8"])
source = DataSource.open(shards)
for name in ("train", "fgsm_at"):
    stage = TRAINING[name]
    launch = Launch(0, 1, torch.device("cpu"), lambda m, o, s: LocalBackend(m, o, s),
                    LocalCheckpointer(f"{out}/{stage.out}/checkpoints", resume=False), NullMetrics())
    train_stage(cfg, stage, __import__("pathlib").Path(out), launch, source)
res = evaluate_stage(cfg, EvaluationStage("fgsm_at", ("mainstay",), results="eval.json"),
                     __import__("pathlib").Path(out), Place(), source)
info = json.load(open(f"{out}/{model_folder('fgsm_at')}/train.json"))
import saat_dist
print(json.dumps({"package": saat_dist.__file__, "steps": info["steps"],
                  "history": info["history"], "clean_map": res["clean_map"]}))
'''


@pytest.mark.slow
def test_a_new_defence_is_one_new_file_and_its_config_section(tiny_demo, tmp_path):
    pkg = tmp_path / "src" / "saat_dist"
    shutil.copytree(ROOT / "saat_dist", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "defences" / "fgsm_at.py").write_text(NEW_DEFENCE)
    config = (pkg / "config.py").read_text()
    for anchor, line in CONFIG_LINES:  # each line goes in just before its neighbour
        assert config.count(anchor) == 1
        config = config.replace(anchor, line + anchor, 1)
    (pkg / "config.py").write_text(config)

    # the whole diff against the package: one new file, two lines in config.py
    def changed(cmp: filecmp.dircmp, at: str = "") -> list[str]:
        files = [f"{at}{f}" for f in cmp.diff_files + cmp.left_only + cmp.right_only if f != "__pycache__"]
        return files + [f for name, sub in cmp.subdirs.items() for f in changed(sub, f"{at}{name}/")]

    assert sorted(changed(filecmp.dircmp(ROOT / "saat_dist", pkg))) == ["config.py", "defences/fgsm_at.py"]
    old, new = (ROOT / "saat_dist" / "config.py").read_text().splitlines(), config.splitlines()
    assert len(new) - len(old) == 2 and set(old) <= set(new)

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-P", "-c", RUN, str(tmp_path / "run"), tiny_demo[1]["shard_dir"]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["package"]).is_relative_to(tmp_path)  # the copy ran, not the checkout (python -P)
    assert got["steps"] == 240 // 32 and len(got["history"]) == 1
    assert got["history"][0]["bits_flipped"] > 0  # the new inner attack ran and moved codes
    assert 0.0 < got["clean_map"] <= 1.0
