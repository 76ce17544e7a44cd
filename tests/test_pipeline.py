"""The whole protocol through the CLI on the tiny config, on a Ray cluster
of 3 nodes on this machine (a head and 2 worker nodes, one training worker
on each), the shards read over HTTP and no shard directory shared; the
stages alone; then that run's SAAT stage again through a lost node, a
preemption and a lost head, and once more elastic, to the uninterrupted
run's parameters."""

import contextlib
import io
import json
import re
import shutil
import sys
import time

import pytest
import torch

from saat_dist.cli import main
from tests.conftest import fresh_driver, slowed, two_worker_nodes
from tests.test_failures import _killed_at_exit, _wait_for, max_diff, params
from tests.test_stream import serving

REPORT_KEYS = {"random_map", "benign", "saat", "stage_seconds", "plots", "ranks"}
STAGE_KEYS = {"clean_map", "attacked_map", "targeted_tmap", "theory_map", "theory_tmap", "pr_curve",
              "precision_at", "perceptibility"}


# SAAT long enough (144 steps) for the failure test to lose a node, preempt one
# (10 s of training on to its deadline) and lose the head in one stage; failures
# retried. The cluster configs' settings: one worker per node where it can, resume auto.
SAAT_OVERRIDES = ["saat.epochs=12", "saat.batch_size=16", "distributed.max_failures=2",
                  "distributed.placement_strategy=SPREAD", "resume=auto", "distributed.preemption_poll_s=0.5"]
# The runs that lose nodes checkpoint every 3 steps (a restart has a recent checkpoint
# to go on from); the module's run, their uninterrupted reference, at epoch ends (12
# Ray reports instead of 48): the checkpoints do not move the parameters (measured 0.0).
FREQUENT_CHECKPOINTS = "distributed.checkpoint_every=3"


def _args(run, shard_dir, base_url=None, *extra) -> list[str]:
    sets = [f"output_dir={run}", f"data.shard_dir={shard_dir}", *SAAT_OVERRIDES, *extra]
    if base_url:
        sets.append(f"data.base_url={base_url}")
    return ["--config", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, local_cluster):
    """`saat-dist run` on the 3-node cluster. The demo data set is built on
    first use (as `run` does without data.base_url) and then served over
    HTTP; the run's data.shard_dir names a directory that does not exist."""
    from saat_dist.config import load_config
    from saat_dist.pipeline import ensure_data

    tmp = tmp_path_factory.mktemp("tiny_run")
    fresh_driver()  # the run joins with its own job environment, whichever module ran before
    ensure_data(load_config("configs/tiny.yaml", [f"data.shard_dir={tmp / 'data' / 'shards'}"]))
    with serving(tmp / "data" / "shards") as url:
        args = _args(tmp / "run", tmp / "no-shared-shards", url)
        nodes = {local_cluster.nodes[n]["node_id"] for n in local_cluster.workers}
        console = io.StringIO()  # what the user sees: printed lines and the workers' lines Ray forwards
        with (contextlib.redirect_stdout(_Tee(console, sys.stdout)),
              contextlib.redirect_stderr(_Tee(console, sys.stderr))):
            assert main(["run", "--address", local_cluster.address, *args]) == 0
        (tmp / "console.txt").write_text(console.getvalue())
        yield tmp, args, nodes


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


# lines of a successful run that would read as trouble or as noise to its user
NOISE = re.compile(r"core_worker\.cc|Traceback|\bERROR\b|\d E \d|^E\d{4}|No CUDA runtime|built successfully|"
                   r"TrainingReport\(|Checkpoint successfully created|Token authentication")


@pytest.mark.slow
def test_a_successful_run_prints_its_progress_and_a_summary_only(tiny_run):
    tmp, _, _ = tiny_run
    lines = (tmp / "console.txt").read_text().splitlines()
    assert [line for line in lines if NOISE.search(line)] == []
    text = "\n".join(lines)
    assert "clean mAP" in text and f"report: {tmp / 'run' / 'report.md'}" in text and "eps 16/255" in text
    print(f"console of the tiny run: {len(lines)} lines")
    assert len(lines) <= 60


@pytest.mark.slow
def test_run_writes_a_complete_report(tiny_run):
    tmp, _, nodes = tiny_run
    run = tmp / "run"
    report = json.loads((run / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    for stage in ("benign", "saat"):
        assert STAGE_KEYS <= set(report[stage])
        for key in ("clean_map", "attacked_map", "targeted_tmap"):
            assert 0 <= report[stage][key] <= 1
        assert report[stage]["perceptibility"]["linf"] <= 16 / 255 + 1e-6
    assert "attacked_map_strong" in report["saat"] and report["saat"]["strong_check"]["queries"] == 8
    assert 0 < report["random_map"] < 1
    assert set(report["stage_seconds"]) >= {"train", "evaluate_benign", "saat", "evaluate_saat", "total"}
    for png in report["plots"]:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run / "report.md").read_text()
    assert "| clean mAP |" in md and "plots/pr_curves.png" in md
    assert "plots/loss_curves.png" in report["plots"] and "](plots/loss_curves.png)" in md
    assert all((run / pdf).is_file() for pdf in report["plots_pdf"]) and len(report["leaderboard"]) == 2
    assert (run / "config.yaml").is_file()
    # TensorBoard: one event file per stage, rank 0's, equal to train.json's epoch losses
    from saat_dist.monitoring.tracking import read_scalars

    for stage, folder in (("train", "benign"), ("saat", "saat")):
        assert len(list((run / "tensorboard" / stage).glob("events.out.tfevents.*"))) == 1, stage
        history = json.loads((run / folder / "train.json").read_text())["history"]
        epoch_loss = [v for _, v in read_scalars(run / "tensorboard" / stage)["epoch/loss"]]
        assert epoch_loss == pytest.approx([h["loss"] for h in history], rel=1e-6), stage
    assert len(list((run / "tensorboard").glob("evaluate*/events.out.tfevents.*"))) == 2
    # the demo data set was built on first use, through `data convert`
    assert (tmp / "data" / "list" / "train_img.txt").is_file()
    assert (tmp / "data" / "shards" / "manifest.json").is_file()
    assert not (tmp / "no-shared-shards").exists()  # the workers read every shard over HTTP
    # one rank on each worker node, recorded by train.json, the results and the report
    for stage in ("train_benign", "evaluate_benign", "train_saat", "evaluate_saat"):
        ranks = report["ranks"][stage]
        assert [r["rank"] for r in ranks] == [0, 1], stage
        assert {r["node_id"] for r in ranks} == nodes, stage
        assert all(r["host"] and r["pid"] > 0 for r in ranks), stage
    assert json.loads((run / "saat" / "train.json").read_text())["ranks"] == report["ranks"]["train_saat"]
    assert "(2 node(s))" in md


@pytest.mark.slow
def test_checkpoints_are_state_dicts(tiny_run):
    import torch

    tmp, _, _ = tiny_run
    state = torch.load(tmp / "run" / "saat" / "model.pt", weights_only=True)
    assert state["format"] == "saat-dist-model/1" and state["bits"] == 16
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert set(state) == {"format", "backbone", "bits", "model", "steps"}  # a model file holds the model only
    # Ray Train checkpoints: DeepSpeed state + each rank's train state (bank codes are +-1 after SAAT).
    # One Ray run for the whole `run` (one worker group); each checkpoint names its stage
    from ray.train import Checkpoint

    (ray_run,) = (tmp / "run" / "ray").glob("tiny-run-*")
    kept = sorted(p for p in ray_run.glob("checkpoint_*") if p.is_dir())  # names carry the time
    stages = [Checkpoint.from_directory(p).get_metadata()["stage"] for p in kept]
    assert stages and set(stages) == {"saat"}, stages  # the newest (num_to_keep) are SAAT's
    ckpt = kept[-1]
    for rank in (0, 1):
        train_state = torch.load(ckpt / f"rank-{rank}.pt", weights_only=True)
        assert set(train_state["bank"]["bank"]["codes"].unique().tolist()) <= {-1.0, 1.0}
        assert train_state["step"] == state["steps"]


@pytest.mark.slow
def test_stages_run_alone_from_the_run_directory(tiny_run, capsys):
    """`evaluate` then `report` on the finished run, here in this process
    (one rank, one thread as a Ray worker) instead of 2 Ray workers: the same
    seed and model give the same numbers at any worker count (1e-6; measured 0.0)."""
    tmp, args, _ = tiny_run
    run = tmp / "run"
    before = json.loads((run / "report.json").read_text())
    (run / "report.json").unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["evaluate", "--which", "benign", *args, "--set", "distributed.num_workers=0"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["report", *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [f"evaluate: done; wrote {run / 'benign' / 'eval.json'}",
                            f"report: done; wrote {run / 'report.md'}, {run / 'report.json'}"]
    after = json.loads((run / "report.json").read_text())
    for key in ("clean_map", "attacked_map", "targeted_tmap"):
        assert after["benign"][key] == pytest.approx(before["benign"][key], abs=1e-6), key


def test_report_needs_evaluations(tmp_path, capsys):
    assert main(["report", "--config", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}"]) == 2
    assert "run the 'benign' evaluation" in capsys.readouterr().err


@pytest.mark.slow
def test_data_commands(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path / "d"), "--train", "24", "--query", "8",
                 "--database", "24", "--shard-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"train": 24, "test": 8, "database": 24}
    assert main(["data", "convert", "--root", str(tmp_path / "d" / "list"), "--out", str(tmp_path / "s"),
                 "--shard-size", "5", "--shard-multiple", "2"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["train"] == {"count": 24, "shards": 6}
    # a list-format error is a clean exit 2 naming the file and line
    lbl = tmp_path / "d" / "list" / "train_label.txt"
    lines = lbl.read_text().splitlines()
    lines[3] = lines[3] + " 0"
    lbl.write_text("\n".join(lines) + "\n")
    assert main(["data", "convert", "--root", str(tmp_path / "d" / "list"), "--out", str(tmp_path / "s2")]) == 2
    assert "train_label.txt:4: 11 label values, expected 10" in capsys.readouterr().err


@pytest.mark.slow
def test_single_process_run_without_ray(tmp_path, tiny_demo):
    """distributed.num_workers=0: every stage in this process (debugging path)."""
    run = tmp_path / "run"
    assert main(["run", "--config", "configs/tiny.yaml", "--set", f"output_dir={run}",
                 "--set", f"data.shard_dir={tiny_demo[1]['shard_dir']}", "--set", "distributed.num_workers=0",
                 "--set", "train.epochs=1", "--set", "saat.epochs=1"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert 0 <= report["saat"]["attacked_map"] <= 1
    assert not (run / "ray").exists()


class _SaatAgain:
    """The tiny run's SAAT stage again in ``run`` from the run's benign model,
    with what the tests watch: Ray's checkpoints, the ranks' processes (from
    their metrics target files) and the driver's log."""

    def __init__(self, tiny_run, run, log, *extra, done=("model.pt", "eval.json")):
        tmp, args, _ = tiny_run
        self.run, self.log, self.reference = run, log, tmp / "run"
        base_url = next(a.split("=", 1)[1] for a in args if a.startswith("data.base_url="))
        self.args = _args(run, tmp / "no-shared-shards", base_url, FREQUENT_CHECKPOINTS, *extra)
        (run / "benign").mkdir(parents=True)
        for name in done:  # the benign stages that are done: `run --resume auto` skips them
            shutil.copy(tmp / "run" / "benign" / name, run / "benign" / name)

    def checkpoints(self):  # SAAT's: the benign stages were copied, not run (`run` names its Ray run "run")
        return sorted(p for p in (self.run / "ray").glob("*/checkpoint_*") if p.is_dir())

    def newest(self) -> str:  # Ray keeps the newest few: names carry the time
        return max((p.name for p in self.checkpoints()), default="")

    def pid(self, rank: int) -> int | None:  # a worker removes its target file when it stops
        from saat_dist.monitoring.prometheus import read_target_file

        with contextlib.suppress(FileNotFoundError):
            return read_target_file(self.run / "metrics" / f"saat-rank{rank}.json")["pid"]

    def ended(self) -> bool:
        return (self.run / "saat" / "model.pt").exists()

    def first_after(self, name: str) -> int:
        """The step of the first checkpoint newer than ``name``: above 3 (a fresh
        start's first), a new worker group restored a checkpoint."""
        first = min(p for p in self.checkpoints() if p.name > name)
        return _wait_for(lambda: _step(first), 60, f"rank 0's state in {first}")


# Ray's controller registers a reported checkpoint when it next polls the
# workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 0.1 s in the tests)
REGISTERED_S = 1.0


@pytest.mark.slow
def test_a_lost_node_a_preemption_and_a_lost_head(tiny_run, local_cluster, tmp_path):
    """The run's SAAT stage again, from its benign model, on the 3-node
    cluster with a spawned driver (`saat-dist run`, resume: auto: it skips
    the benign training, whose model is there, and runs the benign
    evaluation, SAAT and SAAT's evaluation as one job, one worker group):
    1. worker node 2 SIGKILLed after two checkpoints (a lost node): the
       group waits for capacity; with a node added back both ranks restore
       the newest checkpoint, SAAT's, and skip the benign evaluation that
       had finished before it;
    2. SIGTERM to worker node 1 (a preemption with a 10 s grace): it asks Ray
       to drain it, every rank checkpoints at its next step, within the
       grace, trains on and checkpoints again just before the deadline; a
       replacement node joins, the victim goes at its deadline and the group
       restores that last checkpoint (no step redone);
    3. the driver SIGKILLed and the head taken down with every node, and
       the run directory's record of its Ray runs deleted: on a new cluster
       the same command finds the run under the storage path and finishes
       from its newest checkpoint.
    The parameters equal the uninterrupted run's (1e-6; measured 0.0)."""
    # every checkpoint kept: the preemption's may otherwise rotate away before the test reads it
    cluster = local_cluster
    again = _SaatAgain(tiny_run, tmp_path / "faults", tmp_path / "faults.log", "distributed.num_to_keep=1000",
                       "distributed.preemption_notices=true", done=("model.pt",))
    with _killed_at_exit(["run", "--address", cluster.address, *again.args], again.log) as proc:
        going = lambda: proc.poll() is None and not again.ended()  # noqa: E731

        def new_group(before, what):
            _wait_for(lambda: all(again.pid(r) not in (None, before[r]) for r in (0, 1)) or not going(), 300, what)
            assert going(), f"the stage ended or failed before {what}; make it longer"

        # 1. a lost node
        _wait_for(lambda: len(again.checkpoints()) >= 2 or not going(), 300, "two SAAT checkpoints")
        time.sleep(REGISTERED_S)
        assert going(), "the stage ended before the node was lost; make it longer"
        before = {r: again.pid(r) for r in (0, 1)}
        cluster.kill(cluster.workers[-1])
        time.sleep(1.0)  # nothing can start on one node: the group waits for capacity
        cluster.add_node()
        new_group(before, "a new worker group after the node's loss")
        # read once the new group runs: the old group may have checkpointed while its node went
        # (seen: then that checkpoint passed for the new group's, and the preemption came mid-restart)
        last = again.newest()
        _wait_for(lambda: again.newest() > last or not going(), 300, "a checkpoint after the restart")
        assert again.first_after(last) > 3  # the new group restored a checkpoint

        # 2. a preemption: SIGTERM, a checkpoint within the 10 s grace, the node gone at its deadline
        time.sleep(REGISTERED_S)
        before, last = {r: again.pid(r) for r in (0, 1)}, again.newest()
        victim, t = cluster.workers[0], time.monotonic()
        # the ranks slowed 5x through the grace: the stage's steps left must outlast it on any machine
        # (seen unslowed, at 13 steps/s: the 63 steps left ended within the 10 s, before the deadline)
        with slowed(list(before.values())):
            cluster.preempt(victim)
            jit = _wait_for(lambda: [p for p in again.checkpoints()
                                     if p.name > last and _why(p) == "preemption notice"]
                            or not going(), 30, "the preemption notice's checkpoint")
            saved_after = time.monotonic() - t
            assert going(), "the stage ended before the preemption; make it longer"
            assert saved_after <= 10.0, f"the preemption checkpoint came {saved_after:.1f} s after SIGTERM"
            jit_step = _wait_for(lambda: _step(jit[0]), 30, "the preemption checkpoint's step")
            cluster.add_node()  # a replacement joins while the victim drains (as an autoscaler would)
            cluster.wait_gone(victim, 60)
        # trained on, then checkpointed again just before the deadline and waited for the stop
        final = [p for p in again.checkpoints() if p.name > jit[0].name and _why(p) == "preemption deadline"]
        assert final and _step(final[0]) > jit_step, [(_step(p), _why(p)) for p in again.checkpoints()]
        last = again.newest()
        new_group(before, "a new worker group after the preemption")
        _wait_for(lambda: again.newest() > last or not going(), 300, "a checkpoint after the preemption's restart")
        assert again.first_after(last) > _step(final[0])
        final_step = _step(final[0])

        # 3. the driver and the head lost mid-stage
        last = again.newest()
        _wait_for(lambda: again.newest() > last or not going(), 300, "a checkpoint after the second restart")
        time.sleep(REGISTERED_S)
        assert going(), "the stage ended before the head was lost; make it longer"
    # the driver is gone (SIGKILL, leaving the block); the head and every node now
    import ray

    ray.shutdown()  # this process's connection to the old head (from the module's run)
    cluster.restart(workers=2)
    (again.run / "ray_runs.json").unlink()  # as if the head's disk went too: the run is found under the storage path
    assert not again.ended()
    assert main(["run", "--address", cluster.address, *again.args]) == 0  # the same command, on a new cluster
    train = json.loads((again.run / "saat" / "train.json").read_text())
    assert 0 < train["resumed_from_step"] < train["steps"]  # it went on from a checkpoint
    # every restore: after the lost node (a checkpoint), after the preemption (the deadline's checkpoint:
    # no step redone), after the lost head (the newest)
    restored = [r["step"] for r in train["restores"]]
    assert len(restored) == 3 and 3 <= restored[0] < jit_step and restored[1] == final_step, train["restores"]
    assert restored[2] == train["resumed_from_step"] > final_step
    assert max_diff(params(again.reference), params(again.run)) <= 1e-6
    # the chained SAAT evaluation ran after it, and `run` skipped the benign training; the benign
    # evaluation ran once, before SAAT: each restart of the group went on from SAAT's checkpoint
    report = json.loads((again.run / "report.json").read_text())
    assert report["saat"]["clean_map"] > 0 and set(report["stage_seconds"]) >= {"evaluate_benign", "saat",
                                                                                 "evaluate_saat"}
    assert "train" not in report["stage_seconds"]
    skipped = "restart: evaluate_benign finished before the checkpoint of saat; going on from saat"
    # (two restarts; a group start that fails before its first step would log it again)
    assert again.log.read_text().count(skipped) >= 2, again.log.read_text()[-3000:]


def _why(checkpoint) -> str | None:
    """What asked for a Ray checkpoint of this run (epoch end, every N steps, a preemption notice)."""
    from saat_dist.checkpoint import load_state

    try:
        return load_state(checkpoint / "rank-0.pt").get("why")
    except Exception:  # not written yet
        return None


def _step(checkpoint) -> int | None:
    """The step of a Ray checkpoint of this run, once rank 0's state is in it."""
    from saat_dist.checkpoint import load_state

    try:
        return load_state(checkpoint / "rank-0.pt")["step"]
    except Exception:  # not written yet (or already rotated away: then the wait times out)
        return None


# Worker-count changes move SAAT's parameters by float order only; docs/design.md
# states the yardstick (one worker at 2 threads against 1) and allows twice it.
# The drift grows with the steps: 0.080 after one tiny SAAT epoch (24 steps),
# 0.118 after this test's 72 (measured in process; CI once saw 0.161 here
# against a 2-thread reference, which itself added the thread drift).
WORKER_COUNT_TOLERANCE = 2 * 0.118
# 72 steps (at ~14 steps/s, 24 once ended before the kill took effect); a
# restarted group that Ray sizes from a stale view (the lost node's resources
# still counted) gives up waiting for its placement group after 4 s instead of
# 60 (the timeout covers only that wait: a group that fits is placed at once)
ELASTIC = ("distributed.num_workers=[1,2]", "saat.epochs=6", "distributed.worker_start_timeout_s=4")


@pytest.mark.slow
def test_elastic_goes_on_with_fewer_workers(tiny_run, local_cluster, tmp_path):
    """distributed.num_workers [1, 2]: a worker node lost after the first
    checkpoint and not brought back; Ray restarts the group on the node left,
    whose one worker restores the 2-worker checkpoint (its code bank
    regrouped from both ranks' items) and takes the whole global batch; the
    stage ends within the worker-count tolerance of the same stage run
    uninterrupted in one process. Last in the module: it leaves one worker node."""
    cluster = local_cluster
    two_worker_nodes(cluster)
    again = _SaatAgain(tiny_run, tmp_path / "elastic", tmp_path / "elastic.log", *ELASTIC)
    with _killed_at_exit(["saat", "--address", cluster.address, *again.args], again.log) as proc:
        going = lambda: proc.poll() is None and not again.ended()  # noqa: E731
        _wait_for(lambda: again.checkpoints() or not going(), 300, "the first SAAT checkpoint")
        time.sleep(REGISTERED_S)
        assert going(), "the stage ended before the node was lost; make it longer"
        cluster.kill(cluster.workers[-1])
        assert proc.wait(600) == 0, again.log.read_text()[-3000:]
    train = json.loads((again.run / "saat" / "train.json").read_text())
    assert train["resumed_from_workers"] == 2  # a 2-worker checkpoint, restored by one worker
    assert [(r["written_by_workers"], r["workers"]) for r in train["restores"]] == [(2, 1)]
    assert train["schedule"]["workers"] == 1 and train["schedule"]["global_batch"] == 16
    assert [r["rank"] for r in train["ranks"]] == [0]
    assert 0 < train["resumed_from_step"] < train["steps"] == 72
    reference = _SaatAgain(tiny_run, tmp_path / "uninterrupted", tmp_path / "uninterrupted.log", *ELASTIC)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker: one CPU, one thread
    try:
        assert main(["saat", *reference.args, "--set", "distributed.num_workers=0"]) == 0
    finally:
        torch.set_num_threads(threads)
    diff = max_diff(params(reference.run), params(again.run))
    print(f"elastic 2 -> 1 workers: max |dtheta| {diff:.3g}")
    assert diff <= WORKER_COUNT_TOLERANCE
