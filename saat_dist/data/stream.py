"""The resumable training stream of one rank (decoding: ``data.decode``).

Training stream. The split's samples follow one global order, whatever the
number of workers and loader processes (``saat_dist.data.order``): step t's
global batch is the same set of samples at any scale. Rank r of W takes the
positions p % W == r of each global batch, all from its own canonical slots
(so it reads only the shards j % W == r, the items it holds codes for); its
``num_workers`` loader processes split its slots again and the rank puts
their samples back in position order, then cuts its share into
``micro_batches`` micro-batches (gradient accumulation). A slot never runs
dry (it moves on to its next data epoch), so every rank yields exactly
``steps_per_epoch`` x ``micro_batches`` batches per trainer epoch, with
``steps_per_epoch = split count // global batch``: collectives can never
hang on a rank that ran out. The position is the number of global steps
taken; restoring it skips whole shards by their manifest counts instead of
reading them, and does not depend on the worker count.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from saat_dist.data.decode import ShardDigestError, ShardError, iter_shard
from saat_dist.data.order import GlobalOrder
from saat_dist.data.source import DataSource

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images B x 3 x S x S in [0,1], labels B x C, index B


@dataclass
class StreamSpec:
    shard_dir: str
    split: str
    batch_size: int  # the global batch: samples per step over all ranks
    image_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0  # DataLoader worker processes per rank (0: read in the main process)
    seed: int = 0
    shuffle: bool = True
    skip_corrupt: bool = False  # skip (warn, count) bad samples and the unreadable rest of a broken shard
    base_url: str | None = None  # read manifest + shards from here instead of shard_dir (see shards.file_url)
    source: DataSource | None = None  # an opened data source (else opened from shard_dir / base_url)
    resize: int | None = None  # shorter side resized to this, then centre-cropped (decode.reference_transform)
    slots: int = 0  # canonical slots of the global order (0: one per shard); world_size must divide it
    micro_batches: int = 1  # a rank's share of each step comes as this many batches (gradient accumulation)


def stream_layout_error(count: int, shards: int, global_batch: int, slots: int, world: int,
                        micro_batches: int) -> str | None:
    """Why a training stream cannot have this layout (None: it can)."""
    c = slots or shards
    if c > shards:
        return f"{c} canonical slots but only {shards} shards: at most one slot per shard"
    if c % world:
        return (f"{world} workers do not divide the {c} canonical slots (data.canonical_slots; 0 = one per "
                f"shard): use a worker count that divides {c}, or re-convert with a --shard-multiple it divides")
    if global_batch % (world * micro_batches):
        return (f"the global batch {global_batch} does not split into {world} workers x {micro_batches} "
                "micro-batches (distributed.num_workers x distributed.grad_accum)")
    if count < global_batch:
        return f"{count} samples cannot fill one global batch of {global_batch}"
    return None


class _RankStream(torch.utils.data.IterableDataset):
    """One rank's samples, step by step; each loader process reads some of
    the rank's slots and yields, per step, its part of the rank's share
    with each sample's global position (see module docstring)."""

    def __init__(self, spec: StreamSpec, order: GlobalOrder, counts: list[int], urls: list[str],
                 digests: list[str | None], start_step: int, num_classes: int) -> None:
        self.spec, self.order, self.counts, self.urls, self.digests = spec, order, counts, urls, digests
        self.start_step, self.num_classes = start_step, num_classes
        self.skipped = 0  # samples skipped (data.skip_corrupt) and not yet reported with a chunk

    def _skip(self, count: int, message: str) -> None:
        self.skipped += count
        log.warning("data.skip_corrupt: skipped %d sample(s): %s", count, message)

    def _slot_samples(self, slot: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """The samples of one slot from its ``skip``-th on, forever."""
        read_in_pass, pass_epoch = 0, None
        for epoch, j, skip_in_shard in self.order.shards_from(slot, skip):
            if pass_epoch is not None and epoch != pass_epoch:
                if read_in_pass == 0:  # a whole pass over the slot's shards gave nothing: stop, do not spin
                    raise ShardError(f"rank {self.spec.rank}: none of the shards {self.order.slot_shards[slot]} of "
                                     f"canonical slot {slot} of split {self.spec.split!r} holds a readable sample "
                                     "(with fewer data.canonical_slots each slot holds more shards)")
                read_in_pass = 0
            pass_epoch = epoch
            try:  # the whole shard before any of it is used: a changed shard's digest is known at its end
                items = list(iter_shard(self.urls[j], self.spec.image_size, self.num_classes, expected=self.counts[j],
                                        on_skip=self._skip if self.spec.skip_corrupt else None,
                                        resize=self.spec.resize, sha256=self.digests[j]))
            except ShardDigestError as e:
                if not self.spec.skip_corrupt:
                    raise
                self._skip(e.good, f"{e} (the whole shard)")
                items = []
            read_in_pass += len(items)
            for p in self.order.sample_order(j, epoch, len(items))[skip_in_shard:]:
                yield items[p]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.spec.num_workers)
        mine = self.order.rank_slots(self.spec.rank, self.spec.world_size)[0 if info is None else info.id :: workers]
        g, c = self.spec.batch_size, self.order.slots
        readers = {s: self._slot_samples(s, self.order.taken(s, self.start_step * g)) for s in mine}
        size = self.spec.image_size
        for step in itertools.count(self.start_step):
            positions, items = [], []
            for s in mine:
                for q in range(self.order.taken(s, step * g), self.order.taken(s, (step + 1) * g)):
                    positions.append(q * c + s)
                    items.append(next(readers[s]))
            skipped, self.skipped = self.skipped, 0
            if items:
                imgs, labels, index = zip(*items)
                imgs, labels, index = torch.stack(imgs), torch.stack(labels), torch.tensor(index)
            else:  # a loader process without slots still answers every step
                imgs = torch.zeros(0, 3, size, size, dtype=torch.uint8)
                labels, index = torch.zeros(0, self.num_classes), torch.zeros(0, dtype=torch.int64)
            # the skip count rides with the chunk: it crosses DataLoader worker processes
            yield torch.tensor(positions, dtype=torch.int64), imgs, labels, index, torch.tensor(skipped)


class ShardStream:
    """Endless, resumable batches of one split for one rank: each step's
    share of the global batch, as ``micro_batches`` batches in position order.

    ``for batch in stream.epoch(): ...`` yields ``steps_per_epoch`` x
    ``micro_batches`` batches; ``state_dict()`` / ``load_state_dict()`` save
    and restore the position (the global step, the same at any worker count).
    """

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.source = spec.source or DataSource.open(spec.shard_dir, spec.base_url)
        self.urls = self.source.urls(spec.split)
        self.counts = self.source.counts(spec.split)
        count = self.source.count(spec.split)
        why = stream_layout_error(count, len(self.counts), spec.batch_size, spec.slots, spec.world_size,
                                  spec.micro_batches)
        if why:
            raise ValueError(f"{spec.base_url or spec.shard_dir}: split {spec.split!r}: {why}")
        self.order = GlobalOrder(self.counts, spec.slots or len(self.counts), spec.seed, spec.shuffle)
        per_rank = len(self.order.rank_slots(spec.rank, spec.world_size))
        if spec.num_workers > per_rank:
            log.warning("data.loader_workers=%d but rank %d reads %d canonical slots: %d loader process(es) idle",
                        spec.num_workers, spec.rank, per_rank, spec.num_workers - per_rank)
        self.steps_per_epoch = count // spec.batch_size
        self.share = spec.batch_size // spec.world_size  # this rank's samples per step
        self.micro_batch = self.share // spec.micro_batches
        self.steps_taken = 0
        self.skipped = 0  # corrupt samples skipped so far (data.skip_corrupt)
        self._iter: Iterator | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _open(self) -> Iterator:
        ds = _RankStream(self.spec, self.order, self.counts, self.urls, self.source.digests(self.spec.split),
                         self.steps_taken, self.source.num_classes)
        if self.spec.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.spec.num_workers, persistent_workers=False
        )
        return iter(loader)

    def _next_share(self) -> None:
        """This rank's share of the next step, from every loader process
        (the DataLoader answers them in turn), in position order."""
        if self._iter is None:
            self._iter = self._open()
        chunks = [next(self._iter) for _ in range(max(1, self.spec.num_workers))]
        positions = torch.cat([c[0] for c in chunks])
        order = torch.argsort(positions)
        imgs, labels, index = (torch.cat([c[k] for c in chunks])[order] for k in (1, 2, 3))
        self.skipped += sum(int(c[4]) for c in chunks)
        if len(index) != self.share:
            raise RuntimeError(f"rank {self.spec.rank}: step {self.steps_taken} brought {len(index)} samples, "
                               f"expected {self.share}")
        imgs = imgs.float().div_(255)
        m = self.micro_batch
        self._pending = [(imgs[k : k + m], labels[k : k + m], index[k : k + m]) for k in range(0, self.share, m)]
        self.steps_taken += 1

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._pending:
            self._next_share()
        return self._pending.pop(0)

    def epoch(self) -> Iterator[Batch]:
        return itertools.islice(self, self.steps_per_epoch * self.spec.micro_batches)

    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("the stream position is saved between steps, not within one")
        s = self.spec
        return {"steps_taken": self.steps_taken, "skipped": self.skipped, "global_batch": s.batch_size,
                "slots": self.order.slots, "seed": s.seed, "split": s.split}

    def load_state_dict(self, state: dict) -> None:
        want = {"global_batch": self.spec.batch_size, "slots": self.order.slots, "seed": self.spec.seed,
                "split": self.spec.split}
        for key, value in want.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data position was saved with {key}={state.get(key)!r}, this run has {value!r}: "
                    "the stream cannot resume in another global order"
                )
        self.steps_taken = int(state["steps_taken"])
        self.skipped = int(state.get("skipped", 0))
        self._iter, self._pending = None, []


def load_split(shard_dir: str | Path, split: str, image_size: int, base_url: str | None = None,
               shards: list[int] | None = None, resize: int | None = None) -> Batch:
    """A whole split (or some of its shards) in memory, ordered by global index:
    uint8 images N x 3 x S x S, float labels N x C, index N."""
    source = DataSource.open(str(shard_dir), base_url)
    imgs, labels, index = zip(*source.batches(split, image_size, 1 << 30, shards, resize=resize))
    imgs, labels, index = torch.cat(imgs), torch.cat(labels), torch.cat(index)
    order = torch.argsort(index)
    return imgs[order], labels[order], index[order]


def load_labels(shard_dir: str | Path, split: str, base_url: str | None = None) -> torch.Tensor:
    """Multi-hot labels N x C of a split by global index, reading only the
    metadata members of the shards (image bytes are skipped, not decoded)."""
    source = DataSource.open(str(shard_dir), base_url)
    index, labels = source.labels(split)
    out = torch.zeros(source.count(split), source.num_classes)
    out[index] = labels
    return out
