"""Checking the source images of ``data convert``: each decoded in full (a
truncated or damaged file fails here, at conversion, not hours into
training) to learn its format and size. PIL decodes them, as the training
stream does (``decode.decode_sample``): an image that passes here decodes
there."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

CHUNK = 64  # images per pool task: amortises the pool's messages, keeps progress fine-grained

# One image's result: (format, (width, height)) or (None, why): why is
# "is missing" or "is unreadable (...)", the end of the error's sentence.
Result = tuple[str, tuple[int, int]] | tuple[None, str]


def image_info(path: Path) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) of an image decoded in full. Raises
    ``FileNotFoundError``, or another exception that says why it is unreadable."""
    with Image.open(path) as im:
        im.load()  # decodes fully: catches truncated files
        return (im.format or "").lower(), im.size


def check_chunk(task: tuple[str, Sequence[str]]) -> list[Result]:
    """Check the images ``paths`` (relative to ``root``), in order. Every
    image is checked, bad ones included: the caller names the first."""
    root, paths = task
    out: list[Result] = []
    for rel in paths:
        try:
            out.append(image_info(Path(root) / rel))
        except FileNotFoundError:
            out.append((None, "is missing"))
        except Exception as e:  # PIL raises several types for unreadable images
            out.append((None, f"is unreadable ({e})"))
    return out
