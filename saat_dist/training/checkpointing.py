"""Where a training loop's checkpoints go: local ``step-N`` directories.

A checkpointer has ``restore()`` (a context yielding the newest complete
checkpoint directory, or None) and ``save(step, metrics, write)`` where
``write(directory)`` fills a directory with this process's files. The Ray
one (``saat_dist.distributed.ray_checkpoint``) hands the directory to
``ray.train.report``; this one keeps ``<root>/step-N`` directories for the
in-process launcher, so ``--resume`` works there too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger("saat_dist")
COMPLETE = "COMPLETE"  # written last: a directory without it is an interrupted save


class LocalCheckpointer:
    def __init__(self, root: str | Path, keep: int = 2, resume: bool = True) -> None:
        self.root, self.keep, self.resume = Path(root), keep, resume

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / COMPLETE).is_file()]
        return [p for _, p in sorted(found)]

    @contextlib.contextmanager
    def restore(self):
        done = self._complete() if self.resume else []
        yield done[-1] if done else None

    def save(self, step: int, metrics: dict, write) -> None:
        final = self.root / f"step-{step}"
        tmp = self.root / f".step-{step}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            (tmp / COMPLETE).write_text(f"{step}\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    @property
    def where(self) -> str:
        return str(self.root)
