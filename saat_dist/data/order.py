"""The training order of a split: one global sample order, whatever the
number of workers and loader processes (MosaicML Streaming's "elastic
determinism", on WebDataset shards).

The split's shards are dealt to C *canonical slots* (slot s holds the shards
j with j % C == s, for the whole run). Each slot is an endless sequence: in
its data epoch e it reads its shards in an order drawn from (seed, s, e),
each shard's samples in an order drawn from (seed, e, j). Global position p
is sample p // C of slot p % C, and step t's global batch is positions
[t G, (t + 1) G) for the global batch G.

A worker count W that divides C splits that order without moving it: rank r
takes the positions p with p % W == r, which all come from its own slots
(s % W == r, so it reads only the shards j with j % W == r: its part, and
the items whose codes it holds). Loader processes split a rank's slots
again; the rank puts their samples back in position order. So the global
batch at step t holds the same samples at 1, 2, 4 ... workers, with any
number of loader processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class GlobalOrder:
    """Where each global position of a split's training order comes from."""

    def __init__(self, counts: list[int], slots: int, seed: int, shuffle: bool = True) -> None:
        if not 1 <= slots <= len(counts):
            raise ValueError(f"{slots} canonical slots for {len(counts)} shards: need 1 <= slots <= shards")
        self.counts, self.slots, self.seed, self.shuffle = list(counts), slots, seed, shuffle
        self.slot_shards = [list(range(s, len(counts), slots)) for s in range(slots)]

    def rank_slots(self, rank: int, world: int) -> list[int]:
        """The slots rank ``rank`` of ``world`` reads (``world`` must divide the slot count)."""
        if self.slots % world:
            raise ValueError(f"{world} workers do not divide {self.slots} canonical slots")
        return [s for s in range(self.slots) if s % world == rank]

    def taken(self, slot: int, positions: int) -> int:
        """Samples of ``slot`` used by the first ``positions`` global positions."""
        return max(0, (positions - slot + self.slots - 1) // self.slots)

    def shard_order(self, slot: int, epoch: int) -> list[int]:
        """The order in which ``slot`` reads its shards in its data epoch ``epoch``."""
        shards = np.array(self.slot_shards[slot])
        if self.shuffle:
            shards = np.random.default_rng([self.seed, slot, epoch]).permutation(shards)
        return [int(j) for j in shards]

    def sample_order(self, shard: int, epoch: int, n: int) -> list[int]:
        """The order of a shard's ``n`` readable samples in data epoch ``epoch``."""
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch, shard]).permutation(n).tolist()

    def shards_from(self, slot: int, skip: int) -> Iterator[tuple[int, int, int]]:
        """(data epoch, shard, samples to skip in it) of ``slot`` from its
        ``skip``-th sample on, forever; whole shards before it are skipped
        by their manifest counts, unread."""
        for epoch in range(1 << 62):
            for j in self.shard_order(slot, epoch):
                if skip >= self.counts[j]:
                    skip -= self.counts[j]
                    continue
                yield epoch, j, skip
                skip = 0
