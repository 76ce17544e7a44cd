"""A pytest plugin: the machine's busy CPU-seconds during each test (setup,
call and teardown), from /proc/stat, so the Ray daemons and worker
processes a test starts count too. For finding where the suite's CPU goes:

    python -m pytest -p tests.cpu_profile tests/test_pipeline.py

writes ``cpu_profile.json`` (or ``$CPU_PROFILE_OUT``): every test's CPU-seconds
and wall seconds, most CPU first. Run one side of the suite at a time on an
otherwise idle machine: the count is system-wide (Linux only).
"""

from __future__ import annotations

import json
import os
import time

import pytest


def _busy_seconds() -> float:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


_rows: list[tuple[str, float, float]] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu, wall = _busy_seconds(), time.monotonic()
    yield
    _rows.append((item.nodeid, round(_busy_seconds() - cpu, 1), round(time.monotonic() - wall, 1)))


def pytest_sessionfinish(session):
    rows = sorted(_rows, key=lambda r: -r[1])
    out = os.environ.get("CPU_PROFILE_OUT", "cpu_profile.json")
    with open(out, "w") as f:
        json.dump({"total_cpu_s": round(sum(r[1] for r in rows), 1), "total_wall_s": round(sum(r[2] for r in rows), 1),
                   "tests": [{"test": n, "cpu_s": c, "wall_s": w} for n, c, w in rows]}, f, indent=1)
