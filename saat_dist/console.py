"""What a run prints: one log level for every process of a run (the CLI's
``--log-level``, handed to Ray's processes in the environment), and the
library noise lowered at its source unless that level is ``debug``.

At ``info`` (the default) a successful run shows the project's progress and
results; Ray Train's per-report and per-checkpoint lines, DeepSpeed's set-up
chatter and torch's "No CUDA runtime is found" notice on CPU machines are
lowered to warnings-only. ``--log-level debug`` shows every one of them.
"""

from __future__ import annotations

import logging
import os

LEVEL_ENV = "SAAT_DIST_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(message)s"

# Loggers whose INFO lines help a Ray/DeepSpeed developer, not a user of a
# run; their warnings and errors still show.
NOISY_LOGGERS = {
    "ray": logging.WARNING,
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
    "ray.tune": logging.WARNING,
    "DeepSpeed": logging.WARNING,  # deepspeed.utils.logging's logger
    "deepspeed": logging.WARNING,
    "torch.distributed": logging.WARNING,
    # "Token authentication is enabled for this Ray cluster": the secure
    # default of the local Ray this command starts, announced as a warning
    "ray._private.authentication": logging.ERROR,
    # one notice per process on CPU machines that have a CUDA toolkit but no GPU
    "torch.utils.cpp_extension": logging.ERROR,
}


def log_level(level: str | None = None) -> str:
    """``level``, else the run's (the environment's), else ``info``."""
    chosen = (level or os.environ.get(LEVEL_ENV) or "info").lower()
    if chosen not in LEVELS:
        raise ValueError(f"log level {chosen!r}: must be one of {', '.join(LEVELS)} ({LEVEL_ENV} or --log-level)")
    return chosen


def configure_logging(level: str | None = None) -> str:
    """Set this process's log level and quiet the libraries' chatter; the
    level goes into the environment so processes started from here (Ray's
    workers through ``job_env``, subprocesses) use the same."""
    chosen = log_level(level)
    os.environ[LEVEL_ENV] = chosen
    numeric = getattr(logging, chosen.upper())
    logging.basicConfig(level=numeric, format=FORMAT, datefmt="%H:%M:%S")
    logging.getLogger().setLevel(numeric)
    for name, floor in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(numeric if chosen == "debug" else max(floor, numeric))
    if chosen == "debug":  # the per-rank logger keeps INFO on every rank (training.trainer); debug shows more
        logging.getLogger("saat_dist.rank").setLevel(logging.DEBUG)
    return chosen


def is_debug() -> bool:
    return log_level() == "debug"
