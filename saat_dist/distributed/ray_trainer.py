"""The TorchTrainer the driver builds: Ray's, less the Ray Data helper that
a job without Ray Datasets never calls.

Ray Train 2.60 gives every worker group a ``DatasetManager`` actor (through
its ``DatasetsCallback``) whether or not the trainer was handed datasets.
Our workers stream WebDataset shards themselves and never call
``ray.train.get_dataset_shard``, so that actor is a Python process that
imports Ray Train and Ray Data (3.1 CPU-seconds, measured per process with
``/proc/<pid>/stat``) at every group start, and every restart after a lost
node or a preemption, for nothing. Without datasets the callback is left
out; with datasets (none today) Ray's own list is kept. If a Ray version
moves the callback, the plain TorchTrainer is used.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer

try:  # a private module of Ray 2.60 (pinned)
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:  # another Ray: keep its callbacks as they are
    DatasetsCallback = None


class ShardStreamTrainer(TorchTrainer):
    """A TorchTrainer whose workers read their own shards (no Ray Datasets)."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if DatasetsCallback is None or self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
