"""Shard layout shared by the writer and the readers.

A shard directory holds ``<split>-NNNNNN.tar`` WebDataset shards and a
``manifest.json``. Each sample has the original image bytes under its own
extension (``.png``, ``.jpg``...) and ``.json`` metadata: the global index of
the sample within its split, the multi-hot label and the source path.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "saat-dist-shards"
VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "webp", "ppm", "pgm")


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def load_manifest(shard_dir: str | Path) -> dict:
    """Read and check a shard directory's manifest."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; convert a data set first with `saat-dist data convert` "
            f"(an interrupted conversion leaves no manifest)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    return manifest


def shard_urls(shard_dir: str | Path, manifest: dict, split: str, base_url: str | None = None) -> list[str]:
    """Shard URLs of a split: local paths, or under ``base_url`` (e.g. `pipe:` or s3 mirrors)."""
    if split not in manifest["splits"]:
        raise ValueError(f"{shard_dir}: the manifest has no split {split!r} (has {sorted(manifest['splits'])})")
    base = (base_url or str(Path(shard_dir))).rstrip("/")
    return [f"{base}/{s['name']}" for s in manifest["splits"][split]["shards"]]
