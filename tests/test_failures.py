"""Failures lose nothing: a full disk during a checkpoint resumes from the
newest complete checkpoint and ends where an uninterrupted run ends; a
resume finds its run under the storage path. (A lost node, a preemption and
a killed driver and head on a 3-node Ray cluster, with `run --resume auto`:
tests/test_pipeline.py, against its 2-worker run.)"""

from __future__ import annotations

import contextlib
import json
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saat_dist.checkpoint import load_state
from saat_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]


def args(run: Path, shards: str, *extra: str) -> list[str]:
    out = ["--config", "configs/tiny.yaml", "--set", f"output_dir={run}", "--set", f"data.shard_dir={shards}",
           "--set", "data.build_demo=false", "--set", "metrics.enabled=false", "--set", "train.epochs=1"]
    for e in extra:
        out += ["--set", e]
    return out


def params(run: Path, which: str = "saat") -> dict:
    return torch.load(run / which / "model.pt", weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


IN_PROCESS = ("distributed.num_workers=0", "saat.epochs=2", "distributed.checkpoint_every=3")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_demo, tmp_path, monkeypatch, capsys):
    shards = tiny_demo[1]["shard_dir"]
    clean, run = tmp_path / "clean", tmp_path / "full"
    for r in (clean, run):
        assert main(["train", *args(r, shards, *IN_PROCESS)]) == 0
    assert main(["saat", *args(clean, shards, *IN_PROCESS)]) == 0

    real_fsync = os.fsync

    def fsync_until_the_disk_is_full(fd):
        if ".step-6.partial" in os.readlink(f"/proc/self/fd/{fd}"):  # the disk fills up at the step-6 checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_the_disk_is_full)
    assert main(["saat", *args(run, shards, *IN_PROCESS)]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"saat-dist: error: \S+/saat/checkpoints/\.step-6\.partial/model-optimizer\.pt: could not "
                        r"be written \(No space left on device\); the previous version, if any, is kept", err), err
    monkeypatch.setattr(os, "fsync", real_fsync)
    ckpts = run / "saat" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3"]  # no partial directory left behind
    assert load_state(ckpts / "step-3" / "rank-0.pt")["step"] == 3  # the previous checkpoint loads
    assert not (run / "saat" / "model.pt").exists()
    assert main(["saat", "--resume", *args(run, shards, *IN_PROCESS)]) == 0
    assert max_diff(params(clean), params(run)) <= 1e-6  # stated tolerance; measured 0.0


def _spawn(argv, log):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "saat_dist.cli", *argv], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def _killed_at_exit(argv, log):
    """A CLI driver in its own process group, SIGKILLed with the whole group
    when the block ends, whether the test got there or failed on the way."""
    proc = _spawn(argv, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)


def _wait_for(pred, timeout, what):
    """``pred()``'s first true value, polled every 0.3 s for ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_resume_finds_the_newest_run_of_this_directory_under_the_storage_path(tmp_path):
    """A head whose disk went with it has no ray_runs.json: --resume auto
    then takes the newest run of this run directory under the storage path
    that holds a checkpoint, never one of another directory (an experiment's
    other cell) and never one without a checkpoint; with none, a new run."""
    from saat_dist.config import load_config
    from saat_dist.distributed.driver import _run_name

    run_dir, storage = tmp_path / "run", tmp_path / "storage"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={run_dir}", f"distributed.storage_path={storage}"])
    run_dir.mkdir()
    fresh = _run_name(cfg, "saat", run_dir, resume=False)  # recorded, then the record is lost
    key = fresh.split("-")[2]
    (run_dir / "ray_runs.json").unlink()
    for name, ckpt in [(f"tiny-saat-{key}-20261201-100000", True), (f"tiny-saat-{key}-20261201-120000", True),
                       (f"tiny-saat-{key}-20261201-130000", False), ("tiny-saat-0ther000-20261201-140000", True),
                       (f"tiny-train-{key}-20261201-150000", True)]:
        (storage / name).mkdir(parents=True)
        if ckpt:
            (storage / name / "checkpoint_2026-12-01_12-00-00.000000").mkdir()
    assert _run_name(cfg, "saat", run_dir, resume=True) == f"tiny-saat-{key}-20261201-120000"
    assert json.loads((run_dir / "ray_runs.json").read_text())["saat"] == f"tiny-saat-{key}-20261201-120000"
    (run_dir / "ray_runs.json").unlink()
    assert _run_name(cfg, "evaluate", run_dir, resume=True).startswith(f"tiny-evaluate-{key}-")  # none: a new one


def test_a_restarted_chain_skips_only_the_stages_whose_outputs_are_there(tmp_path):
    """`saat-dist run` is one Ray job (train, evaluate_benign, saat,
    evaluate_saat); after a restart the worker skips the stages before the
    restored checkpoint's stage when they left their outputs, and runs them
    again when those are gone (a run directory lost, the storage path kept)."""
    from saat_dist.config import load_config
    from saat_dist.evaluation.results import RESULTS_FORMAT
    from saat_dist.pipeline import run_evaluation
    from saat_dist.runner import stage_done
    from saat_dist.stages import SAAT, TRAIN

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    evaluation = run_evaluation(cfg, "benign")
    assert not stage_done(TRAIN, tmp_path) and not stage_done(evaluation, tmp_path)
    (tmp_path / "benign").mkdir()
    (tmp_path / "benign" / "model.pt").write_bytes(b"")
    assert stage_done(TRAIN, tmp_path) and not stage_done(SAAT, tmp_path)
    results = tmp_path / "benign" / evaluation.results
    results.write_text(json.dumps({"format": RESULTS_FORMAT}))
    assert stage_done(evaluation, tmp_path)
    results.write_text(json.dumps({"format": "an older one"}))  # results of an older format are evaluated again
    assert not stage_done(evaluation, tmp_path)


def test_stage_times_add_up_over_a_restarted_stage_and_a_launch_starts_them_afresh(tmp_path):
    from saat_dist.runner import clear_stages, record_stage

    record_stage(tmp_path, "train", 5.0)
    record_stage(tmp_path, "saat", 7.0)
    clear_stages(tmp_path, ["saat"])  # a launch that runs SAAT again
    record_stage(tmp_path, "saat", 3.0, add=True)  # its first attempt, stopped by a lost node
    record_stage(tmp_path, "saat", 4.5, add=True)  # the attempt that finished
    assert json.loads((tmp_path / "stages.json").read_text()) == {"train": 5.0, "saat": 7.5}


def _deadline_watch(deadline_in: float, keep_s: float):
    from saat_dist.training.trainer import Launch, Notice, PreemptionWatch

    notice = Notice("a node drains", time.time() + deadline_in, keep_s)
    watch = PreemptionWatch(Launch(0, 1, torch.device("cpu"), None, None, notice=lambda: notice), 1, "saat")
    assert watch.why_checkpoint(1, 10) == "preemption notice"  # at once
    watch.step_s, watch.checkpoint_s = 0.1, 0.2  # as last measured: 3 steps and 2 checkpoints = 0.7 s
    return watch


@pytest.mark.parametrize("keep_s", [0.0, 4.0])
def test_the_deadline_checkpoint_leaves_the_launcher_time_to_keep_it(keep_s):
    """The last checkpoint before a preemption deadline comes three steps,
    two checkpoints, the launcher's time to keep it (Ray Train: two polls of
    its controller; measured, a checkpoint written 1.1 s before the deadline
    was on storage but a restart restored the one before) and 1 s before it."""
    margin = 0.7 + keep_s + 1.0
    early = _deadline_watch(margin + 1.0, keep_s)
    assert early.why_checkpoint(2, 10) is None  # trains on
    late = _deadline_watch(margin - 0.5, keep_s)
    assert late.why_checkpoint(2, 10) == "preemption deadline"
    assert late.why_checkpoint(3, 10) is None  # one final checkpoint


def test_the_keep_time_is_two_of_ray_trains_report_polls():
    from ray.train.v2._internal import constants

    from saat_dist.distributed.preemption import REPORT_POLL_DEFAULT_S, REPORT_POLL_ENV, report_keep_s

    # the names and default are Ray's own (copied, not imported: the import costs a second)
    assert (REPORT_POLL_ENV, REPORT_POLL_DEFAULT_S) == (constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
                                                       constants.DEFAULT_HEALTH_CHECK_INTERVAL_S)
    assert report_keep_s({}) == 4.0
    assert report_keep_s({REPORT_POLL_ENV: "0.5"}) == 1.0
    with pytest.raises(ValueError, match="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S='2s' is not a number"):
        report_keep_s({REPORT_POLL_ENV: "2s"})
