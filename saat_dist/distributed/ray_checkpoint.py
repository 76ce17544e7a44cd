"""Checkpoints through Ray Train: every worker writes its files into a
temporary directory and ``ray.train.report`` merges the workers' files into
one checkpoint (a collective: every worker reports the same number of
times). At start the newest complete one comes back from
``ray.train.get_checkpoint()``, after a worker failure (Ray's retries) or a
driver restart with the same run name (``--resume``)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path


class RayCheckpointer:
    @contextlib.contextmanager
    def restore(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        self.where = ckpt.path
        with ckpt.as_directory() as directory:
            yield Path(directory)

    def save(self, step: int, metrics: dict, write) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="saat-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    where = "ray"
