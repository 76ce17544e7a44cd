"""``saat-dist certify`` as a stage and a command (issue 20): the same
certificates at 1 and 2 workers, the attack check at 0 violations, the
noise-trained defences, and the command's files."""

from __future__ import annotations

import json

import pytest
import torch

from saat_dist.config import load_config
from saat_dist.data.source import DataSource
from saat_dist.defences.base import StepContext
from saat_dist.defences.gaussian import GaussianConfig
from saat_dist.defences.gaussian import train_step as gaussian_step
from saat_dist.device import Place
from saat_dist.hashing import DPHLoss
from saat_dist.mainstay import CodeBank
from saat_dist.models import build_hash_model
from tests.gloo import run_on_group

# delta 0.1 lets 400 samples find a center (0.05 needs ~1,200): a few seconds per model
CERTIFY = ["certify.num_queries=6", "certify.query_batch=2", "certify.delta=0.1", "certify.n_center=400",
           "certify.n_certify=600", "certify.batch_size=600", "certify.radii=[0.05,0.1]", "certify.attack_queries=3",
           "certify.attack_iters=3", "certify.attack_samples=4", "model.bits=16", "model.width=8"]


def _cfg(shards: str, *extra: str):
    return load_config("configs/tiny.yaml", [f"data.shard_dir={shards}", "data.build_demo=false",
                                             "distributed.num_workers=0", *CERTIFY, *extra])


def _certify_on(rank: int, world: int, shards: str, model_file: str):
    from saat_dist.evaluation.certify_stage import certify_model
    from saat_dist.models.model_file import load_model

    cfg = _cfg(shards)
    model = load_model(cfg.model, cfg.seed, model_file, "cpu")
    return certify_model(cfg, model, DataSource.open(shards), Place(torch.device("cpu"), rank, world))


def test_gaussian_augmentation_trains_on_keyed_noise_of_its_sigma():
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", 16, width=8)
    x = torch.full((4, 3, 32, 32), 0.5)
    y = torch.eye(4)
    index = torch.arange(10, 14)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))

    class Stepper:
        def backward(self, loss):
            loss.backward()

        def step(self):
            pass

    ctx = StepContext(model, Stepper(), CodeBank(y, 16, index=index), DPHLoss(), GaussianConfig(sigma=0.3), 0,
                      "gaussian")
    gaussian_step(ctx, (x, y, index), 0)
    noise = seen[0] - x
    assert noise.std().item() == pytest.approx(0.3, rel=0.03) and abs(noise.mean().item()) < 0.01
    assert noise.min() < -0.5 and noise.max() > 0.5  # not clipped to [0, 1]
    seen.clear()
    gaussian_step(ctx, (x[[1, 0]], y[[1, 0]], index[[1, 0]]), 0)
    assert torch.equal(seen[0][0] - x[0], noise[1])  # keyed by item, not by place in the batch


@pytest.mark.slow  # a training stage, certificates, and a process group of 2
def test_the_certify_command_trains_what_is_missing_and_its_certificates_hold_at_any_worker_count(tiny_demo, tmp_path):
    from saat_dist.cli import main

    shards = tiny_demo[1]["shard_dir"]
    sets = [f"output_dir={tmp_path}", f"data.shard_dir={shards}", "data.build_demo=false", "distributed.num_workers=0",
            "train.epochs=1", "saat_noise.epochs=1", "saat_noise.iters=2", "certify.models=[none,saat_noise]",
            *CERTIFY]
    assert main(["certify", "--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((tmp_path / "certify_summary.json").read_text())
    assert set(summary["models"]) == {"none", "saat_noise"}
    assert (tmp_path / "saat_noise" / "model.pt").is_file() and (tmp_path / "plots" / "certified_map.pdf").is_file()
    md = (tmp_path / "certify.md").read_text()
    assert "| SAAT + noise |" in md and "| no defence |" in md
    one = json.loads((tmp_path / "benign" / "certify.json").read_text())
    assert one["queries"] == 6 and len(one["per_query_hamming_radius"]) == 6
    for row in one["radii"]:
        assert row["attack_check"]["violations"] == 0 and row["attack_check"]["attacked"] >= 1
        assert 0 <= row["certified_map"] <= one["smoothed_clean_map"]
        assert row["linf_equivalent"] == pytest.approx(row["radius_l2"] / (3 * 32 * 32) ** 0.5)
    small, large = one["radii"]  # a larger l2 radius certifies no more
    assert large["certified_map"] <= small["certified_map"]
    radii = torch.tensor([[float("inf") if v is None else v for v in row] for row in one["per_query_hamming_radius"]])
    assert bool((radii[:, 1] >= radii[:, 0]).all())
    # the same model on 2 workers: every draw keyed by the query, so the same certificates
    two = run_on_group(_certify_on, 2, shards, str(tmp_path / "benign" / "model.pt"))[0]
    drop = ("seconds", "seconds_per_query", "attack_seconds", "spec", "workers")
    assert {k: v for k, v in two.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    # a rerun with the same settings certifies nothing again
    before = (tmp_path / "benign" / "certify.json").stat().st_mtime_ns
    assert main(["certify", "--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]) == 0
    assert (tmp_path / "benign" / "certify.json").stat().st_mtime_ns == before
