"""``saat-dist experiment``: the paper's protocol over a grid of hash loss x
code length x defence x attack.

Each (hash loss, bits) pair is a *cell*, a run directory of its own under
``<output_dir>/cells/<hash>-<bits>/`` holding the benign model, one model per
defence and each model's ``robustness.json``. Cells run one stage at a time,
on Ray like every other stage (or in this process with
``distributed.num_workers=0``): benign training, every defence's training
from the benign model, then the robustness evaluation of every model (the
benign model's evaluation also scores its transfer examples on every
defence). A rerun skips what is finished: a trained model is kept, an
interrupted training continues from its newest checkpoint, and a model's
evaluation is redone only if its settings or the model changed. A cell whose
training settings changed is refused (it would mix two configurations).

Then ``experiment.json``, ``experiment.md`` and the plots are written from
the cells' results (``saat_dist.experiment_report``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from saat_dist.checkpoint import file_sha256, write_text_atomic
from saat_dist.config import ConfigError, RunConfig, config_from_dict, save_config
from saat_dist.device import select_device
from saat_dist.pipeline import _record_stage, _train, check_layout, ensure_data
from saat_dist.robustness import RESULTS, RESULTS_FORMAT, robustness_stage
from saat_dist.stages import DEFENCE_STAGES, TRAIN, model_folder

log = logging.getLogger("saat_dist")

# Config sections that determine a cell's trained models (and may not change under them) ...
TRAINING_KEYS = ("seed", "data", "model", "train", "saat", "cgat", "atrdh", "pgd_at")
# ... except these, which change how, not what, is trained.
NOT_TRAINING = ("data.loader_workers", "data.build_demo", "data.skip_corrupt")


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


def _check_cell(cfg: RunConfig, cell_dir: Path) -> None:
    """Refuse to continue a cell that was trained with other training settings."""
    path = cell_dir / "config.yaml"
    if not path.is_file():
        return
    old, new = yaml.safe_load(path.read_text()) or {}, cfg.to_dict()
    for key in TRAINING_KEYS:
        diff = _first_difference(old.get(key), new[key], key)
        if diff:
            raise ConfigError(f"{cell_dir}: this cell was trained with {diff[0]} = {diff[1]!r}, the config now says "
                              f"{diff[2]!r}; use another experiment output_dir (or remove the cell to retrain it)")


def _first_difference(old, new, key):
    if key in NOT_TRAINING:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{key}.{k}")
            if d:
                return d
        return None
    return None if old == new else (key, old, new)


def evaluation_spec(cfg: RunConfig, cell_dir: Path, folder: str, transfer_to: list[str]) -> dict:
    """What a model's robustness results depend on: the evaluation settings
    and the model files (a retrained model gets evaluated again)."""
    tree = cfg.to_dict()
    grid = ("hashes", "bits", "defences")
    return {"format": RESULTS_FORMAT, "attack": tree["attack"], "eval": tree["eval"],
            "experiment": {k: v for k, v in tree["experiment"].items() if k not in grid},
            "model": file_sha256(cell_dir / folder / "model.pt"),
            "transfer_to": {t: file_sha256(cell_dir / t / "model.pt") for t in transfer_to}}


def run_cell(cfg: RunConfig, cell_dir: Path) -> dict[str, dict]:
    """Train and evaluate every model of one cell (skipping finished work);
    returns each defence's robustness results."""
    x = cfg.experiment
    _check_cell(cfg, cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cell_dir / "config.yaml")
    defences = [d for d in x.defences if d != "none"]
    for stage in [TRAIN] + [DEFENCE_STAGES[d] for d in defences]:
        if (cell_dir / stage.out / "model.pt").is_file():
            log.info("%s: %s model present, skipping its training", cell_dir.name, stage.out)
            continue
        log.info("%s: training %s", cell_dir.name, stage.out)
        _train(cfg, stage, cell_dir, resume=True)
    results = {}
    for defence in x.defences:
        folder = model_folder(defence)
        transfer_to = [model_folder(d) for d in defences] if defence == "none" and x.transfer else []
        spec = evaluation_spec(cfg, cell_dir, folder, transfer_to)
        path = cell_dir / folder / RESULTS
        if path.is_file():
            done = json.loads(path.read_text())
            if done.get("spec") == spec:
                log.info("%s: %s evaluated with these settings, skipping", cell_dir.name, folder)
                results[defence] = done
                continue
        log.info("%s: robustness evaluation of %s%s", cell_dir.name, folder,
                 f" (transfer to {transfer_to})" if transfer_to else "")
        t = time.monotonic()
        if cfg.distributed.num_workers > 0:
            from saat_dist.distributed.driver import run_stage

            run_stage(cfg, "robustness", cell_dir, which=folder, transfer_to=transfer_to)
        else:
            robustness_stage(cfg, folder, cell_dir, 0, 1, select_device(cfg.device), ensure_data(cfg), transfer_to)
        done = json.loads(path.read_text())
        done["spec"] = spec
        write_text_atomic(path, json.dumps(done, indent=1))
        _record_stage(cell_dir, f"robustness_{folder}", time.monotonic() - t)
        results[defence] = done
    return results


def run_experiment(cfg: RunConfig) -> dict:
    """Every cell of the grid, then experiment.json / experiment.md / plots."""
    from saat_dist.experiment_report import write_experiment_report

    t0 = time.monotonic()
    source = ensure_data(cfg)  # untrusted manifests are checked before anything is written
    check_layout(cfg, source, [TRAIN, *(DEFENCE_STAGES[d] for d in cfg.experiment.defences if d != "none")])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    cells = {}
    for hash_loss in cfg.experiment.hashes:
        for bits in cfg.experiment.bits:
            cc = cell_config(cfg, hash_loss, bits)
            log.info("experiment cell %s", cell_name(hash_loss, bits))
            cells[(hash_loss, bits)] = run_cell(cc, Path(cc.output_dir))
    _record_stage(out, "experiment", time.monotonic() - t0)
    return write_experiment_report(cfg, cells, source)
