"""A process pool for ``data convert``'s per-image and per-shard work, with
results in task order (so the output does not depend on the process count)."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], tasks: Iterable[T], workers: int, count: int) -> Iterator[R]:
    """``fn`` over ``count`` ``tasks`` in ``workers`` processes (1, or one
    task: in this process), results in task order. Close the iterator (or
    let it finish) to stop the pool: an error raised while consuming it
    leaves no process behind once it is closed."""
    workers = min(workers, count)
    if workers <= 1:
        yield from map(fn, tasks)
        return
    # fork where there is one: the workers start at once with the caller's
    # imports, and do not re-run the caller's script (spawn and forkserver
    # import __main__ again: a script without an `if __name__ == "__main__"`
    # guard would convert again in every worker). The workers only read
    # files, decode them with PIL and write files; they use no thread of the
    # parent.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers) as pool:
        yield from pool.imap(fn, tasks)  # in order; a few results wait in memory at most
