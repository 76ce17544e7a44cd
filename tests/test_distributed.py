"""The distributed pipeline on the session's local Ray cluster (a head and
2 worker nodes on 127.0.0.1, tests/conftest.py): 2 DeepSpeed workers on
gloo, streamed shards (6 train shards over 2 workers), the code bank
all-reduce, Prometheus endpoints scraped directly and by a real Prometheus
server, the live training sent with `ray job submit` to the head's job API.
(The whole `run`, lost nodes, a preemption and a lost head:
tests/test_pipeline.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from saat_dist.cli import main
from saat_dist.data.convert import convert
from saat_dist.monitoring.prometheus import read_target_file
from tests.conftest import fresh_driver, need, slowed, two_worker_nodes
from tests.test_cluster import MONITORING, dashboard_queries
from tests.test_failures import _wait_for

pytestmark = pytest.mark.slow  # real Ray clusters and DeepSpeed engines: the full tier only

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cluster(local_cluster):
    """The session's cluster with its 2 worker nodes (a test before may have
    lost one), joined anew by this module's first command."""
    fresh_driver()
    two_worker_nodes(local_cluster)
    return local_cluster


@pytest.fixture(scope="module")
def six_shards(tiny_demo, tmp_path_factory):
    """The tiny demo re-sharded so that the train split has 6 shards (3 canonical slots per worker)."""
    out = tmp_path_factory.mktemp("six") / "shards"
    manifest = convert(tiny_demo[0] / "list", out, shard_size=48, shard_multiple=2)
    assert len(manifest["splits"]["train"]["shards"]) == 6
    return str(out)


def base_args(run_dir, shards, *extra):
    args = ["--config", "configs/tiny.yaml", "--set", f"output_dir={run_dir}", "--set", f"data.shard_dir={shards}",
            "--set", "data.build_demo=false"]
    for e in extra:
        args += ["--set", e]
    return args


def test_a_corrupt_sample_stops_the_run_in_one_line(tmp_path, six_shards, capsys, cluster):
    """2 Ray workers; train shard 1 (rank 1's) holds an undecodable image: the
    run stops with one line naming the rank, shard and sample (with
    data.skip_corrupt it is skipped on every rank: tests/test_deepspeed.py)."""
    from tests.test_stream import rewrite_sample

    shards = tmp_path / "shards"
    shutil.copytree(six_shards, shards)
    rewrite_sample(shards / "train-000001.tar", "00000050",
                   lambda f: {**f, **{e: b"not an image" for e in f if e != "json"}})
    run = tmp_path / "stops"
    assert main(["train", "--address", cluster.address,
                 *base_args(run, shards, "train.epochs=1", "distributed.max_failures=0")]) == 2
    # the command's own error is one line, the last; Ray Train's controller
    # also forwards the worker's log (its traceback included) to the console
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"saat-dist: error: train failed on the Ray workers \(rank 1 of [12] failing\): ShardError: ", err)
    assert "train-000001.tar: sample 00000050: undecodable .png image" in err


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, name: str, rank: int) -> float | None:
    m = re.search(rf'^{name}\{{[^}}]*rank="{rank}"[^}}]*\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


class TestLiveRun:
    """A 2-worker training sent to the cluster with `launch/submit.sh`
    (`ray job submit` through the head's job API on 127.0.0.1), running in the
    background while its metrics are scraped: directly over HTTP, and by a
    real Prometheus server; then stopped through the job API."""

    @pytest.fixture(scope="class")
    @classmethod
    def live_run(cls, six_shards, tmp_path_factory, cluster):
        from ray.job_submission import JobSubmissionClient

        tmp = tmp_path_factory.mktemp("live")
        run = tmp / "run"
        sets = base_args(run, six_shards, "train.epochs=400", "train.batch_size=8", "distributed.bank_sync_every=2")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "RAY_ADDRESS": cluster.dashboard, "RAY_BIN": str(Path(sys.executable).with_name("ray")),
               "JOB_PYTHON": sys.executable, "SUBMIT_FLAGS": "--no-wait"}
        # --debug: a job that fails shows its traceback in the job's log
        sub = subprocess.run(["bash", "launch/submit.sh", "train", *sets[1:], "--debug"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        assert sub.returncode == 0, (sub.stdout[-3000:], sub.stderr[-2000:])
        job_id = re.search(r"Job '(raysubmit_\w+)'", sub.stdout + sub.stderr).group(1)
        client = JobSubmissionClient(cluster.dashboard)
        try:
            _wait_for(lambda: len(list((run / "metrics").glob("train-rank*.json"))) == 2
                      or client.get_job_status(job_id).is_terminal(), 240, "both workers' metrics target files")
            assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-3000:]
            # once both ranks step, they run a fifth of the time while the tests watch: nothing here
            # depends on their speed, and the cores go to the other test process (the ranks had trained
            # flat out on both)
            targets = [read_target_file(f) for f in (run / "metrics").glob("train-rank*.json")]

            def stepped(t):  # a rank that has stepped (its server gone: it has not)
                with contextlib.suppress(OSError):
                    return (_value(_scrape(t["port"]), "saat_steps_total", int(t["rank"])) or 0) > 0
                return False

            _wait_for(lambda: client.get_job_status(job_id).is_terminal() or all(map(stepped, targets)), 180,
                      "both ranks' first steps")
            assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-3000:]
            with slowed([t["pid"] for t in targets]):
                yield run, client, job_id
        finally:
            client.stop_job(job_id)
            _wait_for(lambda: client.get_job_status(job_id).is_terminal(), 120, "the job to stop")

    def test_every_worker_serves_metrics_that_move(self, live_run):
        live_run, _, _ = live_run
        files = sorted((live_run / "metrics").glob("train-rank*.json"))
        ports = {read_target_file(f)["rank"]: read_target_file(f)["port"] for f in files}
        assert set(ports) == {"0", "1"}

        def stepped(r, port):
            text = _scrape(port)
            return text if (_value(text, "saat_steps_total", int(r)) or 0) > 0 else None

        first = {r: _wait_for(lambda r=r, p=p: stepped(r, p), 180, f"rank {r} steps") for r, p in ports.items()}

        def moved(r, port):  # later steps: an epoch's end (its checkpoint, the bank sync) can pause a rank seconds
            text = _scrape(port)
            steps = _value(text, "saat_steps_total", int(r))
            return text if steps > _value(first[r], "saat_steps_total", int(r)) else None

        later = {r: _wait_for(lambda r=r, p=p: moved(r, p), 60, f"rank {r} stepping on") for r, p in ports.items()}
        for r in ("0", "1"):
            rank = int(r)
            assert _value(later[r], "saat_steps_total", rank) > _value(first[r], "saat_steps_total", rank)
            assert _value(later[r], "saat_samples_total", rank) > _value(first[r], "saat_samples_total", rank)
            assert _value(later[r], "saat_samples_per_second", rank) > 0
            assert 'part="hash"' in later[r] and 'stage="train"' in later[r]
            # table all-reduce: bytes per sync = L x K x 8, whatever N
            assert _value(later[r], "saat_bank_sync_bytes_total", rank) > 0
            assert _value(later[r], "saat_bank_sync_last_bytes", rank) % (16 * 8) == 0

    def test_a_real_prometheus_finds_and_scrapes_both_ranks(self, live_run, tmp_path):
        """Prometheus on 127.0.0.1 with cluster/monitoring/prometheus.yml
        rendered for this run (its file_sd targets, 1 s intervals) and
        alerts.yml: series of both ranks arrive through the HTTP API, the
        alert rules load and evaluate, every dashboard query runs."""
        live_run, _, _ = live_run
        binary = shutil.which("prometheus")
        need(binary is not None, "prometheus is not installed (Debian package `prometheus`; launch/test.sh "
                                 "installs it when apt is usable)")
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (job,) = config["scrape_configs"]
        job["file_sd_configs"] = [{"files": [str(live_run / "metrics" / "*.json")], "refresh_interval": "1s"}]
        config["rule_files"] = [str(MONITORING / "alerts.yml")]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        api = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT)
        try:
            _wait_for(lambda: _http_ok(f"{api}/-/ready"), 60, "Prometheus ready")

            def ranks_stepping():
                result = _query(api, 'saat_steps_total{job="saat-dist", stage="train"}')
                ranks = {r["metric"]["rank"] for r in result if float(r["value"][1]) > 0}
                return result if ranks == {"0", "1"} else None

            steps = _wait_for(ranks_stepping, 120, "saat_steps_total of rank 0 and rank 1 in Prometheus")
            targets = {read_target_file(f)["port"] for f in (live_run / "metrics").glob("train-rank*.json")}
            assert {int(r["metric"]["instance"].rsplit(":", 1)[1]) for r in steps} == targets
            assert all(r["metric"]["node"] for r in steps)  # relabelled from the target file
            up = _query(api, 'up{job="saat-dist"}')
            assert len(up) == 2 and all(r["value"][1] == "1" for r in up)
            loss = _query(api, 'saat_loss{part="hash"}')
            assert {r["metric"]["rank"] for r in loss} == {"0", "1"}

            def rules_evaluated():
                groups = _get(f"{api}/api/v1/rules")["data"]["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return rules if len(rules) == 5 and all(r["health"] == "ok" for r in rules) else None

            rules = _wait_for(rules_evaluated, 30, "the 5 alert rules loaded and evaluated")
            assert {r["name"] for r in rules} >= {"SAATWorkerDown", "SAATLossNotFinite"}
            assert _query(api, 'ALERTS{alertstate="firing"}') == []  # a healthy run fires nothing
            for expr in dashboard_queries():
                _query(api, expr.replace("$__rate_interval", "1m").replace("$stage", ".*"))
            rate = 'sum by (stage) (rate(saat_samples_total{stage=~".*"}[1m]))'  # the dashboard's throughput
            throughput = _wait_for(lambda: [r for r in _query(api, rate) if float(r["value"][1]) > 0], 60,
                                   "a positive samples/s rate from two scrapes")
            assert throughput[0]["metric"]["stage"] == "train"
        finally:
            proc.terminate()
            proc.wait(30)


    def test_the_job_ran_on_the_cluster_and_stops_on_request(self, live_run):
        """Inside the job, saat-dist joined the cluster that runs it (the
        stage's Ray Train run and its checkpoints land in the run directory);
        the job API stops it."""
        from ray.job_submission import JobStatus

        run, client, job_id = live_run
        assert client.get_job_status(job_id) == JobStatus.RUNNING
        _wait_for(lambda: list((run / "ray").glob("*-train-*/checkpoint_*")), 120, "a checkpoint of the job's run")
        assert json.loads((run / "ray_runs.json").read_text())["train"].startswith("tiny-train-")
        client.stop_job(job_id)
        assert _wait_for(lambda: client.get_job_status(job_id).is_terminal(), 120, "the job to stop")
        assert client.get_job_status(job_id) == JobStatus.STOPPED

def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(api: str, expr: str) -> list:
    """An instant query; a query Prometheus rejects fails the test."""
    try:
        body = _get(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as e:
        raise AssertionError(f"Prometheus rejected {expr!r}: {e.read().decode()}") from e
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]
