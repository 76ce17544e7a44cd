"""Run a function on W local processes joined in a gloo process group,
without Ray: for what needs several ranks but no scheduler.

The processes come from a fork server that has imported torch, DeepSpeed
and the package once (multiprocessing's "forkserver" start method): a rank
starts in milliseconds instead of importing them again (~4 s of CPU each,
measured on the 2-core machine), and is still a fresh process, never a fork
of the test process with its threads and state."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What every rank imports anyway; the fork server imports it once. Only
# imports: a module run here must not start threads or touch the environment.
# deepspeed is imported lazily by the package: named here, or every rank pays
# ~2 s of CPU. (torch._dynamo, which torch's optimizers import at their first
# call, is not needed: the package's are saat_dist.optimizers.)
PRELOAD = ["torch", "deepspeed", "saat_dist.distributed.deepspeed_setup", "saat_dist.training.trainer",
           "saat_dist.evaluation", "saat_dist.data.source", "tests.gloo"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, env: dict, fn, args: tuple, out,
           backend: str = "gloo") -> None:
    # the fork server's environment is that of its start: bring this call's
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)  # 1, as Ray Train workers (OMP_NUM_THREADS=1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        # plain pickle bytes: a queue would pass tensors as shared memory that
        # vanishes with this process
        out.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_on_group(fn, world: int, *args, threads: int = 1, backend: str = "gloo") -> list:
    """``fn(rank, world, *args)`` on ``world`` processes (a ``backend``
    process group, gloo by default, loopback, ``threads`` threads each);
    returns every rank's result. ``fn`` must be importable (a module-level
    function) and its result picklable."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    out = ctx.SimpleQueue()
    context = mp.start_processes(_entry, args=(world, _free_port(), threads, dict(os.environ), fn, args, out, backend),
                                 nprocs=world, join=False, start_method="forkserver")
    results: dict[int, tuple] = {}

    def drain() -> None:  # read while the ranks run: a large result must not block its writer
        while not out.empty():
            rank, status, value = out.get()
            results[rank] = (status, value)

    try:
        while not context.join(timeout=0.05):
            drain()
    except mp.ProcessRaisedException:
        drain()
        errors = [v for s, v in results.values() if s == "error"]
        raise AssertionError("a rank failed:\n" + (errors[0] if errors else "(no traceback)")) from None
    drain()
    return [pickle.loads(results[r][1]) for r in range(world)]
