"""What identifies a model's numbers: the settings that can change a trained
model or its robustness results (and nothing that cannot), their digests,
the data's manifest digest, and the run config of one cell of the
experiment's grid. The experiment refuses a cell whose training settings
changed and redoes an evaluation whose settings changed; the leaderboard
entries carry the digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from saat_dist.config import RunConfig, config_from_dict
from saat_dist.data.decode import RESIZE_TRANSFORM
from saat_dist.data.source import DataSource
from saat_dist.device import select_device
from saat_dist.stages import DEFENCE_STAGES

# What determines a cell's trained models (and may not change under them): these sections ...
TRAINING_SECTIONS = ("seed", "data", "model", "train", *DEFENCE_STAGES)
# ... but not these keys, which change where the data is or how fast it is read, not what is trained
# (the data itself is the manifest's digest) ...
NOT_TRAINING = ("data.loader_workers", "data.build_demo", "data.skip_corrupt", "data.shard_dir", "data.base_url",
                "data.verify_sha256")
# ... and these distributed settings, which do change numbers (ZeRO stages and the worker and loader
# counts do not: measured identical, or within float order with sync_batchnorm; see docs/design.md).
TRAINING_DISTRIBUTED = ("precision", "grad_accum", "gradient_clipping", "bank_sync_every", "sync_batchnorm")
# What the evaluation's numbers depend on besides the model files.
EVALUATION_SECTIONS = ("seed", "attack", "eval")
EVALUATION_DATA = ("image_size", "resize")
# Settings added to the code since cells were first trained whose default changes what is trained:
# the value that gives the training from before the setting existed. A cell written before it is
# compared with that value, not with the default (a new default must retrain, not pass unseen).
BEFORE_ADDED = {"saat_curriculum.min_side": 8}
# which cells and models exist, and whether they are also certified: not what one evaluation gives
GRID = ("hashes", "bits", "defences", "certify")


def cell_name(hash_loss: str, bits: int) -> str:
    return f"{hash_loss}-{bits}"


def cell_config(cfg: RunConfig, hash_loss: str, bits: int) -> RunConfig:
    """The run config of one cell: the experiment's, with its loss, bits and folder."""
    tree = cfg.to_dict()
    tree["train"]["loss"] = hash_loss
    tree["model"]["bits"] = bits
    tree["name"] = f"{cfg.name}-{cell_name(hash_loss, bits)}"
    tree["output_dir"] = str(Path(cfg.output_dir) / "cells" / cell_name(hash_loss, bits))
    return config_from_dict(tree)


def manifest_digest(source: DataSource) -> str:
    """sha256 of the data set's manifest (counts, label sets, every shard's sha256): the data's identity."""
    return hashlib.sha256(json.dumps(source.manifest, sort_keys=True).encode()).hexdigest()


def _device_kind(cfg: RunConfig, workers: bool) -> str:
    """Where the work runs: float results differ between a CPU and a GPU."""
    if workers:
        return "cuda" if cfg.distributed.use_gpu else "cpu"
    return select_device(cfg.device).type


def training_settings(cfg: RunConfig, source: DataSource) -> dict:
    """Every setting that can change a cell's trained models, and nothing
    that cannot: the training sections (less where the data lives and how
    fast it is read), the data's manifest digest, the distributed settings
    that change numbers, the worker count only when BatchNorm statistics
    are per worker (``sync_batchnorm: false``), and the device kind."""
    tree, d = cfg.to_dict(), cfg.distributed
    out = {key: _without(tree[key], key, NOT_TRAINING) for key in TRAINING_SECTIONS}
    out["data_manifest"] = manifest_digest(source)
    out["distributed"] = {k: getattr(d, k) for k in TRAINING_DISTRIBUTED}
    if not d.sync_batchnorm:
        out["distributed"]["num_workers"] = d.num_workers if d.elastic else max(1, d.num_workers)
    out["device"] = _device_kind(cfg, not d.in_process)
    if cfg.data.resize is not None:  # how the images were resized changes them
        out["resize_transform"] = RESIZE_TRANSFORM
    return out


def evaluation_settings(cfg: RunConfig, source: DataSource) -> dict:
    """Every setting that can change a model's robustness results besides its
    file: seed (the attacks' draws), attack, eval, the experiment's own keys
    (less the grid), the images (size, resize, the data's digest), the
    precision and the device kind. Worker, loader and port settings are not
    in it: they do not change a number (tests/test_scale_invariance.py)."""
    tree = cfg.to_dict()
    out = {key: tree[key] for key in EVALUATION_SECTIONS}
    out["experiment"] = {k: v for k, v in tree["experiment"].items() if k not in GRID}
    out["data"] = {k: tree["data"][k] for k in EVALUATION_DATA}
    out["data_manifest"] = manifest_digest(source)
    out["precision"] = cfg.distributed.precision
    out["device"] = _device_kind(cfg, not cfg.distributed.in_process)
    if cfg.data.resize is not None:
        out["resize_transform"] = RESIZE_TRANSFORM
    return out


def settings_sha256(settings: dict) -> str:
    """sha256 of a settings tree (keys sorted): equal settings, equal digest."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def settings_digests(cfg: RunConfig, source: DataSource) -> dict[str, str]:
    """The digests of a leaderboard entry: of ``training_settings``, of
    ``evaluation_settings`` and of the two together (``settings_digest``:
    every setting that can change a model's numbers besides its file)."""
    training, evaluation = training_settings(cfg, source), evaluation_settings(cfg, source)
    return {"settings_digest": settings_sha256({"training": training, "evaluation": evaluation}),
            "training_settings_sha256": settings_sha256(training),
            "evaluation_settings_sha256": settings_sha256(evaluation)}


def _without(tree, key: str, dropped: tuple[str, ...]):
    if not isinstance(tree, dict):
        return tree
    return {k: _without(v, f"{key}.{k}", dropped) for k, v in tree.items() if f"{key}.{k}" not in dropped}
