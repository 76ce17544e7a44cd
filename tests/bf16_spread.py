"""The bf16-vs-fp32 spread behind tests/test_deepspeed.py's BF16_REL: relative
difference of every epoch-mean loss part at seeds 0, 1, 2 (2 ranks, ZeRO 2, the
tiny config), one JSON line each. Run: DS_ACCELERATOR=cpu .venv/bin/python tests/bf16_spread.py"""

import json
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saat_dist.data.demo import build_demo
from tests.conftest import TINY
from tests.gloo import run_on_group
from tests.test_deepspeed import _stages, _tree, _copy_benign

def main():
    tmp = Path(tempfile.mkdtemp())
    summary = build_demo(tmp / "demo", TINY)
    shards = summary["shard_dir"]
    for seed in (0, 1, 2):
        root = tmp / f"s{seed}"
        bf16 = ("distributed.precision=bf16", "distributed.zero_stage=2", f"seed={seed}")
        first = run_on_group(_stages, 2, [("fp32", _tree(shards, f"seed={seed}"), ["train"])], shards, str(root))[0]
        _copy_benign(root, ["zero2", "bf16_saat"])
        runs = [("zero2", _tree(shards, "distributed.zero_stage=2", f"seed={seed}"), ["saat"]),
                ("bf16", _tree(shards, *bf16), ["train"]), ("bf16_saat", _tree(shards, *bf16), ["saat"])]
        r = {**first, **run_on_group(_stages, 2, runs, shards, str(root))[0]}
        for stage, a, b in (("train", ("fp32", "train"), ("bf16", "train")), ("saat", ("zero2", "saat"), ("bf16_saat", "saat"))):
            for ep, (x, y) in enumerate(zip(r[a]["info"]["history"], r[b]["info"]["history"])):
                print(json.dumps({"seed": seed, "stage": stage, "epoch": ep,
                                  **{k: round(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12), 6) for k in x}}), flush=True)


if __name__ == '__main__':
    main()
