"""Benchmarks (not tests): each case runs in a fresh process so that its peak
memory is its own, and the compared methods run side by side in one call.

  map:      mAP@5000, 2,000 queries x 200,000 database items x 64 bits,
            this package vs the plain per-query NumPy loop.
  mainstay: mainstay codes for a batch of 128, N = 1,000,000 items in 1,000
            label sets of 80 classes, 64 bits: the CodeBank's per-label-set
            table vs the dense formula over all items.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

SIZES = {
    "map": {"queries": 2000, "database": 200_000, "bits": 64, "classes": 21, "top_k": 5000},
    "mainstay": {"batch": 128, "items": 1_000_000, "label_sets": 1000, "classes": 80, "bits": 64},
}
SMALL = {
    "map": {"queries": 100, "database": 20_000, "bits": 64, "classes": 21, "top_k": 500},
    "mainstay": {"batch": 32, "items": 50_000, "label_sets": 100, "classes": 80, "bits": 64},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _map_data(s: dict):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2, (s["queries"], s["bits"]), generator=g).float() * 2 - 1
    db = torch.randint(0, 2, (s["database"], s["bits"]), generator=g).float() * 2 - 1
    ql = (torch.rand(s["queries"], s["classes"], generator=g) < 0.15).float()
    dl = (torch.rand(s["database"], s["classes"], generator=g) < 0.15).float()
    return q, db, ql, dl


def _case_map(method: str, s: dict, queue) -> None:
    from saat_dist.metrics import mean_average_precision
    from saat_dist.metrics.reference import map_per_query_numpy

    q, db, ql, dl = _map_data(s)
    if method == "numpy":
        q, db, ql, dl = q.numpy(), db.numpy(), ql.numpy(), dl.numpy()
    base = _rss_bytes()
    t = time.perf_counter()
    if method == "numpy":
        value = map_per_query_numpy(q, db, ql, dl, s["top_k"])
    else:
        value = mean_average_precision(q, db, ql, dl, s["top_k"])
    seconds = time.perf_counter() - t
    queue.put({"seconds": seconds, "peak_extra_bytes": max(0, _peak_bytes() - base), "map": value})


def _mainstay_data(s: dict):
    g = torch.Generator().manual_seed(0)
    sets = set()
    while len(sets) < s["label_sets"]:
        k = int(torch.randint(1, 5, (1,), generator=g))
        sets.add(tuple(sorted(torch.randperm(s["classes"], generator=g)[:k].tolist())))
    set_labels = torch.zeros(s["label_sets"], s["classes"], dtype=torch.int64)
    for i, cs in enumerate(sorted(sets)):
        set_labels[i, list(cs)] = 1
    item_set = torch.randint(0, s["label_sets"], (s["items"],), generator=g)
    labels = set_labels[item_set]
    codes = torch.randint(0, 2, (s["items"], s["bits"]), generator=g).float() * 2 - 1
    query = set_labels[torch.randint(0, s["label_sets"], (s["batch"],), generator=g)]
    return set_labels, labels, codes, query


def _case_mainstay(method: str, s: dict, queue) -> None:
    from saat_dist.mainstay import CodeBank, mainstay_codes_dense

    set_labels, labels, codes, query = _mainstay_data(s)
    if method == "bank":
        bank = CodeBank(labels, s["bits"], set_labels)
        bank.update(torch.arange(s["items"]), codes)  # the bank a trainer keeps up to date
    base = _rss_bytes()
    reps = 20 if method == "bank" else 1
    t = time.perf_counter()
    for _ in range(reps):
        out = bank.mainstay(query) if method == "bank" else mainstay_codes_dense(query, codes, labels)
    seconds = (time.perf_counter() - t) / reps
    update_seconds = None
    if method == "bank":  # one batch's bank update, the other per-step cost
        idx = torch.randperm(s["items"])[: s["batch"]]
        t = time.perf_counter()
        for _ in range(reps):
            bank.update(idx, -bank.codes[idx])
        update_seconds = (time.perf_counter() - t) / reps
    queue.put({"seconds": seconds, "update_seconds": update_seconds,
               "peak_extra_bytes": max(0, _peak_bytes() - base), "codes": out.tolist()})


def _in_child(fn, method: str, sizes: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(method, sizes, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_map(sizes: dict) -> dict:
    ours = _in_child(_case_map, "torch", sizes)
    ref = _in_child(_case_map, "numpy", sizes)
    return {
        "case": "mAP@k", "sizes": sizes,
        "saat_dist": ours, "numpy_per_query": ref,
        "speedup": ref["seconds"] / ours["seconds"],
        "abs_diff": abs(ours["map"] - ref["map"]),
        "peak_gib": ours["peak_extra_bytes"] / 2**30,
        "targets": {"speedup_min": 30, "peak_gib_max": 2},
    }


def bench_mainstay(sizes: dict) -> dict:
    ours = _in_child(_case_mainstay, "bank", sizes)
    ref = _in_child(_case_mainstay, "dense", sizes)
    same = ours.pop("codes") == ref.pop("codes")
    return {
        "case": "mainstay codes", "sizes": sizes,
        "code_bank": ours, "dense_formula": ref,
        "speedup": ref["seconds"] / ours["seconds"],
        "identical_codes": same,
        "targets": {"speedup_min": 100},
    }


def run_bench(which: str, out_dir: Path, small: bool = False) -> dict:
    table = SMALL if small else SIZES
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, fn in (("map", bench_map), ("mainstay", bench_mainstay)):
        if which in (name, "all"):
            res = fn(table[name])
            res["machine"] = {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                              "torch": torch.__version__, "small": small}
            (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
            results[name] = res
    return results
