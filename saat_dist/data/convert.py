"""Convert a DeepHash list-format data set into WebDataset shards.

Everything is checked before anything is written. Shards are written under a
temporary name and moved into place; ``manifest.json`` is written last, so a
directory without a manifest is never mistaken for a complete data set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds

from saat_dist.checkpoint import file_sha256
from saat_dist.data.imagecheck import CHUNK, check_chunk
from saat_dist.data.listformat import SPLITS, DataFormatError, SplitList, read_split
from saat_dist.data.shards import FORMAT, IMAGE_EXTS, MANIFEST, VERSION, sample_key, shard_name
from saat_dist.data.workers import cpu_count, ordered_map
from saat_dist.progress import Progress

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


def write_shard(path: Path, root: Path, first_index: int, paths: list[str], labels: np.ndarray,
                exts: list[str]) -> None:
    """The samples ``first_index``, ``first_index + 1``, ... (their image
    paths relative to ``root``, label rows and member extensions) as the
    shard at ``path``, written under a temporary name and moved into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # mtime fixed: the same input gives byte-identical shards.
        with wds.TarWriter(f, mtime=0.0) as sink:
            for i, (rel, label, ext) in enumerate(zip(paths, labels, exts, strict=True), first_index):
                meta = {"index": i, "label": label.tolist(), "path": rel}
                sink.write({
                    "__key__": sample_key(i),
                    ext: (root / rel).read_bytes(),
                    "json": json.dumps(meta).encode(),
                })
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard_task(task: tuple[Path, Path, int, list[str], np.ndarray, list[str]]) -> str:
    """Write one shard (a pool task: it carries only its own samples); its sha256."""
    write_shard(*task)
    return file_sha256(task[0])


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


def _extension(path: str, fmt: str) -> str:
    """The member name of an image in its sample: its file's extension, else its format's."""
    ext = Path(path).suffix.lower().lstrip(".") or fmt
    if ext not in IMAGE_EXTS:
        ext = {"jpeg": "jpg"}.get(fmt, fmt)
    return ext


def _check_all(root: Path, lists: dict[str, SplitList], workers: int, every_s: float
               ) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """(extension, (width, height)) of every image of every split, decoded in
    ``workers`` processes (one pool for all splits); ``DataFormatError``
    names the first bad image by its list file and line."""
    where = [(split, n) for split, lst in lists.items() for n in range(1, len(lst.paths) + 1)]
    progress = Progress("data convert: checked", len(where), "image", every_s)
    infos: dict[str, list[tuple[str, tuple[int, int]]]] = {split: [] for split in lists}
    every_path = [p for lst in lists.values() for p in lst.paths]
    tasks = ((str(root), every_path[lo : lo + CHUNK]) for lo in range(0, len(every_path), CHUNK))
    chunks = ordered_map(check_chunk, tasks, workers, -(-len(every_path) // CHUNK))
    with contextlib.closing(chunks):  # closing: stops the pool at an error
        done = 0
        for chunk in chunks:
            for (split, line), (fmt, info) in zip(where[done : done + len(chunk)], chunk, strict=True):
                path = lists[split].paths[line - 1]
                if fmt is None:  # the first bad image in list order, whatever the process count
                    raise DataFormatError(f"{root / f'{split}_img.txt'}:{line}: image {root / path} {info}")
                infos[split].append((_extension(path, fmt), info))
            done += len(chunk)
            progress.update(len(chunk))
    return infos


def convert(root: str | Path, out: str | Path, shard_size: int = 1000, shard_multiple: int = 12, *,
            workers: int | None = None, progress_every_s: float = 10.0) -> dict:
    """Convert the list-format data set at ``root`` into shards under ``out``.

    Returns the manifest. Raises ``DataFormatError`` naming the file and line
    of the first problem, before writing anything. ``workers``: processes
    that check the images (each decoded in full) and then write the shards
    (default: one per CPU); the shards are the same bytes for any count.
    Progress (images/s, ETA) is logged every ``progress_every_s`` seconds.
    """
    root, out = Path(root), Path(out)
    if shard_size < 1 or shard_multiple < 1:
        raise ValueError("--shard-size and --shard-multiple must be >= 1")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    lists: dict[str, SplitList] = {}
    num_classes = None
    for split in SPLITS:
        lists[split] = read_split(root, split, num_classes)
        num_classes = lists[split].labels.shape[1]
    for warning in skew_warnings(root, lists):
        log.warning("%s", warning)
    source_fp = fingerprint(root)
    _check_out_dir(out, source_fp)

    workers = workers or cpu_count()
    infos = _check_all(root, lists, workers, progress_every_s)

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # re-conversion: incomplete until rewritten
    # every shard planned first: (split, name, count, first index), written in a pool, in order
    plan = []
    for split, lst in lists.items():
        lo = 0
        for i, size in enumerate(plan_shards(len(lst.paths), shard_size, shard_multiple)):
            plan.append((split, shard_name(split, i), size, lo))
            lo += size
    exts = {split: [ext for ext, _ in infos[split]] for split in lists}
    tasks = ((out / name, root, lo, lists[split].paths[lo : lo + n], lists[split].labels[lo : lo + n],
              exts[split][lo : lo + n]) for split, name, n, lo in plan)
    written = Progress("data convert: written", sum(len(lst.paths) for lst in lists.values()), "image",
                       progress_every_s)
    shards: dict[str, list[dict]] = {split: [] for split in lists}
    with contextlib.closing(ordered_map(_shard_task, tasks, workers, len(plan))) as digests:
        for (split, name, n, lo), digest in zip(plan, digests, strict=True):
            shards[split].append({"name": name, "count": n, "first_index": lo, "sha256": digest})
            written.update(n)
    label_sets: set[tuple[int, ...]] = set()
    splits_meta = {}
    for split, lst in lists.items():
        label_sets.update(map(tuple, lst.labels.tolist()))
        sizes_seen = Counter(f"{w}x{h}" for _, (w, h) in infos[split])
        splits_meta[split] = {
            "count": len(lst.paths),
            "shards": shards[split],
            "image_sizes": dict(sorted(sizes_seen.items())),
            "label_set_count": len(set(map(tuple, lst.labels.tolist()))),
        }
        log.info("%s: %d samples in %d shards", split, len(lst.paths), len(shards[split]))
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

