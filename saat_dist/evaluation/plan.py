"""What an evaluation runs, and how its work is split over the workers.

``EvaluationStage`` is the value that travels to a Ray worker: the model
folder, the attacks (``saat_dist.attacks.ATTACK_REGISTRY`` names), whether
the eps sweep runs, the models that score its transfer examples, the
results file and the mainstay attack's restarts. The helpers cut the queries into global batches (batch b on
rank b % W), read only the shards that hold a batch's queries, encode a
split one shard-bounded batch at a time and gather per-item rows in index
order: a number does not depend on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from saat_dist.comm.collectives import all_gather_ragged
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.device import Place
from saat_dist.metrics import mean_average_precision
from saat_dist.models.adapter import as_hash_model
from saat_dist.training.encode import encode

RESULTS = "robustness.json"  # the experiment's results file per model folder
RUN_RESULTS = "eval.json"  # the run's (the same format)


@dataclass(frozen=True)
class EvaluationStage:
    """One model's evaluation: a value, run the same in-process and on Ray."""

    folder: str  # the model folder in the run directory ('benign', 'saat', ...)
    attacks: tuple[str, ...]  # attack registry names, in the order reports list them
    sweep: bool = False  # run experiment.eps_sweep (the mainstay attack at every budget)
    transfer_to: tuple[str, ...] = ()  # model folders that also score the transfer generators' examples
    results: str = RESULTS  # results file written in the folder
    restarts: int = 0  # the mainstay attack's random restarts (0: attack.restarts); the run's evaluation makes one

    @property
    def name(self) -> str:
        """Run key and metrics label."""
        return f"evaluate_{self.folder}"


def random_map(query_labels: torch.Tensor, db_labels: torch.Tensor, bits: int, top_k: int, seed: int) -> float:
    """mAP of random +-1 codes: the floor below which numbers carry no meaning."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2, (len(query_labels), bits), generator=g).float() * 2 - 1
    db = torch.randint(0, 2, (len(db_labels), bits), generator=g).float() * 2 - 1
    return mean_average_precision(q, db, query_labels, db_labels, top_k)


def gather_sorted(index: torch.Tensor, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Gather (index, rows...) from every rank and order them by global index."""
    index = all_gather_ragged(index)
    order = torch.argsort(index)
    return [index[order], *(all_gather_ragged(r)[order] for r in rows)]


class Encoded(NamedTuple):
    """A split's codes (N x K) and labels (N x C), ordered by global index."""

    codes: torch.Tensor
    labels: torch.Tensor


class QueryBatch(NamedTuple):
    """One global batch of queries on this rank."""

    x: torch.Tensor  # images in [0, 1] on the device
    images: torch.Tensor  # the same as read (uint8, CPU)
    labels: torch.Tensor
    index: torch.Tensor  # global query indices


def encode_split(model: nn.Module, source: DataSource, split: str, cfg: RunConfig, place: Place) -> Encoded:
    """A whole split's codes and labels, on every rank; each rank encodes its
    own shards, one batch at a time (a batch never spans two shards, so a
    code does not depend on the worker count)."""
    model = as_hash_model(model, cfg.model.bits)  # a plain logits module: codes are the sign of its logits
    shards = source.rank_shards(split, place.rank, place.world)
    n = sum(source.counts(split)[j] for j in shards)
    # Filled in place: per-batch results kept in lists would pin the freed
    # image buffers of every batch in the allocator's heap, and peak memory
    # would grow with the split by far more than the codes.
    index = torch.empty(n, dtype=torch.int64)
    codes = torch.empty(n, cfg.model.bits)
    labels = torch.empty(n, source.num_classes)
    filled = 0
    for images, lab, idx in source.batches(split, cfg.data.image_size, cfg.eval.batch_size, shards,
                                            resize=cfg.data.resize):
        b = len(idx)
        codes[filled : filled + b] = encode(model, images, place.device, b)
        labels[filled : filled + b] = lab
        index[filled : filled + b] = idx
        filled += b
    _, codes_NK, labels_NC = gather_sorted(index[:filled], codes[:filled], labels[:filled])
    return Encoded(codes_NK, labels_NC)


def query_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of the first ``n`` queries: they are cut, in index
    order, into global batches of ``batch_size`` and batch b goes to rank
    b % world. A query's batch, and so everything computed on it, is the
    same whatever the number of workers."""
    starts = range(0, n, batch_size)
    return [list(range(s, min(n, s + batch_size))) for b, s in enumerate(starts) if b % world == rank]


def query_labels(source: DataSource) -> torch.Tensor:
    """Labels of every query in index order, from the metadata only."""
    index, labels = source.labels("test")
    return labels[torch.argsort(index)]


def iter_query_batches(source: DataSource, cfg: RunConfig, batches: list[list[int]], device):
    """Each of these query batches, reading only the query shards that hold them.
    Shards give uint8 images; in-memory queries (``evaluation.robustness``)
    may be float in [0, 1]: attacked as they are, shown as uint8."""
    for batch in batches:
        images, labels, index = source.read_items("test", batch, cfg.data.image_size, cfg.data.resize)
        if images.dtype == torch.uint8:
            yield QueryBatch(images.to(device).float().div_(255), images, labels, index)
        else:
            x = images.to(device).float()
            yield QueryBatch(x, (x.detach() * 255).round().to(torch.uint8).cpu(), labels, index)
