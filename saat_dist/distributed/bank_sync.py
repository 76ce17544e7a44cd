"""A CodeBank kept equal across processes, for the training steps to use as is.

``SyncedBank`` wraps a CodeBank and is passed to ``benign_step`` /
``saat_step`` in its place. Two mechanisms keep it exact; neither grows with
the number of training items N:

1. Codes, every ``update`` (one per training step): the processes all-gather
   the (index, code) pairs of their batches and every process writes all of
   them, so the codes U that DPH/DPSH/HashNet compare a batch against are those
   a single process would hold, and an item that moves to another process in a
   later data epoch starts from the right code. If two processes train the same
   item in one step (possible where the data epochs of ranks overlap), the
   higher rank's code wins everywhere. Cost per step: world x B x (K + 1) values.
2. The per-label-set table behind mainstay codes: each process adds to it only
   the changes of the codes it won, and every ``sync_every`` updates (and at
   each ``sync_table()`` call: epoch ends, checkpoints) one all-reduce of the
   L x K float64 table of changes since the last sync gives every process the
   others' part. Right after a sync every table equals the table one process
   computes from all codes; with ``sync_every=1`` mainstay codes are exactly
   those of a single process.
"""

from __future__ import annotations

import time

import torch

from saat_dist.distributed.collectives import all_gather_ragged, all_reduce_sum, is_distributed, rank
from saat_dist.mainstay import CodeBank


class SyncedBank:
    def __init__(self, bank: CodeBank, sync_every: int, on_sync=None) -> None:
        if sync_every < 1:
            raise ValueError("bank_sync_every must be >= 1")
        self.bank, self.sync_every = bank, sync_every
        self.on_sync = on_sync  # callback(seconds, bytes), e.g. metrics
        self.updates = 0

    # The CodeBank interface the steps use.
    @property
    def codes(self) -> torch.Tensor:
        return self.bank.codes

    @property
    def labels(self) -> torch.Tensor:
        return self.bank.labels

    def mainstay(self, query_labels: torch.Tensor) -> torch.Tensor:
        return self.bank.mainstay(query_labels)

    def update(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        index = index.detach().to("cpu", torch.int64)
        codes = codes.detach().to("cpu", torch.float32)
        if not is_distributed():
            self.bank.update(index, codes)
        else:
            all_index, sizes = all_gather_ragged(index, with_sizes=True)
            all_codes = all_gather_ragged(codes)
            # last write wins, in rank order: the winning row of each item
            uniq, inverse = torch.unique(all_index, return_inverse=True)
            last = torch.full((len(uniq),), -1, dtype=torch.int64).scatter_reduce_(
                0, inverse, torch.arange(len(all_index)), reduce="amax")
            wins = torch.zeros(len(all_index), dtype=torch.bool)
            wins[last] = True
            lo = sum(sizes[: rank()])
            mine = torch.zeros_like(wins)
            mine[lo : lo + len(index)] = True
            self.bank.update(all_index[wins & mine], all_codes[wins & mine])  # codes + table
            self.bank.write_remote_codes(all_index[wins & ~mine], all_codes[wins & ~mine])  # codes only
        self.updates += 1
        if self.updates % self.sync_every == 0:
            self.sync_table()

    def sync_table(self) -> tuple[float, int]:
        """All-reduce the table changes since the last sync (a collective: every
        process must call it the same number of times). Returns (seconds, bytes)."""
        t = time.perf_counter()
        local = self.bank.take_pending()
        nbytes = 0
        if is_distributed():
            total = all_reduce_sum(local.clone())
            self.bank.apply_remote(total - local)
            nbytes = local.numel() * local.element_size()
        seconds = time.perf_counter() - t
        if self.on_sync is not None:
            self.on_sync(seconds, nbytes)
        return seconds, nbytes
