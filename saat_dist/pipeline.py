"""The SAAT protocol end to end, one stage at a time.

prepare -> train (benign) -> evaluate benign -> saat -> evaluate saat -> report.
Every stage reads the previous stage's files from the run directory, so each
also runs alone (``saat-dist train | saat | evaluate | report``). With
``distributed.num_workers >= 1`` (the default) each stage is a Ray Train job
(``saat_dist.distributed.driver``); with 0 it runs in this process.

Run directory layout:
  config.yaml               the resolved configuration
  benign/model.pt           benign model (state_dict) and its code bank
  benign/eval.json          its evaluation
  saat/model.pt, saat/eval.json
  stages.json               wall time of each stage
  report.json, report.md, plots/*.png
  metrics/<stage>-rank<r>.json  where each worker serves Prometheus metrics
  ray/, ray_runs.json       Ray Train storage (checkpoints) and run names
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from saat_dist.checkpoint import load_state, save_state
from saat_dist.config import RunConfig, save_config
from saat_dist.data.demo import DemoSpec, build_demo
from saat_dist.data.shards import MANIFEST, load_manifest
from saat_dist.data.stream import load_labels
from saat_dist.device import select_device
from saat_dist.evaluation import EvalData, evaluate_model, random_map
from saat_dist.mainstay import CodeBank
from saat_dist.models import build_hash_model
from saat_dist.training.loop import fill_bank, train_benign, train_saat

log = logging.getLogger("saat_dist")


def ensure_data(cfg: RunConfig) -> dict:
    """The shard manifest; builds the demo data set first when asked and missing."""
    if cfg.data.base_url:  # shards and manifest are served elsewhere; nothing to build
        return load_manifest(cfg.data.shard_dir, cfg.data.base_url)
    shard_dir = Path(cfg.data.shard_dir)
    if not (shard_dir / MANIFEST).is_file() and cfg.data.build_demo:
        if shard_dir.name != "shards":
            raise ValueError(f"data.shard_dir: the demo is built as <dir>/shards, got {shard_dir}")
        d = cfg.data.demo
        log.info("building the embedded demo data set under %s", shard_dir.parent)
        summary = build_demo(shard_dir.parent, DemoSpec(
            train=d.train, query=d.query, database=d.database, min_digits=d.min_digits,
            max_digits=d.max_digits, grid=d.grid, seed=d.seed, shard_size=d.shard_size))
        log.info("demo data: %s, relevance fraction %.3f", summary["counts"], summary["relevance_fraction"])
    return load_manifest(shard_dir)


def _record_stage(run_dir: Path, stage: str, seconds: float) -> None:
    path = run_dir / "stages.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    times[stage] = round(seconds, 2)
    path.write_text(json.dumps(times, indent=1))


def _new_bank(cfg: RunConfig, manifest: dict) -> CodeBank:
    labels = load_labels(cfg.data.shard_dir, "train", cfg.data.base_url)
    set_labels = torch.tensor(manifest["label_sets"], dtype=torch.int64)
    return CodeBank(labels, cfg.model.bits, set_labels)


def _model(cfg: RunConfig, device):
    m = cfg.model
    torch.manual_seed(cfg.seed)
    return build_hash_model(m.backbone, m.bits, m.pretrained_path, m.hash_bn, m.width).to(device)


def _save_model(path: Path, cfg: RunConfig, model, bank: CodeBank, steps: int) -> None:
    save_state({"format": "saat-dist-model/1", "backbone": cfg.model.backbone, "bits": cfg.model.bits,
                "model": model.state_dict(), "bank": bank.state_dict(), "steps": steps}, path)


def _load_model(path: Path, cfg: RunConfig, device):
    state = load_state(path)
    if state.get("backbone") != cfg.model.backbone or state.get("bits") != cfg.model.bits:
        raise ValueError(f"{path}: saved for {state.get('backbone')}/{state.get('bits')} bits, "
                         f"the config asks for {cfg.model.backbone}/{cfg.model.bits}")
    model = _model(cfg, device)
    model.load_state_dict(state["model"])
    return model, state


def _distributed(cfg: RunConfig) -> bool:
    return cfg.distributed.num_workers > 0


def _finish_training(run_dir: Path, which: str, cfg: RunConfig, model, bank: CodeBank, result) -> None:
    _save_model(run_dir / which / "model.pt", cfg, model, bank, result.steps)
    (run_dir / which / "train.json").write_text(json.dumps({"history": result.history, "steps": result.steps}))


def stage_train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> None:
    manifest = ensure_data(cfg)
    t = time.monotonic()
    if _distributed(cfg):
        from saat_dist.distributed.driver import run_stage

        run_stage(cfg, "train", run_dir, resume)
    else:
        device = select_device(cfg.device)
        model, bank = _model(cfg, device), _new_bank(cfg, manifest)
        result = train_benign(cfg, model, bank, manifest["num_classes"], device)
        _finish_training(run_dir, "benign", cfg, model, bank, result)
    _record_stage(run_dir, "train", time.monotonic() - t)


def stage_saat(cfg: RunConfig, run_dir: Path, resume: bool = False) -> None:
    manifest = ensure_data(cfg)
    if not (run_dir / "benign" / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir / 'benign' / 'model.pt'}: run the benign 'train' stage first")
    t = time.monotonic()
    if _distributed(cfg):
        from saat_dist.distributed.driver import run_stage

        run_stage(cfg, "saat", run_dir, resume)
    else:
        device = select_device(cfg.device)
        model, _ = _load_model(run_dir / "benign" / "model.pt", cfg, device)
        bank = _new_bank(cfg, manifest)
        fill_bank(cfg, model, bank, device)
        result = train_saat(cfg, model, bank, manifest["num_classes"], device)
        _finish_training(run_dir, "saat", cfg, model, bank, result)
    _record_stage(run_dir, "saat", time.monotonic() - t)


def stage_evaluate(cfg: RunConfig, run_dir: Path, which: str) -> dict:
    """Evaluate ``which`` ('benign' or 'saat'); the SAAT model also gets the strong attack."""
    ensure_data(cfg)
    if not (run_dir / which / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir / which / 'model.pt'}: train the {which} model first")
    t = time.monotonic()
    if _distributed(cfg):
        from saat_dist.distributed.driver import run_stage

        run_stage(cfg, "evaluate", run_dir, which=which)
        _record_stage(run_dir, f"evaluate_{which}", time.monotonic() - t)
        return json.loads((run_dir / which / "eval.json").read_text())
    device = select_device(cfg.device)
    model, _ = _load_model(run_dir / which / "model.pt", cfg, device)
    data = EvalData(cfg)
    res = evaluate_model(cfg, model, data, device, which, strong=(which == "saat"))
    res["random_map"] = random_map(data, cfg.model.bits, cfg.eval.top_k, cfg.seed + 20)
    (run_dir / which / "eval.json").write_text(json.dumps(res, indent=1))
    _record_stage(run_dir, f"evaluate_{which}", time.monotonic() - t)
    return res


def prepare_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_all(cfg: RunConfig, resume: bool = False) -> dict:
    from saat_dist.report import write_report

    run_dir = prepare_run_dir(cfg)
    t0 = time.monotonic()
    t = time.monotonic()
    ensure_data(cfg)
    _record_stage(run_dir, "data", time.monotonic() - t)
    # --resume skips stages whose outputs exist and resumes an interrupted one
    if not (resume and (run_dir / "benign" / "model.pt").is_file()):
        stage_train(cfg, run_dir, resume)
    if not (resume and (run_dir / "benign" / "eval.json").is_file()):
        stage_evaluate(cfg, run_dir, "benign")
    if not (resume and (run_dir / "saat" / "model.pt").is_file()):
        stage_saat(cfg, run_dir, resume)
    stage_evaluate(cfg, run_dir, "saat")
    _record_stage(run_dir, "total", time.monotonic() - t0)
    return write_report(cfg, run_dir)
