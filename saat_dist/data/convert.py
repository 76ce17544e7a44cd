"""Convert a DeepHash list-format data set into WebDataset shards.

Everything is checked before anything is written. Shards are written under a
temporary name and moved into place; ``manifest.json`` is written last, so a
directory without a manifest is never mistaken for a complete data set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import webdataset as wds
from PIL import Image

from saat_dist.checkpoint import file_sha256
from saat_dist.data.listformat import SPLITS, DataFormatError, SplitList, read_split
from saat_dist.data.shards import FORMAT, IMAGE_EXTS, MANIFEST, VERSION, sample_key, shard_name

log = logging.getLogger(__name__)


def plan_shards(count: int, shard_size: int, multiple: int) -> list[int]:
    """Balanced shard sizes: at least ceil(count / shard_size) shards, rounded
    up to a multiple of ``multiple`` (so that ranks x loader workers dividing
    it get equal work), never more shards than samples; sizes differ by <= 1."""
    n = -(-count // shard_size)
    n = -(-n // multiple) * multiple
    n = max(1, min(n, count))
    base, extra = divmod(count, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def _image_info(root: Path, rel: str, where: str) -> tuple[str, tuple[int, int]]:
    path = root / rel
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: catches truncated files
            fmt, size = (im.format or "").lower(), im.size
    except FileNotFoundError as e:
        raise DataFormatError(f"{where}: image {path} is missing") from e
    except Exception as e:  # PIL raises several types for unreadable images
        raise DataFormatError(f"{where}: image {path} is unreadable ({e})") from e
    ext = path.suffix.lower().lstrip(".") or fmt
    if ext not in IMAGE_EXTS:
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
    return ext, size


def fingerprint(root: Path) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        for kind in ("img", "label"):
            h.update((root / f"{split}_{kind}.txt").read_bytes())
    return h.hexdigest()


def _check_out_dir(out: Path, source_fp: str) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataFormatError(f"{out}: exists and is not a directory")
    manifest = out / MANIFEST
    if manifest.exists():
        theirs = json.loads(manifest.read_text()).get("source_fingerprint")
        if theirs != source_fp:
            raise DataFormatError(
                f"{out}: already holds another data set (its manifest's source differs); choose another --out"
            )
        return
    ours = [p for p in out.iterdir() if p.name.endswith((".tar", ".tmp"))]
    others = [p.name for p in out.iterdir() if p not in ours]
    if others:
        raise DataFormatError(f"{out}: not empty and not a saat-dist shard directory (holds {others[:3]})")


def _write_shard(path: Path, root: Path, lst: SplitList, exts: list[str], lo: int, hi: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # mtime fixed: the same input gives byte-identical shards.
        with wds.TarWriter(f, mtime=0.0) as sink:
            for i in range(lo, hi):
                meta = {"index": i, "label": lst.labels[i].tolist(), "path": lst.paths[i]}
                sink.write({
                    "__key__": sample_key(i),
                    exts[i]: (root / lst.paths[i]).read_bytes(),
                    "json": json.dumps(meta).encode(),
                })
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def skew_warnings(root: Path, lists: dict[str, SplitList], show: int = 3) -> list[str]:
    """Data that skews results without being malformed: queries without any
    label, and images listed both as queries and in the database or train
    list. Each warning gives counts and the first few lines."""
    out = []
    queries = lists["test"]
    empty = [n for n, row in enumerate(queries.labels, 1) if not row.any()]
    if empty:
        out.append(f"{root / 'test_label.txt'}: {len(empty)} of {len(queries.paths)} queries have no label "
                   f"(lines {', '.join(map(str, empty[:show]))}{', ...' if len(empty) > show else ''}): no "
                   "database item is relevant to them, so each counts as AP 0 in mAP")
    lines = {p: n for n, p in enumerate(queries.paths, 1)}
    for split, why in (("database", "a query that retrieves itself inflates mAP"),
                       ("train", "the model has seen these queries in training")):
        both = [p for p in lists[split].paths if p in lines]
        if both:
            first = ", ".join(f"{p} (test_img.txt:{lines[p]})" for p in both[:show])
            out.append(f"{root}: {len(both)} images are listed both as queries (test_img.txt) and in "
                       f"{split}_img.txt, e.g. {first}{', ...' if len(both) > show else ''}: {why}")
    return out


def convert(root: str | Path, out: str | Path, shard_size: int = 1000, shard_multiple: int = 12) -> dict:
    """Convert the list-format data set at ``root`` into shards under ``out``.

    Returns the manifest. Raises ``DataFormatError`` naming the file and line
    of the first problem, before writing anything.
    """
    root, out = Path(root), Path(out)
    if shard_size < 1 or shard_multiple < 1:
        raise ValueError("--shard-size and --shard-multiple must be >= 1")
    lists: dict[str, SplitList] = {}
    num_classes = None
    for split in SPLITS:
        lists[split] = read_split(root, split, num_classes)
        num_classes = lists[split].labels.shape[1]
    for warning in skew_warnings(root, lists):
        log.warning("%s", warning)
    source_fp = fingerprint(root)
    _check_out_dir(out, source_fp)

    infos: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for split, lst in lists.items():
        img_file = root / f"{split}_img.txt"
        infos[split] = [_image_info(root, p, f"{img_file}:{n}") for n, p in enumerate(lst.paths, 1)]

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # re-conversion: incomplete until rewritten
    label_sets: set[tuple[int, ...]] = set()
    splits_meta = {}
    for split, lst in lists.items():
        exts = [e for e, _ in infos[split]]
        sizes = plan_shards(len(lst.paths), shard_size, shard_multiple)
        shards, lo = [], 0
        for i, size in enumerate(sizes):
            path = out / shard_name(split, i)
            _write_shard(path, root, lst, exts, lo, lo + size)
            shards.append({"name": path.name, "count": size, "first_index": lo, "sha256": file_sha256(path)})
            lo += size
        label_sets.update(map(tuple, lst.labels.tolist()))
        sizes_seen = Counter(f"{w}x{h}" for _, (w, h) in infos[split])
        splits_meta[split] = {
            "count": len(lst.paths),
            "shards": shards,
            "image_sizes": dict(sorted(sizes_seen.items())),
            "label_set_count": len(set(map(tuple, lst.labels.tolist()))),
        }
        log.info("%s: %d samples in %d shards", split, len(lst.paths), len(shards))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_classes": int(num_classes),
        "source_fingerprint": source_fp,
        "label_sets": [list(s) for s in sorted(label_sets)],
        "splits": splits_meta,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest

