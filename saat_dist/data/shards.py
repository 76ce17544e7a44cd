"""Shard layout shared by the writer and the readers.

A shard directory holds ``<split>-NNNNNN.tar`` WebDataset shards and a
``manifest.json``. Each sample has the original image bytes under its own
extension (``.png``, ``.jpg``...) and ``.json`` metadata: the global index of
the sample within its split, the multi-hot label and the source path.
"""

from __future__ import annotations

import json
from pathlib import Path

from webdataset.gopen import gopen

MANIFEST = "manifest.json"
FORMAT = "saat-dist-shards"
VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "webp", "ppm", "pgm")


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def file_url(base_url: str, name: str) -> str:
    """The URL of one file of a shard directory served under ``base_url``.

    ``base_url`` is a prefix (``http://host/shards``, ``/mnt/shards``) or,
    when the name must sit inside a command, a template with ``{name}``
    (``pipe:aws s3 cp s3://bucket/shards/{name} -``).
    """
    if "{name}" in base_url:
        return base_url.replace("{name}", name)
    return f"{base_url.rstrip('/')}/{name}"


def load_manifest(shard_dir: str | Path, base_url: str | None = None) -> dict:
    """Read and check a data set's manifest: ``<shard_dir>/manifest.json``,
    or, when ``base_url`` is given, the manifest served beside the shards
    (read with WebDataset's opener, so `pipe:`, http(s) and paths all work)."""
    if base_url:
        where = file_url(base_url, MANIFEST)
        try:
            with gopen(where, "rb") as stream:
                text = stream.read().decode()
        except Exception as e:
            raise FileNotFoundError(f"{where}: cannot read the manifest (data.base_url={base_url!r}): {e}") from e
    else:
        path = Path(shard_dir) / MANIFEST
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no manifest; convert a data set first with `saat-dist data convert` "
                f"(an interrupted conversion leaves no manifest)"
            )
        text = path.read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{where}: not a {FORMAT} v{VERSION} manifest")
    return manifest


def shard_urls(shard_dir: str | Path, manifest: dict, split: str, base_url: str | None = None) -> list[str]:
    """Shard URLs of a split: local paths, or under ``base_url`` (see ``file_url``)."""
    if split not in manifest["splits"]:
        where = base_url or shard_dir
        raise ValueError(f"{where}: the manifest has no split {split!r} (has {sorted(manifest['splits'])})")
    base = base_url or str(Path(shard_dir))
    return [file_url(base, s["name"]) for s in manifest["splits"][split]["shards"]]
