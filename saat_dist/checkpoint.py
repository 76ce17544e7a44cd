"""Checkpoints: state_dicts written atomically, read with weights_only=True."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


class WriteError(OSError):
    """A write failed (disk full, permissions); names the file. The previous
    version of the file, if any, is untouched."""


def _write_atomic(path: Path, write) -> None:
    """``write(binary_file)`` into a temporary file beside ``path``, fsync,
    then rename over ``path``: readers see the old file or the new one, never
    a torn one. A failure (e.g. ENOSPC) removes the temporary file and
    raises ``WriteError`` naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        err = WriteError(f"{path}: could not be written ({os.strerror(e.errno) if e.errno else e}); "
                         "the previous version, if any, is kept")
        err.errno = e.errno
        raise err from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(state: dict, path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, nested dicts/lists) atomically."""
    _write_atomic(Path(path), lambda f: torch.save(state, f))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file (JSON, Markdown) atomically."""
    _write_atomic(Path(path), lambda f: f.write(text.encode()))


class CheckpointError(ValueError):
    """A checkpoint or model file that cannot be loaded; names the file."""


def load_state(path: str | Path, map_location="cpu") -> dict:
    """A state written by ``save_state``. Files from elsewhere are untrusted:
    ``weights_only=True`` refuses anything but tensors and plain containers,
    and a file that is not such a dict is a ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects weights_only refuses
        raise CheckpointError(f"{path}: not a loadable state file ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
