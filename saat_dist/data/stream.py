"""Reading shards: a resumable, rank- and worker-split training stream, and
whole-split loading for evaluation.

Training stream. Rank r of W owns the shards j with j % W == r for the
whole run (``DataSource.rank_shards``), so it knows which items it trains.
Every epoch ``e`` of the data, a rank shuffles its own shards with a seed of
(seed, rank, e) and deals them round-robin to its ``num_workers`` loader
workers; each worker reads its shards in order, each shard's samples in a
seeded permutation, and cuts batches from that endless sequence. A slot never runs dry (it simply moves on to its shards
of the next data epoch), so every rank yields exactly ``steps_per_epoch``
batches per trainer epoch, computed once from the manifest as
``(split count // world_size) // batch_size``; collectives can never hang on a
rank that ran out. The position is the number of batches taken; restoring it
skips whole shards by their manifest counts instead of reading them.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from saat_dist.data.shards import IMAGE_EXTS
from saat_dist.data.source import DataSource

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images B x 3 x S x S in [0,1], labels B x C, index B


class ShardError(RuntimeError):
    """A shard could not be read; the message names the shard and the sample."""


class SampleError(ValueError):
    """One sample is unusable (missing field, undecodable image, bad label)."""


def resize_image(img_CHW: torch.Tensor, image_size: int, resize: int | None = None) -> torch.Tensor:
    """uint8 3 x S x S. ``resize`` None: resized straight to S x S. Else as
    torchvision's Resize(resize) + CenterCrop(S) (the reference's transform):
    the shorter side becomes ``resize`` (aspect kept), then the centre S x S."""
    h, w = img_CHW.shape[1:]
    if resize is None:
        size = (image_size, image_size)
    elif h <= w:
        size = (resize, int(resize * w / h))
    else:
        size = (int(resize * h / w), resize)
    if (h, w) != size:
        img_CHW = F.interpolate(img_CHW[None].float(), size=size, mode="bilinear", antialias=True,
                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
    if resize is not None:
        top, left = int(round((size[0] - image_size) / 2)), int(round((size[1] - image_size) / 2))
        img_CHW = img_CHW[:, top : top + image_size, left : left + image_size].contiguous()
    return img_CHW


def decode_sample(sample: dict, image_size: int, num_classes: int | None = None, resize: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 image 3 x S x S, float multi-hot label, global index) of one raw
    sample (``resize``: see ``resize_image``); ``SampleError`` says what is
    wrong with it."""
    if "json" not in sample:
        raise SampleError("no .json member (label and index)")
    try:
        meta = json.loads(sample["json"])
        index, label = meta["index"], meta["label"]
    except (ValueError, KeyError, TypeError) as e:
        raise SampleError(f"unreadable .json metadata ({type(e).__name__}: {e})") from e
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SampleError(f"index {index!r} is not an integer >= 0")
    if not isinstance(label, list) or any(v not in (0, 1) or isinstance(v, bool) for v in label):
        raise SampleError("label is not a list of 0/1 values")
    if num_classes is not None and len(label) != num_classes:
        raise SampleError(f"label has {len(label)} values, the data set has {num_classes} classes")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SampleError(f"no image (looked for {IMAGE_EXTS})")
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise SampleError(f"undecodable .{ext} image ({type(e).__name__}: {e})") from e
    return resize_image(img, image_size, resize), torch.tensor(label, dtype=torch.float32), index


def iter_shard(url: str, image_size: int, num_classes: int | None = None, *, expected: int | None = None,
               on_skip=None, resize: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Decoded samples of one shard, in stored order. A bad sample or an
    unreadable shard raises ``ShardError`` naming the shard and the sample
    key, unless ``on_skip(count, message)`` is given: then a bad sample is
    skipped, and so is the rest of a shard that cannot be read on (counted
    against ``expected``, the manifest's count)."""
    key, good, bad = None, 0, 0
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            key = sample.get("__key__")
            try:
                item = decode_sample(sample, image_size, num_classes, resize)
            except SampleError as e:
                message = f"shard {url}: sample {key}: {e}"
                if on_skip is None:
                    raise ShardError(message) from e
                bad += 1
                on_skip(1, message)
                continue
            good += 1
            yield item
    except ShardError:
        raise
    except Exception as e:
        where = f"after sample {key}" if key else "at its start"
        message = f"shard {url}: unreadable {where}: {type(e).__name__}: {e}"
        if on_skip is None:
            raise ShardError(message) from e
        on_skip(max(0, (expected or 0) - good - bad), message)


@dataclass
class StreamSpec:
    shard_dir: str
    split: str
    batch_size: int
    image_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0  # DataLoader worker processes (0: read in the main process)
    seed: int = 0
    shuffle: bool = True
    skip_corrupt: bool = False  # skip (warn, count) bad samples and the unreadable rest of a broken shard
    base_url: str | None = None  # read manifest + shards from here instead of shard_dir (see shards.file_url)
    source: DataSource | None = None  # an opened data source (else opened from shard_dir / base_url)
    resize: int | None = None  # shorter side resized to this, then centre-cropped to image_size (see resize_image)


class _SlotStream(torch.utils.data.IterableDataset):
    """The batches of this rank, cut per loader worker (see module docstring)."""

    def __init__(self, spec: StreamSpec, counts: list[int], urls: list[str], own: list[int],
                 start_batch: int, num_classes: int) -> None:
        self.spec, self.counts, self.urls, self.own, self.start_batch = spec, counts, urls, own, start_batch
        self.num_classes = num_classes
        self.skipped = 0  # samples skipped (data.skip_corrupt) and not yet reported with a batch

    def _worker_shards(self, worker: int, workers: int) -> Iterator[tuple[int, int]]:
        """(data epoch, shard) pairs this loader worker of this rank reads, forever."""
        for epoch in itertools.count():
            order = np.array(self.own)
            if self.spec.shuffle:
                order = np.random.default_rng([self.spec.seed, self.spec.rank, epoch]).permutation(order)
            for j in order[worker::workers]:
                yield epoch, int(j)

    def _skip(self, count: int, message: str) -> None:
        self.skipped += count
        log.warning("data.skip_corrupt: skipped %d sample(s): %s", count, message)

    def _samples(self, worker: int, workers: int, skip: int):
        pass_epoch, read_in_pass = 0, 0
        for epoch, j in self._worker_shards(worker, workers):
            if epoch != pass_epoch:
                if read_in_pass == 0:  # a whole pass over this worker's shards gave nothing: stop, do not spin
                    raise ShardError(f"rank {self.spec.rank}: none of its shards of split {self.spec.split!r} "
                                     "holds a readable sample")
                pass_epoch, read_in_pass = epoch, 0
            if skip >= self.counts[j]:  # resume: skip whole shards unread
                skip -= self.counts[j]
                read_in_pass += 1
                continue
            items = list(iter_shard(self.urls[j], self.spec.image_size, self.num_classes, expected=self.counts[j],
                                    on_skip=self._skip if self.spec.skip_corrupt else None, resize=self.spec.resize))
            read_in_pass += len(items)
            if self.spec.shuffle:
                perm = np.random.default_rng([self.spec.seed, epoch, j]).permutation(len(items))
                items = [items[p] for p in perm]
            yield from items[skip:]
            skip = 0

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        workers = max(1, self.spec.num_workers)
        wid = 0 if info is None else info.id
        # The DataLoader asks its workers round-robin starting at worker 0;
        # rotate roles so that the slot owed the next batch answers first.
        logical = (wid + self.start_batch) % workers
        done = self.start_batch // workers + (1 if logical < self.start_batch % workers else 0)
        samples = self._samples(logical, workers, done * self.spec.batch_size)
        while True:
            chunk = list(itertools.islice(samples, self.spec.batch_size))
            imgs, labels, index = zip(*chunk)
            skipped, self.skipped = self.skipped, 0
            # the skip count rides with the batch: it crosses DataLoader worker processes
            yield torch.stack(imgs).float().div_(255), torch.stack(labels), torch.tensor(index), torch.tensor(skipped)


class ShardStream:
    """Endless, resumable batches of one split for one rank.

    ``for batch in stream.epoch(): ...`` yields ``steps_per_epoch`` batches;
    ``state_dict()`` / ``load_state_dict()`` save and restore the position.
    """

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.source = spec.source or DataSource.open(spec.shard_dir, spec.base_url)
        manifest = self.source.manifest
        self.urls = self.source.urls(spec.split)
        self.counts = self.source.counts(spec.split)
        self.own = self.source.rank_shards(spec.split, spec.rank, spec.world_size)
        slots = spec.world_size * max(1, spec.num_workers)
        if len(self.urls) < slots:
            raise ValueError(
                f"{spec.shard_dir}: split {spec.split!r} has {len(self.urls)} shards, fewer than "
                f"ranks x loader workers = {slots}; re-convert with a smaller --shard-size"
            )
        per_rank = manifest["splits"][spec.split]["count"] // spec.world_size
        self.steps_per_epoch = per_rank // spec.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{spec.split}: {per_rank} samples per rank cannot fill one batch of {spec.batch_size}"
            )
        self.batches_taken = 0
        self.skipped = 0  # corrupt samples skipped so far (data.skip_corrupt)
        self._iter: Iterator[Batch] | None = None

    def _open(self) -> Iterator[Batch]:
        ds = _SlotStream(self.spec, self.counts, self.urls, self.own, self.batches_taken, self.source.num_classes)
        if self.spec.num_workers == 0:
            return iter(ds)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.spec.num_workers, persistent_workers=False
        )
        return iter(loader)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._iter is None:
            self._iter = self._open()
        *batch, skipped = next(self._iter)
        self.batches_taken += 1
        self.skipped += int(skipped)
        return tuple(batch)

    def epoch(self) -> Iterator[Batch]:
        return itertools.islice(self, self.steps_per_epoch)

    def state_dict(self) -> dict:
        s = self.spec
        return {"batches_taken": self.batches_taken, "skipped": self.skipped, "world_size": s.world_size,
                "num_workers": s.num_workers,
                "batch_size": s.batch_size, "seed": s.seed, "split": s.split}

    def load_state_dict(self, state: dict) -> None:
        s = self.spec
        for key in ("world_size", "num_workers", "batch_size", "seed", "split"):
            if state[key] != getattr(s, key):
                raise ValueError(
                    f"data position was saved with {key}={state[key]!r}, this run has {getattr(s, key)!r}: "
                    "the stream cannot resume at a different layout"
                )
        self.batches_taken = int(state["batches_taken"])
        self.skipped = int(state.get("skipped", 0))
        self._iter = None


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
