"""Scale changes the speed, never the answer: an evaluation gives the same
numbers on 1, 2 and 3 workers (gloo process groups, no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from saat_dist.config import config_from_dict, load_config
from saat_dist.data.source import DataSource
from saat_dist.evaluation import evaluate_model
from saat_dist.models import build_hash_model
from saat_dist.robustness import evaluate_robustness
from tests.gloo import run_on_group

# every attack, a few iterations each, 16 queries in global batches of 4 (at 3 workers: 2 / 1 / 1 batches)
EVAL = ["experiment.num_queries=16", "eval.num_queries=16", "attack.batch_size=4", "attack.restarts=2",
        "attack.iters=4", "attack.hag.iters=6", "attack.sdha.iters=6", "attack.square.iters=20",
        "attack.transfer.iters=3", "attack.dhta.iters=6", "attack.p2p.iters=6", "attack.tha.pnet_steps=20",
        "attack.tha.iters=4", "attack.strong_queries=6", "experiment.eps_sweep=[0,0.03,0.0627451]",
        "model.bits=16", "model.width=16", "eval.batch_size=7"]


def _evaluate(rank, world, tree, shards, state):
    cfg = config_from_dict(tree)
    model = build_hash_model("small_cnn", 16, width=16)
    model.load_state_dict(state)
    source = DataSource.open(shards)
    robust = evaluate_robustness(cfg, model, source, torch.device("cpu"), "w", rank, world)
    run = evaluate_model(cfg, model, source, torch.device("cpu"), "w", strong=True, rank=rank, world=world)
    return robust, run


def _numbers(tree, prefix="") -> dict[str, float]:
    """Every number in a results tree, by path (timings left out)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k not in ("resources", "seconds_per_rank"):
                out.update(_numbers(v, f"{prefix}.{k}"))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{prefix}[{i}]"))
    elif isinstance(tree, bool) or tree is None or isinstance(tree, str):
        out[prefix] = tree
    elif isinstance(tree, (int, float)):
        out[prefix] = float(tree)
    return out


@pytest.mark.slow
def test_evaluation_is_the_same_on_1_2_and_3_workers(tiny_demo, trained_small):
    shards = tiny_demo[1]["shard_dir"]
    tree = load_config("configs/tiny.yaml", [f"data.shard_dir={shards}", *EVAL]).to_dict()
    state = trained_small[0].state_dict()
    results = {w: run_on_group(_evaluate, w, tree, shards, state)[0] for w in (1, 2, 3)}
    base = {k: _numbers(v) for k, v in zip(("robust", "run"), results[1])}
    assert base["robust"][".attacks.mainstay.map"] < base["robust"][".clean_map"]  # the attacks did something
    worst = 0.0
    for w in (2, 3):
        for name, res in zip(("robust", "run"), results[w]):
            got = _numbers(res)
            assert got.keys() == base[name].keys()
            for key, value in base[name].items():
                if isinstance(value, float):
                    worst = max(worst, abs(got[key] - value))
                    assert got[key] == pytest.approx(value, abs=1e-6), (w, name, key)
                else:
                    assert got[key] == value, (w, name, key)
    print(f"largest difference over every number at 2 and 3 workers: {worst}")
