"""A CodeBank kept equal across processes, for the training steps to use as is.

``SyncedBank`` wraps a CodeBank and is passed to ``benign_step`` /
``saat_step`` in its place. Two mechanisms keep it exact, both independent of
the number of training items N:

1. Codes (``share_codes=True``, for losses that read the bank's codes, which
   the trainer decides): every ``update`` all-gathers the (index, code) pairs
   of every process's batch and writes the others' rows too, so the codes a
   loss compares against are those a single process would hold.
   Cost per step: world x B x K values.
2. The per-label-set table behind mainstay codes: every ``sync_every``-th
   ``update`` (one per training step) and at each ``sync_table()`` call
   (epoch ends, checkpoints), the table changes each process made since the
   last sync are summed with one all-reduce of an L x K float64 tensor, and
   each process adds the others' part. Right after a sync every process's
   table equals the table one process computes from all codes; with
   ``sync_every=1`` mainstay codes are those of a single process.
"""

from __future__ import annotations

import time

import torch

from saat_dist.distributed.collectives import all_gather_cat, all_reduce_sum, is_distributed
from saat_dist.mainstay import CodeBank


class SyncedBank:
    def __init__(self, bank: CodeBank, sync_every: int, share_codes: bool, on_sync=None) -> None:
        if sync_every < 1:
            raise ValueError("bank_sync_every must be >= 1")
        self.bank, self.sync_every, self.share = bank, sync_every, share_codes
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
        self.bank.update(index, codes)
        if self.share and is_distributed():
            self._share(index, codes)
        self.updates += 1
        if self.updates % self.sync_every == 0:
            self.sync_table()

    def _share(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        index = index.detach().to("cpu", torch.int64)
        all_index = all_gather_cat(index)
        all_codes = all_gather_cat(codes.detach().to("cpu", torch.float32))
        others = ~torch.isin(all_index, index)
        self.bank.write_remote_codes(all_index[others], all_codes[others])

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
