"""One JSON entry per evaluated model, in a versioned schema a leaderboard
can collect: ``<output_dir>/leaderboard/<model id>.json``, written by
``saat-dist experiment`` for every model of every cell and by ``saat-dist
run`` (and ``report``) for its benign and SAAT models.

Schema ``saat-dist/leaderboard-entry/v1`` (a change of meaning or a removed
key is a new version; a key added is not)::

  {"schema": "saat-dist/leaderboard-entry/v1",
   "id": "dph-resnet18-16-saat",     # <hash loss>-<backbone>-<bits>-<defence>: the file name
   "source": {"kind": "experiment" | "run", "name", "results", "saat_dist"},   # results: path in output_dir
   "model": {"hash_loss", "backbone", "bits", "defence", "defence_label", "sha256"},   # sha256 of model.pt
   "data": {"name", "shard_dir", "manifest_sha256", "image_size", "queries", "top_k"},
   "threat_model": {"norm": "Linf", "eps", "eps_255"},   # the evaluation budget on pixels in [0, 1]
   "clean_map": float,
   "worst_case_map": float | null,   # per query the lowest AP under any attack within eps, averaged
   "worst_case": {"attacks": [...], "lowest_by": {attack: queries}} | null,
   "strongest_attack": {"attack", "map"} | null,   # the lowest single-attack mAP over every query (>= worst case)
   "attacks": {attack: {"label", "kind", "whitebox", "eps", "iters", "restarts", "queries", "map", "tmap"}},
   "tmap": {attack: float},   # targeted attacks: t-mAP, higher = a stronger targeted attack
   "random_map": float,   # random codes: the floor of meaning
   "checks": {check: true | false | null},   # true: triggered (e.g. gradient masking), null: not run
   "settings_digest": hex | null,   # sha256 of every setting that can change a number besides the model file
   "training_settings_sha256": hex | null, "evaluation_settings_sha256": hex | null}

``data.name`` is the data set's folder (``data.shard_dir`` without a
trailing ``shards``); ``data.manifest_sha256`` identifies its content. Two
entries compare like for like when ``data.manifest_sha256``,
``threat_model.eps`` and ``evaluation_settings_sha256`` agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

from saat_dist.checkpoint import write_text_atomic

LEADERBOARD_SCHEMA = "saat-dist/leaderboard-entry/v1"
LEADERBOARD_DIR = "leaderboard"
ENTRY_KEYS = ("schema", "id", "source", "model", "data", "threat_model", "clean_map", "worst_case_map", "worst_case",
              "strongest_attack", "attacks", "tmap", "random_map", "checks", "settings_digest",
              "training_settings_sha256", "evaluation_settings_sha256")
ATTACK_KEYS = ("label", "kind", "whitebox", "eps", "iters", "restarts", "queries", "map", "tmap")


def model_id(hash_loss: str, backbone: str, bits: int, defence: str) -> str:
    """A file-name-safe id; a ``model.factory`` ("pkg.mod:build") stands as pkg.mod.build."""
    return re.sub(r"[^A-Za-z0-9_.-]+", ".", f"{hash_loss}-{backbone}-{bits}-{defence}")


def data_name(shard_dir: str) -> str:
    """The data set's folder: ``data/demo/shards`` -> demo, ``/data/nuswide-shards`` -> nuswide."""
    path = PurePosixPath(str(shard_dir).replace("\\", "/").rstrip("/"))
    name = path.parent.name if path.name == "shards" else path.name
    return name.removesuffix("-shards").removesuffix("_shards") or str(shard_dir)


def leaderboard_entry(results: dict, *, kind: str, name: str, results_path: str, hash_loss: str, backbone: str,
                      bits: int, defence: str, defence_label: str, model_sha256: str | None, shard_dir: str,
                      manifest_sha256: str | None, image_size: int, digests: dict[str, str] | None,
                      attack_labels: dict[str, str], factory: str | None = None) -> dict:
    """One model's entry from its results (robustness.json / eval.json)."""
    from saat_dist import __version__

    attacks = {a: {"label": attack_labels.get(a, a), **{k: r.get(k) for k in ATTACK_KEYS if k != "label"}}
               for a, r in results["attacks"].items()}
    worst = results.get("worst_case")
    # the single strongest attack among those run on every query (the strong check runs on the first few only:
    # its mAP is over other queries and can be lower than the worst case's)
    contenders = [a for a in (worst["attacks"] if worst else attacks)
                  if attacks[a]["map"] is not None and attacks[a]["queries"] in (None, results["queries"])]
    strongest = min(contenders, key=lambda a: attacks[a]["map"], default=None)
    digests = digests or {}
    eps = results["eps"]
    return {
        "schema": LEADERBOARD_SCHEMA,
        "id": model_id(hash_loss, factory or backbone, bits, defence),
        "source": {"kind": kind, "name": name, "results": results_path, "saat_dist": __version__},
        "model": {"hash_loss": hash_loss, "backbone": backbone, "factory": factory, "bits": bits, "defence": defence,
                  "defence_label": defence_label, "sha256": model_sha256},
        "data": {"name": data_name(shard_dir), "shard_dir": str(shard_dir), "manifest_sha256": manifest_sha256,
                 "image_size": image_size, "queries": results["queries"], "top_k": results["top_k"]},
        "threat_model": {"norm": "Linf", "eps": eps, "eps_255": round(eps * 255, 4)},
        "clean_map": results["clean_map"],
        "worst_case_map": worst["map"] if worst else None,
        "worst_case": {"attacks": worst["attacks"], "lowest_by": worst["lowest_by"]} if worst else None,
        "strongest_attack": None if strongest is None else {"attack": strongest, "map": attacks[strongest]["map"]},
        "attacks": attacks,
        "tmap": {a: r["tmap"] for a, r in attacks.items() if r["tmap"] is not None},
        "random_map": results["random_map"],
        "checks": dict(results.get("checks", {})),
        "settings_digest": digests.get("settings_digest"),
        "training_settings_sha256": digests.get("training_settings_sha256"),
        "evaluation_settings_sha256": digests.get("evaluation_settings_sha256"),
    }


def write_leaderboard(out: Path, entries: list[dict]) -> list[str]:
    """``out/leaderboard/<id>.json`` per entry; returns the paths relative to ``out``."""
    folder = Path(out) / LEADERBOARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in entries:
        write_text_atomic(folder / f"{entry['id']}.json", json.dumps(entry, indent=1))
        written.append(f"{LEADERBOARD_DIR}/{entry['id']}.json")
    return written


def read_entry(path: str | Path) -> dict:
    """A leaderboard entry, checked: its schema and every key of v1 (one-line
    ValueError naming the file and the key otherwise)."""
    path = Path(path)
    try:
        entry = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    if not isinstance(entry, dict) or entry.get("schema") != LEADERBOARD_SCHEMA:
        got = entry.get("schema") if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: schema {got!r}, expected {LEADERBOARD_SCHEMA!r}")
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{path}: key {missing[0]!r} missing")
    for a, r in entry["attacks"].items():
        gone = [k for k in ATTACK_KEYS if k not in r]
        if gone:
            raise ValueError(f"{path}: key 'attacks.{a}.{gone[0]}' missing")
    return entry
