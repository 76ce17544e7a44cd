"""Run a function on W local processes joined in a gloo process group,
without Ray: for what needs several ranks but no scheduler."""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn, args: tuple, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)  # 1, as Ray Train workers (OMP_NUM_THREADS=1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = ("ok", fn(rank, world, *args))
    except BaseException:
        out[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_on_group(fn, world: int, *args, threads: int = 1) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes (gloo, loopback,
    ``threads`` threads each); returns every rank's result. ``fn`` must be
    importable (a module-level function) and its result picklable."""
    out = mp.Manager().dict()
    try:
        mp.spawn(_entry, args=(world, _free_port(), threads, fn, args, out), nprocs=world, join=True)
    except mp.ProcessRaisedException:
        errors = [v[1] for v in dict(out).values() if v[0] == "error"]
        raise AssertionError("a rank failed:\n" + (errors[0] if errors else "(no traceback)")) from None
    return [out[r][1] for r in range(world)]
