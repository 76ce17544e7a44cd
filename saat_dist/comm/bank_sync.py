"""A CodeBank kept in step across processes, for the training steps to use as is.

``SyncedBank`` wraps a CodeBank and is passed to ``benign_step`` /
``saat_step`` in its place. Two modes, chosen by what the hash loss reads:

* ``share_codes=False`` (DPH, CSQ, and SAAT's mainstay codes): each process
  holds only the codes of the items it trains (the shard -> rank assignment
  is fixed for the run), N/W x K. The loss and mainstay codes read only the
  per-label-set table (L x K) and the Gram matrix (K x K); every
  ``sync_every`` updates, and at each ``sync_table()`` call (epoch ends,
  checkpoints), one all-reduce of their changes since the last sync gives
  every process the others' part: L*K + K*K float64 values, whatever N.
  Right after a sync every process's statistics equal those one process
  computes from all codes; with ``sync_every=1`` the sync happens inside
  ``update``, before the step's loss, so losses and mainstay codes are those
  of one process training the union of the ranks' batches.
* ``share_codes=True`` (DPSH, HashNet: non-linear in u . U_j, they need
  every code): every ``update`` also all-gathers the (index, code) pairs of
  the batches and every process writes all of them, so each holds the codes
  one process would (N x K per process, W x B x K values per step). If two
  processes train the same item in one step the higher rank's code wins
  everywhere; only the winner adds the change to the statistics.
"""

from __future__ import annotations

import time

import torch

from saat_dist.comm.collectives import all_gather_ragged, all_reduce_sum, is_distributed, rank, world_size
from saat_dist.mainstay import CodeBank


class SyncedBank:
    def __init__(self, bank: CodeBank, sync_every: int, on_sync=None, share_codes: bool = True) -> None:
        if sync_every < 1:
            raise ValueError("bank_sync_every must be >= 1")
        if not share_codes and bank.index is None and world_size() > 1:
            raise ValueError("SyncedBank(share_codes=False) needs a bank of this process's items (CodeBank(index=...))")
        self.bank, self.sync_every, self.share_codes = bank, sync_every, share_codes
        self.on_sync = on_sync  # callback(seconds, bytes), e.g. metrics
        self.updates = 0

    # The CodeBank interface the steps use.
    @property
    def codes(self) -> torch.Tensor:
        return self.bank.codes

    @property
    def labels(self) -> torch.Tensor:
        return self.bank.labels

    def mainstay(self, query_labels: torch.Tensor, weighting: str = "cosine") -> torch.Tensor:
        return self.bank.mainstay(query_labels, weighting)

    def dph_stats(self):
        return self.bank.dph_stats()

    def update(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        if not self.share_codes or not is_distributed():
            self.bank.update(index, codes)
        else:
            index = index.detach().to(torch.int64)
            codes = codes.detach().to(torch.float32)
            all_index, sizes = all_gather_ragged(index, with_sizes=True)
            all_codes = all_gather_ragged(codes)
            # last write wins, in rank order: the winning row of each item
            uniq, inverse = torch.unique(all_index, return_inverse=True)
            last = torch.full((len(uniq),), -1, dtype=torch.int64, device=all_index.device).scatter_reduce_(
                0, inverse, torch.arange(len(all_index), device=all_index.device), reduce="amax")
            wins = torch.zeros(len(all_index), dtype=torch.bool, device=all_index.device)
            wins[last] = True
            lo = sum(sizes[: rank()])
            mine = torch.zeros_like(wins)
            mine[lo : lo + len(index)] = True
            self.bank.update(all_index[wins & mine], all_codes[wins & mine])  # codes + statistics
            self.bank.write_remote_codes(all_index[wins & ~mine], all_codes[wins & ~mine])  # codes only
        self.updates += 1
        if self.updates % self.sync_every == 0:
            self.sync_table()

    def fill(self, index: torch.Tensor, codes: torch.Tensor) -> None:
        """Initial codes: this process's items (a bank of own items; then the
        statistics are summed across processes), or every item, the same on
        every process (``share_codes``; nothing to sum)."""
        self.bank.update(index, codes)
        if self.share_codes:
            self.bank.take_pending()
        else:
            self.sync_table()

    def sync_table(self) -> tuple[float, int]:
        """All-reduce the statistics' changes since the last sync (a collective:
        every process must call it the same number of times). Returns (seconds, bytes)."""
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

    def rebuild(self) -> None:
        """After restoring codes (``CodeBank.load_state_dict`` rebuilds the
        statistics from the codes held here): a bank of this process's items
        sums its statistics across processes; a bank holding every code
        already has the global ones. Collective in the first case."""
        if not self.share_codes and is_distributed():
            stats = self.bank.stats
            stats.copy_(all_reduce_sum(stats.clone()))
        self.bank.take_pending()

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"])
        self.updates = int(state["updates"])
        self.rebuild()
