#!/usr/bin/env bash
# GPU smoke test (< 5 min on a 1-GPU machine): the tiny config on 2 Ray
# workers sharing one GPU (0.5 GPU each), bf16, ZeRO-2, through every stage:
# NCCL for gradients and gloo for CPU-side collectives in one process group
# (cpu:gloo,cuda:nccl), channels_last convolutions, the streaming evaluation;
# then a small experiment (every defence and attack, the robustness stage and
# its checks) on the same GPU; last, the MFU of a SAAT step in bf16 (ResNet-50
# and AlexNet hash models at 224 px, batch 128: saat_dist.cost_model, written
# to OUT_DIR/mfu.json; PEAK_TFLOPS=... for a GPU other than H100/H200, 989).
#   bash launch/gpu-smoke.sh [OUT_DIR]
# Prints the report's numbers and the per-stage times; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-smoke}
bash launch/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU visible"; exit 1; }
export DS_ACCELERATOR=cuda
start=$(date +%s)
.venv/bin/saat-dist run --config configs/tiny.yaml \
  --set output_dir="$out" --set data.shard_dir="$out/data/shards" \
  --set device=auto --set distributed.use_gpu=true --set distributed.gpus_per_worker=0.5 \
  --set distributed.precision=bf16 --set distributed.zero_stage=2 \
  --set train.epochs=2 --set saat.epochs=2
echo "[gpu-smoke] wall $(( $(date +%s) - start )) s"
.venv/bin/python - "$out" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/report.json"))
for stage in ("benign", "saat"):
    print(stage, {k: round(r[stage][k], 4) for k in ("clean_map", "attacked_map", "targeted_tmap")})
print("stage seconds", r["stage_seconds"])
for which in ("benign", "saat"):
    t = json.load(open(f"{sys.argv[1]}/{which}/train.json"))
    assert t["parameters_identical"], f"{which}: ranks ended with different parameters"
PY
gpu=(--set device=auto --set distributed.use_gpu=true --set distributed.gpus_per_worker=0.5)
.venv/bin/saat-dist experiment --config configs/tiny.yaml "${gpu[@]}" \
  --set output_dir="$out/experiment" --set data.shard_dir="$out/data/shards" --set experiment.bits=[16] \
  --set eval.num_queries=16 --set attack.hag.iters=20 --set attack.sdha.iters=20 --set attack.square.iters=50 \
  --set attack.dhta.iters=20 --set attack.p2p.iters=20 --set attack.tha.pnet_steps=100 --set attack.transfer.iters=10 \
  --set cgat.epochs=1 --set atrdh.epochs=1 --set pgd_at.epochs=1
echo "[gpu-smoke] wall with the experiment $(( $(date +%s) - start )) s"
.venv/bin/python - "$out/experiment" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/experiment.json"))
print("table2", {(row["defence"], row["attack"]): round(row["map"], 3) for row in r["table2"]
                 if row["attack"] in ("none", "mainstay", "worst_case")})
assert not r["checks"]["nonfinite_codes"], r["check_details"]
print("[gpu-smoke] OK")
PY
echo "[gpu-smoke] MFU of a SAAT step (7 input-gradient PGD steps + 1 clean+adversarial update), bf16 autocast"
.venv/bin/python - "$out" <<'PY'
import json, os, sys
import torch
from saat_dist.cost_model import H200_BF16_DENSE_TFLOPS, mfu_report
peak = float(os.environ.get("PEAK_TFLOPS", H200_BF16_DENSE_TFLOPS))
r = mfu_report(("resnet50", "alexnet"), image_size=224, bits=64, batch=128, steps=10, device="cuda",
               dtype=torch.bfloat16, peak_tflops=peak)
open(f"{sys.argv[1]}/mfu.json", "w").write(json.dumps(r, indent=1))
for name, row in r["rows"].items():
    print(f"[gpu-smoke] {name}@{row['image_size']} batch {row['batch']} on {row['device_name']}: "
          f"{row['seconds_per_step'] * 1e3:.1f} ms/step, "
          f"{row['images_per_second']:.0f} images/s, {row['achieved_tflops']:.1f} TFLOPS, "
          f"MFU {row['mfu']:.3f} of {peak:g} TFLOPS")
    assert row["flops_per_step_counted"] == row["flops_per_step"], (name, row["flops_per_step_counted"])
print("[gpu-smoke] MFU OK")
PY
