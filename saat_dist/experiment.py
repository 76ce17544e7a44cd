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

Then ``experiment.json``, ``experiment.md``, Tables I and II as CSV and
LaTeX (``table1.csv``/``.tex``, ``table2.csv``/``.tex``), one leaderboard
entry per model (``leaderboard/<model id>.json``) and the plots (PNG and
PDF) are written from the cells' results (``saat_dist.evaluation.report``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from saat_dist.checkpoint import file_sha256, write_text_atomic
from saat_dist.config import ConfigError, RunConfig, save_config
from saat_dist.data.source import DataSource
from saat_dist.evaluation import EvaluationStage
from saat_dist.evaluation.identity import (  # noqa: F401  (re-exported: the experiment's public names)
    BEFORE_ADDED, cell_config, cell_name, evaluation_settings, manifest_digest, settings_digests, settings_sha256,
    training_settings)
from saat_dist.evaluation.results import RESULTS_FORMAT
from saat_dist.pipeline import check_layout, ensure_data, launch, record_stage, train
from saat_dist.stages import DEFENCE_STAGES, TRAIN, model_folder


log = logging.getLogger("saat_dist")



SETTINGS = "training_settings.json"


def _check_cell(cfg: RunConfig, cell_dir: Path, settings: dict, source: DataSource | None = None) -> None:
    """Refuse to continue a cell that was trained with other training settings."""
    path = cell_dir / SETTINGS
    if not path.is_file():
        return
    diff = _first_difference(json.loads(path.read_text()), settings, "",
                             training_settings(RunConfig(), source) if source is not None else None)
    if diff:
        raise ConfigError(f"{cell_dir}: this cell was trained with {diff[0]} = {diff[1]!r}, the config now says "
                          f"{diff[2]!r}; use another experiment output_dir (or remove the cell to retrain it)")


def _first_difference(old, new, key, default=None, before_added=BEFORE_ADDED):
    """The first setting that differs, as (key, old, new), or None. A key
    the old settings lack (a setting added to the code since) is the same
    when the new value is its default, and a whole section they lack (a
    defence added since) was not trained then: neither refuses a cell. A
    setting in ``before_added`` (one whose default changed the training) is
    compared with its value from before it existed instead."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            path = f"{key}.{k}" if key else k
            here = default.get(k) if isinstance(default, dict) else None
            if k not in old and path in before_added:
                old = {**old, k: before_added[path]}
            elif k not in old and (not key or (default is not None and new.get(k) == here)):
                continue
            d = _first_difference(old.get(k), new.get(k), path, here, before_added)
            if d:
                return d
        return None
    if isinstance(old, float) and isinstance(new, float) and math.isclose(old, new, rel_tol=1e-12):
        return None  # 16/255 written as 0.0627450980392157 (configs before N/255) is the same budget
    return None if old == new else (key, old, new)


def evaluation_spec(cfg: RunConfig, source: DataSource, cell_dir: Path, folder: str, transfer_to: list[str]) -> dict:
    """What a model's robustness results depend on: the evaluation settings
    and the model files (a retrained model gets evaluated again)."""
    return {"format": RESULTS_FORMAT, "settings": evaluation_settings(cfg, source),
            "model": file_sha256(cell_dir / folder / "model.pt"),
            "transfer_to": {t: file_sha256(cell_dir / t / "model.pt") for t in transfer_to}}


def run_cell(cfg: RunConfig, cell_dir: Path, source: DataSource) -> dict[str, dict]:
    """Train and evaluate every model of one cell (skipping finished work);
    returns each defence's robustness results."""
    x = cfg.experiment
    settings = training_settings(cfg, source)
    _check_cell(cfg, cell_dir, settings, source)
    cell_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cell_dir / "config.yaml")
    write_text_atomic(cell_dir / SETTINGS, json.dumps(settings, indent=1))
    defences = [d for d in x.defences if d != "none"]
    for stage in [TRAIN] + [DEFENCE_STAGES[d] for d in defences]:
        if (cell_dir / stage.out / "model.pt").is_file():
            log.info("%s: %s model present, skipping its training", cell_dir.name, stage.out)
            continue
        log.info("%s: training %s", cell_dir.name, stage.out)
        train(cfg, stage, cell_dir, resume=True)
    results = {defence: _evaluate(cfg, cell_dir, source, defence, defences) for defence in x.defences}
    if x.certify:  # certified robustness of every model, beside Table II
        from saat_dist.certification import certify_models

        for defence, c in certify_models(cfg, cell_dir, list(x.defences), source).items():
            results[defence]["certified"] = {k: v for k, v in c.items() if k != "per_query_hamming_radius"}
    return results


def _evaluate(cfg: RunConfig, cell_dir: Path, source: DataSource, defence: str, defences: list[str]) -> dict:
    """One model's results: its evaluation, unless one with these settings and
    this model file is already there."""
    folder = model_folder(defence)
    transfer_to = [model_folder(d) for d in defences] if defence == "none" and cfg.experiment.transfer else []
    stage = EvaluationStage(folder, tuple(cfg.experiment.attacks), sweep=True, transfer_to=tuple(transfer_to))
    spec = evaluation_spec(cfg, source, cell_dir, folder, transfer_to)
    path = cell_dir / folder / stage.results
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("spec") == spec:
            log.info("%s: %s evaluated with these settings, skipping", cell_dir.name, folder)
            return done
    log.info("%s: robustness evaluation of %s%s", cell_dir.name, folder,
             f" (transfer to {transfer_to})" if transfer_to else "")
    launch(cfg, stage, cell_dir, source=source)
    done = json.loads(path.read_text())
    done["spec"] = spec
    write_text_atomic(path, json.dumps(done, indent=1))
    return done


def run_experiment(cfg: RunConfig) -> dict:
    """Every cell of the grid, then experiment.json / experiment.md / tables / leaderboard / plots."""
    from saat_dist.evaluation.report import write_experiment_report

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
            cells[(hash_loss, bits)] = run_cell(cc, Path(cc.output_dir), source)
    record_stage(out, "experiment", time.monotonic() - t0)
    return write_experiment_report(cfg, cells, source)
