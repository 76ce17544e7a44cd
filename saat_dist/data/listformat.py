"""The DeepHash list format (docs/method.md §6).

A data set root holds, for each split in ``SPLITS``, ``<split>_img.txt`` (one
image path per line, relative to the root) and ``<split>_label.txt`` (one row
of 0/1 values per image, separated by spaces). ``test`` is the query split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "test", "database")


class DataFormatError(ValueError):
    """Bad input data; the message names the file (and line)."""


@dataclass
class SplitList:
    split: str
    paths: list[str]  # relative to the root
    labels: np.ndarray  # N x C uint8


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataFormatError(f"{path}: file is missing")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: cannot read ({e})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a trailing blank line is harmless
        lines.pop()
    return lines


def read_split(root: str | Path, split: str, num_classes: int | None = None) -> SplitList:
    """Read and check one split; raise ``DataFormatError`` naming file and line."""
    root = Path(root)
    img_file, label_file = root / f"{split}_img.txt", root / f"{split}_label.txt"
    paths = [p.strip() for p in _read_lines(img_file)]
    rows = _read_lines(label_file)
    if not paths:
        raise DataFormatError(f"{img_file}: split '{split}' is empty")
    if len(paths) != len(rows):
        raise DataFormatError(
            f"{img_file} has {len(paths)} lines but {label_file} has {len(rows)}: they must match line by line"
        )
    for n, p in enumerate(paths, 1):
        if not p:
            raise DataFormatError(f"{img_file}:{n}: empty image path")
    labels = np.zeros((len(rows), num_classes or 0), dtype=np.uint8)
    for n, row in enumerate(rows, 1):
        fields = row.split()
        if num_classes is None:
            num_classes = len(fields)
            if num_classes == 0:
                raise DataFormatError(f"{label_file}:{n}: empty label row")
            labels = np.zeros((len(rows), num_classes), dtype=np.uint8)
        if len(fields) != num_classes:
            raise DataFormatError(f"{label_file}:{n}: {len(fields)} label values, expected {num_classes}")
        bad = [f for f in fields if f not in ("0", "1")]
        if bad:
            raise DataFormatError(f"{label_file}:{n}: label values must be 0 or 1, found {bad[0]!r}")
        labels[n - 1] = [int(f) for f in fields]
    return SplitList(split, paths, labels)


def write_split(root: str | Path, split: str, paths: list[str], labels: np.ndarray) -> None:
    root = Path(root)
    (root / f"{split}_img.txt").write_text("".join(f"{p}\n" for p in paths))
    (root / f"{split}_label.txt").write_text("".join(" ".join(str(int(v)) for v in row) + "\n" for row in labels))
