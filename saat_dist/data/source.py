"""A data set's shards as one object: the manifest, read once per process,
and where the shards live (a local directory or ``data.base_url``).

Everything that reads shards (the training stream, the bank set-up, the
streaming evaluation) takes a ``DataSource`` instead of re-reading the
manifest. The shard -> rank assignment is fixed here for a whole run:
rank r of W reads the shards j with j % W == r of every split, so each
process knows from the start which items it will train (and can keep only
their codes) and which queries and database items it will encode.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from saat_dist.data.decode import SampleError, ShardError, decode_sample, iter_shard, shard_samples
from saat_dist.data.shards import load_manifest, shard_urls

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels B x C, global index B


@dataclass(frozen=True)
class DataSource:
    shard_dir: str
    base_url: str | None
    manifest: dict
    verify: bool = True  # check every shard read against the manifest's sha256 (data.verify_sha256)
    _shard_items: dict = field(default_factory=dict, compare=False, repr=False)  # split -> global indices per shard

    @classmethod
    def open(cls, shard_dir: str, base_url: str | None = None, verify: bool = True) -> "DataSource":
        return cls(str(shard_dir), base_url, load_manifest(shard_dir, base_url), verify)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def label_sets(self) -> torch.Tensor:
        """The data set's distinct label sets L x C (every process numbers them alike)."""
        return torch.tensor(self.manifest["label_sets"], dtype=torch.int64)

    def count(self, split: str) -> int:
        return int(self.manifest["splits"][split]["count"])

    def counts(self, split: str) -> list[int]:
        return [int(s["count"]) for s in self.manifest["splits"][split]["shards"]]

    def urls(self, split: str) -> list[str]:
        return shard_urls(self.shard_dir, self.manifest, split, self.base_url)

    def digests(self, split: str) -> list[str | None]:
        """Each shard's sha256 as the manifest records it, to check as it is
        read (None: not checked: ``verify`` off, or a manifest without it)."""
        return [s.get("sha256") if self.verify else None for s in self.manifest["splits"][split]["shards"]]

    def rank_shards(self, split: str, rank: int, world: int) -> list[int]:
        """The shards of ``split`` that rank ``rank`` of ``world`` reads, for the whole run."""
        return list(range(rank, len(self.counts(split)), world))

    def labels(self, split: str, shards: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(global index N', labels N' x C) of the chosen shards (all: every
        item), read from the metadata members only (images are not decoded)."""
        urls, digests = self.urls(split), self.digests(split)
        chosen = range(len(urls)) if shards is None else shards
        index, labels = [], []
        for j in chosen:
            try:
                for sample in shard_samples(urls[j], digests[j], select_files=lambda name: name.endswith(".json")):
                    meta = json.loads(sample["json"])
                    index.append(int(meta["index"]))
                    labels.append(meta["label"])
            except ShardError:
                raise
            except Exception as e:
                raise ShardError(f"shard {urls[j]}: unreadable: {e}") from e
        expected = sum(self.counts(split)[j] for j in chosen)
        if len(index) != expected:
            raise ShardError(f"{self.base_url or self.shard_dir}: split {split!r} shards {list(chosen)[:5]}... "
                             f"hold {len(index)} samples, the manifest says {expected}")
        lab = torch.tensor(labels, dtype=torch.float32).reshape(len(index), self.num_classes)
        return torch.tensor(index, dtype=torch.int64), lab

    def batches(self, split: str, image_size: int, batch_size: int, shards: list[int] | None = None,
                keep=None, resize: int | None = None) -> Iterator[Batch]:
        """uint8 images B x 3 x S x S, labels and index of the chosen shards, in
        stored order, ``batch_size`` at a time: at most one batch of images is
        in memory. A batch never spans two shards, so what a batch holds does
        not depend on which other shards a process reads (batched float sums
        differ in their last bits with the batch's company). ``keep(index) ->
        bool`` filters samples by global index; ``resize`` as
        ``decode.reference_transform``."""
        urls, digests = self.urls(split), self.digests(split)
        for j in (range(len(urls)) if shards is None else shards):
            buf: list = []
            for img, label, i in iter_shard(urls[j], image_size, resize=resize, sha256=digests[j]):
                if keep is not None and not keep(i):
                    continue
                buf.append((img, label, i))
                if len(buf) == batch_size:
                    yield _stack(buf)
                    buf = []
            if buf:
                yield _stack(buf)

    def shard_items(self, split: str) -> list[range | list[int]]:
        """The global indices each shard of ``split`` holds: from the
        manifest's ``first_index`` (``data convert`` writes shards in index
        order), else read once from the shards' metadata members."""
        if split not in self._shard_items:
            shards = self.manifest["splits"][split]["shards"]
            if all("first_index" in s for s in shards):
                self._shard_items[split] = [range(int(s["first_index"]), int(s["first_index"]) + int(s["count"]))
                                            for s in shards]
            else:
                self._shard_items[split] = [self.labels(split, [j])[0].tolist() for j in range(len(shards))]
        return self._shard_items[split]

    def read_items(self, split: str, indices: list[int], image_size: int, resize: int | None = None) -> Batch:
        """uint8 images, labels and index of the items with these global
        indices, in the order given, reading only the shards that hold them."""
        wanted = {int(i): k for k, i in enumerate(indices)}
        found: dict[int, tuple] = {}
        urls, digests = self.urls(split), self.digests(split)
        for j, held in enumerate(self.shard_items(split)):
            if not any(i in wanted for i in held):
                continue
            for sample in shard_samples(urls[j], digests[j]):
                try:  # only the wanted samples are decoded
                    if int(json.loads(sample["json"])["index"]) in wanted:
                        img, label, i = decode_sample(sample, image_size, self.num_classes, resize)
                        found[i] = (img, label, i)
                except (KeyError, ValueError, TypeError, SampleError) as e:
                    raise ShardError(f"shard {urls[j]}: sample {sample.get('__key__')}: {e}") from e
        missing = [i for i in wanted if i not in found]
        if missing:
            raise ShardError(f"{self.base_url or self.shard_dir}: split {split!r} has no item with index "
                             f"{missing[0]} ({len(missing)} missing)")
        return _stack([found[int(i)] for i in indices])

    def images(self, split: str, indices, image_size: int, resize: int | None = None) -> dict[int, torch.Tensor]:
        """uint8 images 3 x S x S of the items with these global indices (one
        pass over the split's shards; only the wanted images are decoded)."""
        wanted, out = {int(i) for i in indices}, {}
        for url, digest in zip(self.urls(split), self.digests(split)):
            if len(out) == len(wanted):
                break
            for sample in shard_samples(url, digest):
                try:
                    i = int(json.loads(sample["json"])["index"])
                except (KeyError, ValueError, TypeError) as e:
                    raise ShardError(f"shard {url}: sample {sample.get('__key__')}: unreadable .json metadata") from e
                if i in wanted:
                    out[i] = decode_sample(sample, image_size, resize=resize)[0]
        return out


def _stack(items) -> Batch:
    imgs, labels, index = zip(*items)
    return torch.stack(imgs), torch.stack(labels), torch.tensor(index, dtype=torch.int64)
