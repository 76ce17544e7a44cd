"""CPU-seconds of every process that runs while a command does, sampled from
/proc every 0.2 s (processes that start and end between samples are
missed): where a Ray Train job's CPU goes (workers, the controller, helper
actors, the daemons).

    python tests/process_cpu.py -- .venv/bin/saat-dist train --config configs/tiny.yaml

prints the processes with at least 0.2 CPU-seconds, most first (Linux only).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading


def _sample(seen: dict, first: bool) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()[:110]
        except OSError:
            continue
        ticks, key = int(fields[11]) + int(fields[12]), (pid, fields[19])  # utime + stime; pid and start time
        entry = seen.setdefault(key, {"cmd": cmd, "ticks": 0, "before": ticks if first else 0})
        entry["ticks"] = ticks
        entry["cmd"] = cmd or entry["cmd"]  # Ray names its workers (ray::Name) after they start


def main(argv: list[str]) -> int:
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    seen: dict = {}
    _sample(seen, first=True)  # what already ran counts from now
    proc = subprocess.Popen(command)
    done = threading.Event()
    threading.Thread(target=lambda: (proc.wait(), done.set()), daemon=True).start()
    while not done.wait(0.2):
        _sample(seen, first=False)
    _sample(seen, first=False)
    hz = os.sysconf("SC_CLK_TCK")
    rows = sorted(((e["ticks"] - e["before"]) / hz, e["cmd"], pid) for (pid, _), e in seen.items())[::-1]
    print(f"total {sum(r[0] for r in rows):.1f} CPU-s (exit {proc.returncode})")
    for cpu, cmd, pid in rows:
        if cpu >= 0.2:
            print(f"{cpu:7.2f} {pid:>7} {cmd}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
