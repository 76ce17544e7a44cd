"""Per-worker Prometheus metrics.

Each worker serves its own registry over HTTP (bind address 127.0.0.1 unless
configured; port 0 picks a free one, otherwise base port + local rank) and
records where it listens in ``<run_dir>/metrics/<stage>-rank<r>.json``.
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
        self.server = None
        self.port: int | None = None

    def serve(self, bind: str, port: int, run_dir: str | Path | None = None, local_rank: int = 0) -> int:
        """Start the HTTP endpoint; returns the port it listens on."""
        want = 0 if port == 0 else port + local_rank
        self.server, _thread = start_http_server(want, addr=bind, registry=self.registry)
        self.port = self.server.server_port
        if run_dir is not None:
            out = Path(run_dir) / "metrics"
            out.mkdir(parents=True, exist_ok=True)
            info = {**self.labels, "host": bind, "node": socket.gethostname(), "port": self.port, "pid": os.getpid()}
            path = out / f"{self.labels['stage']}-rank{self.labels['rank']}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, path)
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def record_step(self, out: dict, samples: int, seconds: float, epoch: int) -> None:
        lab = self.labels
        self.steps.labels(**lab).inc()
        self.samples.labels(**lab).inc(samples)
        self.samples_per_second.labels(**lab).set(samples / max(seconds, 1e-9))
        self.epoch.labels(**lab).set(epoch)
        for part in LOSS_PARTS:
            if part in out:
                self.loss.labels(**lab, part=part).set(float(out[part]))
        if "bits_flipped" in out:
            self.bits_flipped.labels(**lab).set(float(out["bits_flipped"]))

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
