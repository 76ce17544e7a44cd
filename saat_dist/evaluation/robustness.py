"""One call: a model's worst-case robustness, as ``saat-dist evaluate`` measures it.

``evaluate_robustness(model, query, database)`` runs the evaluation pipeline
of the CLI (``evaluation.stage.evaluate``: the suite's attacks, the worst case
per query, the checks) on any ``nn.Module`` whose ``forward(x)`` returns hash
logits (``models.adapter``), on in-memory tensors or on a shard directory
(``data convert`` / ``data demo`` output), and returns the dict the CLI writes
as robustness.json: ``eps`` (the budget), ``clean_map``, ``attacks`` (per
attack: its ``eps``, ``iters``, ``restarts``, ``map``, ``tmap``, ...),
``worst_case`` (``map`` and the attacks it is taken over), ``checks`` and
``check_details``, ``eps_sweep``, curves and per-query APs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from saat_dist.attacks import ATTACK_REGISTRY
from saat_dist.attacks.mainstay_pgd import eval_mode
from saat_dist.config import DEFAULT_ATTACKS, RunConfig, config_from_dict, load_config
from saat_dist.data.source import DataSource
from saat_dist.device import Place, select_device
from saat_dist.evaluation.plan import RESULTS, EvaluationStage
from saat_dist.evaluation.stage import evaluate
from saat_dist.models.adapter import as_hash_model

# The attacks of `saat-dist evaluate` on a defended model: the mainstay attack (one run), its targeted form
# and the strong check (attack.strong_factor x iters, attack.strong_restarts restarts).
EVALUATE_ATTACKS = ("mainstay", "mainstay_targeted", "mainstay_strong")

Split = tuple[torch.Tensor, torch.Tensor]  # images N x C x H x W (uint8, or float in [0, 1]), labels


class TensorSource:
    """In-memory splits with the part of ``DataSource``'s interface the
    evaluation reads; each split is one 'shard' (read by rank 0)."""

    def __init__(self, splits: dict[str, Split], num_classes: int) -> None:
        self.splits, self.num_classes = splits, num_classes

    def counts(self, split: str) -> list[int]:
        return [len(self.splits[split][1])]

    def count(self, split: str) -> int:
        return len(self.splits[split][1])

    def rank_shards(self, split: str, rank: int, world: int) -> list[int]:
        return list(range(rank, 1, world))

    def labels(self, split: str, shards: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        lab = self.splits[split][1]
        return torch.arange(len(lab)), lab

    def batches(self, split: str, image_size: int, batch_size: int, shards: list[int] | None = None,
                keep=None, resize: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        images, lab = self.splits[split]
        if shards is not None and 0 not in shards:
            return
        for s in range(0, len(lab), batch_size):
            index = torch.arange(s, min(s + batch_size, len(lab)))
            if keep is not None:
                index = index[[bool(keep(int(i))) for i in index]]
            if len(index):
                yield images[index], lab[index], index

    def read_items(self, split: str, indices: list[int], image_size: int, resize: int | None = None):
        images, lab = self.splits[split]
        index = torch.as_tensor(indices, dtype=torch.int64)
        return images[index], lab[index], index


def _split(name: str, value, num_classes: int | None) -> Split:
    """(images, labels) as the evaluation reads them: labels N x C float
    (class indices become one-hot rows of ``num_classes``)."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name}: expected (images, labels) or a shard directory, got {type(value).__name__}")
    images, labels = value
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{name}: images must be a N x C x H x W tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    labels = torch.as_tensor(labels)
    if labels.dim() == 1:
        if labels.is_floating_point() or (len(labels) and int(labels.min()) < 0):
            raise ValueError(f"{name}: 1-D labels must be class indices >= 0")
        labels = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    if labels.dim() != 2 or len(labels) != len(images):
        raise ValueError(f"{name}: labels must be N x C (multi-hot) or N class indices for {len(images)} images, "
                         f"got {tuple(labels.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"{name}: images must be uint8 or float in [0, 1], got {images.dtype}")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name}: float images must lie in [0, 1], found values in [{lo:.3g}, {hi:.3g}]")
        images = images.float()
    return images.detach().cpu(), labels.detach().cpu().float()


def _tensor_source(query, database, train) -> TensorSource:
    given = {"test": ("query", query), "database": ("database", database), "train": ("train", train or database)}
    indices = [torch.as_tensor(v[1]) for _, v in given.values() if isinstance(v, (tuple, list)) and len(v) == 2]
    one_d = [t for t in indices if t.dim() == 1 and not t.is_floating_point() and len(t)]
    num_classes = max(int(t.max()) for t in one_d) + 1 if one_d else None
    splits = {split: _split(name, value, num_classes) for split, (name, value) in given.items()}
    widths = {name: splits[split][1].shape[1] for split, (name, _) in given.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"labels: query, database and train must have the same number of classes, got {widths}")
    return TensorSource(splits, next(iter(widths.values())))


def _settings(config: str | Path | RunConfig | None, overrides: Sequence[str]) -> dict:
    if isinstance(config, RunConfig):
        if overrides:
            raise ValueError("overrides: give them with a config file (or none), not with a RunConfig")
        return config.to_dict()
    return load_config(config, list(overrides)).to_dict()


@torch.no_grad()
def _code_length(model: nn.Module, x: torch.Tensor) -> int:
    """K of the model's output on one image (eval mode: BatchNorm statistics untouched)."""
    with eval_mode(model):
        out = model(x, alpha=1.0)
    if out.dim() != 2:
        raise ValueError(f"model: forward(x) must return B x K hash logits, got shape {tuple(out.shape)}")
    if not 8 <= out.shape[1] <= 1024:
        raise ValueError(f"model: forward(x) returns {out.shape[1]} hash logits per image; codes of 8 to 1024 "
                         "bits are supported")
    return int(out.shape[1])


def _attack_names(attacks: Sequence[str] | str | None) -> tuple[str, ...]:
    """``attacks`` as names of the registry: None (``evaluate``'s set), "paper" (the experiment's), one
    name or a sequence of names."""
    if attacks is None:
        return tuple(EVALUATE_ATTACKS)
    if attacks == "paper":
        return tuple(DEFAULT_ATTACKS)
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    unknown = [a for a in names if a not in ATTACK_REGISTRY]
    if unknown or not names:
        raise ValueError(f"attacks: unknown attack(s) {unknown or names!r}; choose from "
                         f"{', '.join(sorted(ATTACK_REGISTRY))} or 'paper'")
    return names


def evaluate_robustness(model: nn.Module, query: Split | str | Path, database: Split | None = None, *,
                        train: Split | None = None, eps: float | str = 8 / 255, attacks: Sequence[str] | str | None = None,
                        iters: int | None = None, sweep: bool = True, device: str | torch.device | None = None,
                        seed: int = 0, config: str | Path | RunConfig | None = None,
                        overrides: Sequence[str] = ()) -> dict:
    """The worst-case robustness of ``model`` at L-inf budget ``eps``.

    ``model``: a hash model, or any ``nn.Module`` whose ``forward(x)`` takes
    images in [0, 1] and returns N x K hash logits (moved to ``device``).
    ``query``/``database``/``train``: (images, labels) tensors, images
    N x C x H x W uint8 or float in [0, 1], labels N x C multi-hot or N class
    indices; ``train`` (the codes that give the mainstay guide codes)
    defaults to the database. Or ``query`` is a shard directory (all three
    splits; ``database`` and ``train`` stay None). ``attacks``: registry
    names (default ``EVALUATE_ATTACKS``, those of ``saat-dist evaluate``;
    ``"paper"``: the experiment's whole default list); ``iters``: the
    mainstay attack's iterations (default ``attack.iters``, 100); ``sweep``:
    run ``experiment.eps_sweep`` (the check that mAP falls as eps grows).
    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA when visible).
    ``config``/``overrides``: a run config file and ``key=value`` settings
    as ``--config``/``--set`` (e.g. ``attack.restarts=3``, ``eval.top_k=1000``).
    Returns the dict of robustness.json (see the module docstring)."""
    t0 = time.monotonic()
    names = _attack_names(attacks)  # bad names fail before any data is read
    tree = _settings(config, overrides)
    place_device = select_device("auto" if device is None else str(device))
    if isinstance(query, (str, Path)):
        if database is not None or train is not None:
            raise ValueError("database/train: a shard directory holds every split; give only query=<directory>")
        source = DataSource.open(str(query), verify=tree["data"]["verify_sha256"])
        probe = source.read_items("test", [0], tree["data"]["image_size"], tree["data"]["resize"])[0]
    else:
        if database is None:
            raise ValueError("database: (images, labels) to retrieve from is needed with in-memory queries")
        source = _tensor_source(query, database, train)
        probe = source.read_items("test", [0], 0)[0]
    probe = probe.float().div(255) if probe.dtype == torch.uint8 else probe
    hash_model = as_hash_model(model.to(place_device))
    bits = _code_length(hash_model, probe.to(place_device))
    tree["model"]["bits"] = bits
    tree["attack"]["eps"] = eps if isinstance(eps, str) else float(eps)  # a string ("8/255") is the config's to read
    if iters is not None:
        tree["attack"]["iters"] = int(iters)
    tree["seed"] = seed
    cfg = config_from_dict(tree)
    # the default is `saat-dist evaluate`'s: one run of the mainstay attack beside the strong check; a list
    # of attacks given is run as the experiment runs it (attack.restarts)
    stage = EvaluationStage("model", names, sweep=sweep, results=RESULTS, restarts=1 if attacks is None else 0)
    res = evaluate(cfg, hash_model, source, stage, place=Place(place_device))
    res["resources"].update({"seconds": round(time.monotonic() - t0, 2), "device": str(place_device)})
    res["bits"] = bits
    return res
