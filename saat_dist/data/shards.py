"""Shard layout shared by the writer and the readers.

A shard directory holds ``<split>-NNNNNN.tar`` WebDataset shards and a
``manifest.json``. Each sample has the original image bytes under its own
extension (``.png``, ``.jpg``...) and ``.json`` metadata: the global index of
the sample within its split, the multi-hot label and the source path.
"""

from __future__ import annotations

import json
import re
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
    if name != MANIFEST and not _SHARD_NAME.fullmatch(name):  # only validated names reach a URL or command
        raise ManifestError(f"{name!r} is not a shard name; refusing to build a URL from it")
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
    validate_manifest(manifest, where)
    return manifest


class ManifestError(ValueError):
    """A manifest that is not a well-formed saat-dist manifest; names the file and field."""


SPLITS = ("train", "test", "database")
_SHARD_NAME = re.compile(r"(train|test|database)-[0-9]{6}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate_manifest(manifest, where: str) -> None:
    """Check a manifest before any of it is used: manifests come from shared
    buckets others can write to, and shard names end up in paths and in
    ``pipe:`` shell commands. Raises ``ManifestError`` naming the field."""

    def fail(field: str, msg: str):
        raise ManifestError(f"{where}: {field}: {msg}")

    def count(value, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(field, f"expected a count (an integer >= 0), got {value!r}")
        return value

    if not isinstance(manifest, dict):
        fail("(top level)", "expected a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        fail("format/version", f"not a {FORMAT} v{VERSION} manifest")
    classes = manifest.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= 100_000:
        fail("num_classes", f"expected an integer in [1, 100000], got {classes!r}")
    sets = manifest.get("label_sets")
    if not isinstance(sets, list) or not sets:
        fail("label_sets", "expected a non-empty list of label rows")
    for i, row in enumerate(sets):
        if not isinstance(row, list) or len(row) != classes or any(v not in (0, 1) or isinstance(v, bool)
                                                                   for v in row):
            fail(f"label_sets[{i}]", f"expected {classes} values of 0 or 1")
    if len({tuple(r) for r in sets}) != len(sets):
        fail("label_sets", "repeats a label set")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or sorted(splits) != sorted(SPLITS):
        fail("splits", f"expected exactly the splits {list(SPLITS)}, got "
                       f"{sorted(splits) if isinstance(splits, dict) else splits!r}")
    for split in SPLITS:
        meta = splits[split]
        if not isinstance(meta, dict):
            fail(f"splits.{split}", "expected an object")
        total = count(meta.get("count"), f"splits.{split}.count")
        shards = meta.get("shards")
        if not isinstance(shards, list) or not shards:
            fail(f"splits.{split}.shards", "expected a non-empty list")
        seen, summed = set(), 0
        for j, shard in enumerate(shards):
            field = f"splits.{split}.shards[{j}]"
            if not isinstance(shard, dict):
                fail(field, "expected an object")
            name = shard.get("name")
            # a fixed pattern with the split's own prefix: no path separators,
            # no '..', no shell metacharacters can pass
            if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or not name.startswith(split + "-"):
                fail(f"{field}.name", f"{name!r} is not a shard name of split {split!r} "
                                      f"(expected {split}-NNNNNN.tar)")
            if name in seen:
                fail(f"{field}.name", f"{name!r} is listed twice")
            seen.add(name)
            summed += count(shard.get("count"), f"{field}.count")
            if "sha256" in shard and not (isinstance(shard["sha256"], str) and _SHA256.fullmatch(shard["sha256"])):
                fail(f"{field}.sha256", "expected 64 hex digits")
            if "first_index" in shard:
                count(shard["first_index"], f"{field}.first_index")
        if summed != total:
            fail(f"splits.{split}", f"shard counts add up to {summed}, but count says {total}")


def shard_urls(shard_dir: str | Path, manifest: dict, split: str, base_url: str | None = None) -> list[str]:
    """Shard URLs of a split: local paths, or under ``base_url`` (see ``file_url``)."""
    if split not in manifest["splits"]:
        where = base_url or shard_dir
        raise ValueError(f"{where}: the manifest has no split {split!r} (has {sorted(manifest['splits'])})")
    base = base_url or str(Path(shard_dir))
    return [file_url(base, s["name"]) for s in manifest["splits"][split]["shards"]]
