"""Checkpoints through Ray Train: every worker writes its files into a
temporary directory and ``ray.train.report`` merges the workers' files into
one checkpoint (a collective: every worker reports the same number of
times). At start the newest complete one comes back from
``ray.train.get_checkpoint()``, after a worker failure (Ray's retries) or a
driver restart with the same run name (``--resume``).

A worker group may run a chain of stages (``saat-dist run``: benign
training, its evaluation, SAAT, its evaluation), so each checkpoint names
the training stage that wrote it (Ray's checkpoint metadata) and a stage
restores only its own: a restart skips the stages before the checkpoint's
that left their outputs (they had finished), and a training stage given
another stage's checkpoint starts afresh.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path


def checkpoint_stage(checkpoint) -> str | None:
    """The training stage that wrote a Ray checkpoint (None: no checkpoint,
    or one written before checkpoints named their stage)."""
    if checkpoint is None:
        return None
    return checkpoint.get_metadata().get("stage")


class RayCheckpointer:
    def __init__(self, stage: str | None = None, rank: int = 0) -> None:
        self.stage = stage  # the training stage whose checkpoints these are
        self.rank = rank

    @contextlib.contextmanager
    def restore(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        written_by = checkpoint_stage(ckpt)
        if ckpt is None or (self.stage and written_by and written_by != self.stage):
            yield None  # none, or another stage's of the chain: this stage starts afresh
            return
        self.where = ckpt.path
        with ckpt.as_directory() as directory:
            yield Path(directory)

    def save(self, step: int, metrics: dict, write) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="saat-ckpt-") as tmp:
            write(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if self.stage and self.rank == 0:  # one writer: Ray merges the ranks' files into one checkpoint
                checkpoint.set_metadata({"stage": self.stage})
            ray.train.report({"step": step, **metrics}, checkpoint=checkpoint)

    where = "ray"
