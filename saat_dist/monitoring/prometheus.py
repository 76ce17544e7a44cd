"""Per-worker Prometheus metrics.

Each worker serves its own registry over HTTP (bind address 127.0.0.1 unless
configured; port 0 picks a free one, otherwise base port + local rank) and
records where it listens in ``<run_dir>/metrics/<stage>-rank<r>.json``, a
Prometheus file-based service discovery target file, so a Prometheus outside
Kubernetes finds every worker with ``file_sd_configs`` over
``<run_dir>/metrics/*.json`` (see ``cluster/monitoring/prometheus.yml``).
A worker that stops cleanly removes its file; a killed worker's file stays,
so its target shows as down until the worker is restarted.
Every series carries ``rank`` and ``stage`` labels.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

LOSS_PARTS = ("loss", "hash", "adv", "quant")


class WorkerMetrics:
    def __init__(self, rank: int, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.labels = {"rank": str(rank), "stage": stage}
        names = ("rank", "stage")
        r = self.registry

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, (*names, *extra), registry=r)

        def counter(name, doc):
            return Counter(name, doc, names, registry=r)

        self.steps = counter("saat_steps", "training steps done")
        self.samples = counter("saat_samples", "training samples processed")
        self.samples_per_second = gauge("saat_samples_per_second", "training throughput over the last step")
        self.loss = gauge("saat_loss", "loss parts of the last step (loss = total)", ("part",))
        self.bits_flipped = gauge("saat_attack_bits_flipped_ratio",
                                  "mean fraction of code bits the inner attack flipped (SAAT)")
        self.epoch = gauge("saat_epoch", "current epoch (0-based)")
        self.bank_syncs = counter("saat_bank_syncs", "code-bank table all-reduces")
        self.bank_sync_seconds = counter("saat_bank_sync_seconds", "seconds spent in bank table all-reduces")
        self.bank_sync_bytes = counter("saat_bank_sync_bytes", "bytes all-reduced for the bank table")
        self.bank_sync_last_bytes = gauge("saat_bank_sync_last_bytes", "bytes of the last bank table all-reduce")
        self.last_bank_sync = gauge("saat_last_bank_sync_timestamp_seconds", "unix time of the last bank sync")
        self.checkpoints = counter("saat_checkpoints", "checkpoints written")
        self.checkpoint_seconds = counter("saat_checkpoint_seconds", "seconds spent writing checkpoints")
        self.last_checkpoint = gauge("saat_last_checkpoint_timestamp_seconds", "unix time of the last checkpoint")
        self.skipped = counter("saat_skipped_samples", "corrupt training samples skipped (data.skip_corrupt)")
        self.server = None
        self.port: int | None = None
        self.target_file: Path | None = None

    def serve(self, bind: str, port: int, run_dir: str | Path | None = None, local_rank: int = 0) -> int:
        """Start the HTTP endpoint; returns the port it listens on."""
        want = 0 if port == 0 else port + local_rank
        self.server, _thread = start_http_server(want, addr=bind, registry=self.registry)
        self.port = self.server.server_port
        # "nothing since start" must be able to alert, so the clocks start now
        now = time.time()
        self.last_bank_sync.labels(**self.labels).set(now)
        self.last_checkpoint.labels(**self.labels).set(now)
        if run_dir is not None:
            self.target_file = write_target_file(Path(run_dir) / "metrics", self.labels, bind, self.port)
        return self.port

    def close(self, linger_s: float = 0.0) -> None:
        """Withdraw the target file, keep serving ``linger_s`` seconds, then
        stop the endpoint: Prometheus applies discovery changes every 5 s, so
        a worker that stopped at once would record failed scrapes (up == 0)."""
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)
            self.target_file = None
            if self.server is not None and linger_s > 0:
                time.sleep(linger_s)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def record_step(self, out: dict, samples: int, seconds: float, epoch: int, steps: int = 1) -> None:
        """``steps`` steps of ``samples`` samples in all took ``seconds``;
        ``out``: their mean loss parts (host floats; the trainer records on log steps)."""
        lab = self.labels
        self.steps.labels(**lab).inc(steps)
        self.samples.labels(**lab).inc(samples)
        self.samples_per_second.labels(**lab).set(samples / max(seconds, 1e-9))
        self.epoch.labels(**lab).set(epoch)
        for part in LOSS_PARTS:
            if part in out:
                self.loss.labels(**lab, part=part).set(float(out[part]))
        if "bits_flipped" in out:
            self.bits_flipped.labels(**lab).set(float(out["bits_flipped"]))

    def record_skipped(self, samples: int) -> None:
        self.skipped.labels(**self.labels).inc(samples)

    def record_bank_sync(self, seconds: float, nbytes: int) -> None:
        lab = self.labels
        self.bank_syncs.labels(**lab).inc()
        self.bank_sync_seconds.labels(**lab).inc(seconds)
        self.bank_sync_bytes.labels(**lab).inc(nbytes)
        self.bank_sync_last_bytes.labels(**lab).set(nbytes)
        self.last_bank_sync.labels(**lab).set(time.time())

    def record_checkpoint(self, seconds: float) -> None:
        lab = self.labels
        self.checkpoints.labels(**lab).inc()
        self.checkpoint_seconds.labels(**lab).inc(seconds)
        self.last_checkpoint.labels(**lab).set(time.time())


def write_target_file(directory: Path, labels: dict, bind: str, port: int) -> Path:
    """Write ``<stage>-rank<r>.json`` in Prometheus file_sd format, atomically.

    The target is the bind address, or this node's address when the server
    listens on every interface. The rank/stage labels stay on the series
    themselves; the target carries only ``__meta_`` labels (dropped after
    relabelling) that say which process serves it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    host = bind if bind not in ("", "0.0.0.0", "::") else _node_address()
    group = [{
        "targets": [f"{host}:{port}"],
        "labels": {"__meta_saat_rank": labels["rank"], "__meta_saat_stage": labels["stage"],
                   "__meta_saat_node": socket.gethostname(), "__meta_saat_pid": str(os.getpid())},
    }]
    path = directory / f"{labels['stage']}-rank{labels['rank']}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not matched by *.json
    tmp.write_text(json.dumps(group, indent=1))
    os.replace(tmp, path)
    return path


def read_target_file(path: str | Path) -> dict:
    """Where one worker serves its metrics: host, port, pid, rank, stage."""
    group = json.loads(Path(path).read_text())[0]
    host, port = group["targets"][0].rsplit(":", 1)
    meta = group["labels"]
    return {"host": host, "port": int(port), "pid": int(meta["__meta_saat_pid"]),
            "rank": meta["__meta_saat_rank"], "stage": meta["__meta_saat_stage"], "node": meta["__meta_saat_node"]}


def _node_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()
