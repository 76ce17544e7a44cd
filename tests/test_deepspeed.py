"""Real DeepSpeed engines on gloo process groups (no Ray needed: the loop and
the backend are the same in a Ray worker): the one loop under both backends,
SAAT under ZeRO 0, 2 and 3, bf16 against fp32, ATRDH's PrototypeNet split over
two ranks, and a corrupt sample skipped on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saat_dist.config import config_from_dict, load_config
from saat_dist.data.source import DataSource
from tests.gloo import run_on_group
from tests.test_scale_invariance import NoCheckpoints, _max_diff

pytestmark = pytest.mark.slow  # DeepSpeed engines in spawned processes


def _stages(rank, world, runs: list[tuple[str, dict, list[str]]], shards: str, root: str):
    """Train each (name, config tree, stage names) in turn on this group;
    rank 0 returns every run's parameters, histories and train.json."""
    from saat_dist.distributed.deepspeed_setup import DeepSpeedBackend
    from saat_dist.device import Place
    from saat_dist.evaluation import EvaluationStage, evaluate_stage
    from saat_dist.stages import TRAINING
    from saat_dist.training.trainer import Launch, NullMetrics, train_stage

    source = DataSource.open(shards)
    out = {}
    for name, tree, stages in runs:
        cfg = config_from_dict(tree)
        run_dir = Path(root) / name
        for stage_name in stages:
            if stage_name == "evaluate":
                evaluate_stage(cfg, EvaluationStage("saat", ("mainstay",), results="eval.json"), run_dir,
                               Place(torch.device("cpu"), rank, world), source)
                continue
            stage = TRAINING[stage_name]
            launch = Launch(rank, world, torch.device("cpu"),
                            lambda m, o, s, cfg=cfg: DeepSpeedBackend(m, o, cfg.distributed, s, world), NoCheckpoints(),
                            NullMetrics())
            train_stage(cfg, stage, run_dir, launch, source)
            if rank == 0:
                info = json.loads((run_dir / stage.out / "train.json").read_text())
                params = torch.load(run_dir / stage.out / "model.pt", weights_only=True)["model"]
                out[(name, stage_name)] = {"params": params, "info": info}
    return out


def _tree(shards: str, *extra: str) -> dict:
    return load_config("configs/tiny.yaml", [f"data.shard_dir={shards}", "metrics.enabled=false", "log_every_s=60",
                                             "train.epochs=2", "saat.epochs=1", "atrdh.epochs=1", "atrdh.iters=2",
                                             "atrdh.batch_size=32", *extra]).to_dict()


def _copy_benign(root: Path, names: list[str]) -> None:
    import shutil

    for name in names:
        (root / name / "benign").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "fp32" / "benign" / "model.pt", root / name / "benign" / "model.pt")


def test_the_one_loop_under_both_backends(tiny_demo, tmp_path):
    """The in-process torch optimizer and a one-process DeepSpeed engine end
    benign and SAAT training at the same parameters (1e-6; measured 0.0)."""
    from saat_dist.cli import main

    shards = tiny_demo[1]["shard_dir"]
    tree = _tree(shards, "train.epochs=1")
    ds = run_on_group(_stages, 1, [("ds", tree, ["train", "saat"])], shards, str(tmp_path))[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the group's processes
    try:
        for stage in ("train", "saat"):
            args = ["--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path / 'local'}",
                    "--set", f"data.shard_dir={shards}", "--set", "distributed.num_workers=0",
                    "--set", "metrics.enabled=false", "--set", "train.epochs=1", "--set", "saat.epochs=1"]
            assert main([stage, *args]) == 0
    finally:
        torch.set_num_threads(threads)
    for stage, folder in (("train", "benign"), ("saat", "saat")):
        local = torch.load(tmp_path / "local" / folder / "model.pt", weights_only=True)["model"]
        assert _max_diff(local, ds[("ds", stage)]["params"]) <= 1e-6, stage


@pytest.fixture(scope="module")
def engines(tiny_demo, tmp_path_factory):
    """On 2 DeepSpeed ranks: benign fp32 (ZeRO 0), then from that model SAAT
    at ZeRO 0, 2 and 3, ATRDH, and bf16 (ZeRO 2) benign, SAAT and evaluation."""
    shards = tiny_demo[1]["shard_dir"]
    root = tmp_path_factory.mktemp("engines")
    bf16 = ("distributed.precision=bf16", "distributed.zero_stage=2")
    first = run_on_group(_stages, 2, [("fp32", _tree(shards), ["train"])], shards, str(root))[0]
    _copy_benign(root, ["zero0", "zero2", "zero3", "atrdh", "bf16_saat"])
    runs = [(f"zero{z}", _tree(shards, f"distributed.zero_stage={z}"), ["saat"]) for z in (0, 2, 3)]
    runs += [("atrdh", _tree(shards), ["atrdh"]), ("bf16", _tree(shards, *bf16), ["train"]),
             ("bf16_saat", _tree(shards, *bf16), ["saat", "evaluate"])]
    return {**first, **run_on_group(_stages, 2, runs, shards, str(root))[0]}, root


def test_saat_under_zero_2_and_3_matches_zero_0(engines):
    """SAAT (the inner attack through the engine's module) under ZeRO 0, 2 and
    3 on 2 ranks: every rank ends with the same parameters, and ZeRO 2/3 end
    where ZeRO 0 does (stated tolerance 1e-5: they only reorder float sums;
    measured 0.0)."""
    runs, _ = engines
    for z in (0, 2, 3):
        info = runs[(f"zero{z}", "saat")]["info"]
        assert info["parameters_identical"] and len(info["parameter_checksums"]) == 2
        assert info["schedule"]["micro_batch"] == 16 and info["steps"] == 240 // 32
    for z in (2, 3):
        assert _max_diff(runs[("zero0", "saat")]["params"], runs[(f"zero{z}", "saat")]["params"]) <= 1e-5, z


def test_atrdh_prototypes_split_over_two_ranks_stay_one(engines):
    """ATRDH with each rank holding half the codes: the PrototypeNet's circle
    loss combines across ranks and both ranks end with the same model."""
    runs, _ = engines
    info = runs[("atrdh", "atrdh")]["info"]
    assert info["parameters_identical"] and info["steps"] == 240 // 32


# bf16 against fp32, relative difference of each epoch-mean loss (2 ranks,
# ZeRO 2, the tiny config), measured on this machine at seeds 0, 1, 2
# (`python tests/bf16_spread.py`): benign epoch 1 <= 8.8e-4, epoch 2
# <= 7.0e-3 (the two trajectories part as training goes on); SAAT (1 epoch)
# total <= 4.3e-3, hash <= 4.1e-4, adversarial term <= 4.0e-2 (the inner
# attack's signs amplify bf16's 8-bit mantissa), quantisation <= 7.2e-3,
# share of bits flipped <= 4.2e-2. Each tolerance is twice the largest of
# the three seeds.
BF16_REL = {("train", 0, "loss"): 2e-3, ("train", 0, "hash"): 2e-3, ("train", 1, "loss"): 1.4e-2,
            ("train", 1, "hash"): 1.4e-2, ("saat", 0, "loss"): 9e-3, ("saat", 0, "hash"): 9e-4,
            ("saat", 0, "adv"): 8e-2, ("saat", 0, "quant"): 1.5e-2, ("saat", 0, "bits_flipped"): 9e-2}


def test_bf16_trains_attacks_and_evaluates_close_to_fp32(engines):
    runs, root = engines
    rels = []
    for stage, fp32, bf16 in (("train", ("fp32", "train"), ("bf16", "train")),
                              ("saat", ("zero2", "saat"), ("bf16_saat", "saat"))):
        history = list(zip(runs[fp32]["info"]["history"], runs[bf16]["info"]["history"], strict=True))
        assert {(stage, epoch, part) for epoch, (a, _) in enumerate(history) for part in a} == \
            {key for key in BF16_REL if key[0] == stage}  # every part of every epoch has its tolerance
        for epoch, (a, b) in enumerate(history):
            for part in a:
                rel = abs(a[part] - b[part]) / max(abs(a[part]), 1e-12)
                print(f"bf16 vs fp32 {stage} epoch {epoch + 1} {part}: {a[part]:.6f} / {b[part]:.6f} (rel {rel:.2e})")
                assert rel <= BF16_REL[(stage, epoch, part)], (stage, epoch, part, a[part], b[part])
                rels.append(rel)
    assert max(rels) > 1e-5  # bf16 ran: fp32 and bf16 are not the same numbers
    res = json.loads((root / "bf16_saat" / "saat" / "eval.json").read_text())
    assert 0 < res["clean_map"] <= 1 and res["attacks"]["mainstay"]["perceptibility"]["linf"] <= 16 / 255 + 1e-6


def test_a_corrupt_sample_is_skipped_on_every_rank(tiny_demo, tmp_path):
    """data.skip_corrupt with an undecodable image in rank 1's shard: both
    ranks run every step, their parameters stay identical, the skip is counted."""
    import shutil

    from tests.test_stream import rewrite_sample

    shards = tmp_path / "shards"
    shutil.copytree(tiny_demo[1]["shard_dir"], shards)
    rewrite_sample(shards / "train-000001.tar", "00000025",
                   lambda f: {**f, **{e: b"not an image" for e in f if e != "json"}})
    tree = _tree(str(shards), "data.skip_corrupt=true")
    runs = run_on_group(_stages, 2, [("skips", tree, ["train"])], str(shards), str(tmp_path))[0]
    info = runs[("skips", "train")]["info"]
    assert info["steps"] == 2 * (240 // 32) and info["parameters_identical"]  # no rank ran dry or hung
    skipped = info["skipped_samples_per_rank"]
    assert skipped[0] == 0 and skipped[1] >= 1, skipped


ENGINE_WITHOUT_EXTENSIONS = """
import json, os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1] + "/pg", rank=0, world_size=1)
from saat_dist.config import load_config
from saat_dist.distributed.deepspeed_setup import build_engine
from saat_dist.training.trainer import Schedule
cfg = load_config("configs/tiny.yaml")
model = torch.nn.Linear(4, 2)
engine, _ = build_engine(model, cfg.train.optim, cfg.distributed, Schedule(8, 8, 1, 2, 4), 1)
loss = engine(torch.ones(8, 4)).sum()
engine.backward(loss)
engine.step()
import deepspeed.comm.comm as cdb
print(json.dumps({"shm_op": cdb.cdb.shm_comm_op is not None, "step": engine.global_steps,
                  "imported": sorted(m for m in ("mlflow", "torch._dynamo") if m in sys.modules)}))
"""


def test_an_engine_trains_without_compiling_deepspeeds_cpu_comm_extension(tmp_path):
    """DeepSpeed's CPU accelerator would compile its shared-memory comm op
    (45-65 s, g++ and ninja) for its inference all-reduce; training does not
    use it, so a fresh extension directory stays empty. The process, as a
    Ray worker, imports neither MLflow (DeepSpeed's autotuner would, 1.5
    CPU-s) nor torch._dynamo (torch's optimizers would, 2.3 CPU-s)."""
    import os
    import subprocess
    import sys

    ext = tmp_path / "torch_extensions"
    out = subprocess.run([sys.executable, "-c", ENGINE_WITHOUT_EXTENSIONS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                         env={**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext), "LOCAL_RANK": "0",
                              "RANK": "0", "WORLD_SIZE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"shm_op": False, "step": 1, "imported": []}
    assert not list(ext.rglob("*.so")) and "built successfully" not in out.stdout + out.stderr
