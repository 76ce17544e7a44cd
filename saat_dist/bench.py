"""Benchmarks (not tests): each case runs in a fresh process so that its peak
memory is its own (forked from a server that has only imported the package),
and the compared methods run side by side in one call.

  map:      mAP@5000, 2,000 queries x 200,000 database items x 64 bits,
            this package vs the plain per-query NumPy loop.
  mainstay: mainstay codes for a batch of 128, N = 1,000,000 items in 1,000
            label sets of 80 classes, 64 bits: the CodeBank's per-label-set
            table vs the dense formula over all items.
  saat-step: SAAT training steps per second (small_cnn, 32 px, batch 32,
            32 bits, DPH, 7 inner PGD iterations) with a code bank of
            N = 1e4, 1e5, 1e6 items in 500 label sets of 21 classes: the
            N-independent path (Gram matrix + label-set table) beside the
            O(N) formula over all bank codes, with their losses compared.
  soak:     the whole demo (`saat-dist run --config configs/demo.yaml`) with a
            real Prometheus (Debian's `prometheus` on 127.0.0.1) scraping
            every worker every second: failed scrapes over the run, and every
            worker's resident memory at each training epoch end.
  eval:     the streaming evaluation on 2 Ray workers of databases of
            50,000 and 200,000 images at 32 px (real MNIST-mosaic images,
            repeated): wall time and peak RSS of every rank.
  stream:   one training worker's stream (1 thread, no loader process), in
            images/s: from disk and from an HTTP server (a separate
            process on 127.0.0.1), with and without the shards' sha256
            check, for the demo's PNG mosaics at 32 px and 500 x 375 JPEG
            photos decoded, resized to 256 and centre-cropped to 224 (the
            reference's transform); beside it the bytes alone (reading the
            shards, no decoding) and the decoding alone (samples in memory),
            which say where the limit is.
  convert:  `data convert` of a list of small JPEGs (sides 100-256 px) in
            images/s: the pre-#18 serial loop (copied here) beside today's
            (images checked in a process pool, one process per CPU), with
            their shards compared byte for byte.
  modes:    every training mode's step on the demo model, side by side in
            one process: seconds per batch, passes per sample (counted), and
            both against SAAT's (issue 19).
  cost:     training cost at scale (issue 19, saat_dist.cost_model): FLOPs
            per image (FlopCounterMode) of the demo's small_cnn at 32 px,
            AlexNet and ResNet-50 at 224 px, and the hours of SAAT and its
            fast modes on NUS-WIDE (AlexNet) and ImageNet-1k (ResNet-50) on
            8 H200 at MFU 0.4; passes per mode from the formula, or measured
            ones from the train.json files under $SAAT_COST_FROM.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import time
from pathlib import Path

import torch

from saat_dist import optimizers

SIZES = {
    "map": {"queries": 2000, "database": 200_000, "bits": 64, "classes": 21, "top_k": 5000},
    "mainstay": {"batch": 128, "items": 1_000_000, "label_sets": 1000, "classes": 80, "bits": 64},
}
SIZES["saat-step"] = {"items": [10_000, 100_000, 1_000_000], "label_sets": 500, "classes": 21, "batch": 32,
                      "bits": 32, "image_size": 32, "steps": 20, "warmup": 3}
SIZES["soak"] = {"config": "configs/demo.yaml", "overrides": []}
SIZES["eval"] = {"database": [50_000, 200_000], "queries": 100, "workers": 2, "attack_iters": 5}
SIZES["convert"] = {"images": 20_000, "sides": [100, 256], "jpeg_quality": 90, "classes": 21, "shard_size": 1000,
                    "rounds": 2}
SIZES["stream"] = {"images": 1024, "batch": 32, "shards": 16, "photo": [500, 375], "jpeg_quality": 90,
                   "rounds": 3}
_COST_TABLES = {"nus-wide": {"backbone": "alexnet", "image_size": 224, "bits": 64, "images": 10_500},
                "imagenet-1k": {"backbone": "resnet50", "image_size": 224, "bits": 64, "images": 1_281_167}}
SIZES["cost"] = {"models": [{"backbone": "small_cnn", "image_size": 32, "bits": 32},
                            {"backbone": "alexnet", "image_size": 224, "bits": 64},
                            {"backbone": "resnet50", "image_size": 224, "bits": 64}],
                 # the epochs (SAAT's), each mode's passes and the curriculum's phases: the defences' config
                 # defaults (cost_model.mode_defaults)
                 "tables": _COST_TABLES, "gpus": 8, "peak_tflops": 989.0, "mfu": 0.4}
# issue 20: certificates at the paper's size (NUS-WIDE's 2,100 queries, AlexNet at 224 px) on one GPU
SIZES["cost"]["certify"] = {"nus-wide": {"backbone": "alexnet", "image_size": 224, "queries": 2_100, "settings": {
    "reference": {"n_center": 10_000, "n_certify": 1_000_000}, "demo": {"n_center": 1_500, "n_certify": 4_000}}}}
SIZES["modes"] = {"config": "configs/demo.yaml", "batch": 64, "items": 2_000, "steps": 4, "rounds": 3,
                  "modes": ["saat", "saat_fgsm", "saat_free", "saat_curriculum", "cgat", "pgd_at"]}
SMALL = {
    "map": {"queries": 100, "database": 20_000, "bits": 64, "classes": 21, "top_k": 500},
    "mainstay": {"batch": 32, "items": 50_000, "label_sets": 100, "classes": 80, "bits": 64},
    "soak": {"config": "configs/tiny.yaml", "overrides": ["data.shard_dir=runs/soak-small-data/shards"]},
    "eval": {"database": [600, 2_400], "queries": 16, "workers": 2, "attack_iters": 2},
    "saat-step": {"items": [2_000, 20_000], "label_sets": 50, "classes": 21, "batch": 8, "bits": 16,
                  "image_size": 32, "steps": 2, "warmup": 1},
    "stream": {"images": 64, "batch": 16, "shards": 4, "photo": [500, 375], "jpeg_quality": 90, "rounds": 1},
    "convert": {"images": 300, "sides": [100, 256], "jpeg_quality": 90, "classes": 21, "shard_size": 50,
                "rounds": 1},
    "modes": {"config": "configs/tiny.yaml", "batch": 8, "items": 200, "steps": 1, "rounds": 1,
              "modes": ["saat", "saat_fgsm", "saat_free", "saat_curriculum"]},
    # AlexNet counted on the meta device (shapes only: the same counts, without initialising 61 M weights),
    # ResNet-50 at 32 px on the CPU (quicker than meta's decompositions): the ImageNet table of a small run
    # is not the target's
    "cost": {**SIZES["cost"], "device": "meta",
             "models": [*SIZES["cost"]["models"][:2],
                        {"backbone": "resnet50", "image_size": 32, "bits": 64, "device": "cpu"}],
             "tables": {**_COST_TABLES, "imagenet-1k": {**_COST_TABLES["imagenet-1k"], "image_size": 32}}},
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


def _case_saat_step(method: str, s: dict, queue) -> None:
    """SAAT steps with a bank of s["n"] items; ``method``: "bank" (the
    N-independent DPH path) or "formula" (the O(N) formula over all codes)."""
    from saat_dist.hashing import DPHLoss
    from saat_dist.mainstay import CodeBank
    from saat_dist.models import build_hash_model
    from saat_dist.training import SAATSettings, TorchStepper, saat_step

    g = torch.Generator().manual_seed(0)
    set_labels, labels, codes, _ = _mainstay_data({**s, "items": s["n"], "batch": 1})
    bank = CodeBank(labels, s["bits"], set_labels)
    bank.update(torch.arange(s["n"]), codes[:, : s["bits"]])
    bank.take_pending()
    loss_fn = DPHLoss()
    loss_fn.use_stats = method == "bank"
    torch.manual_seed(0)
    model = build_hash_model("small_cnn", s["bits"])
    stepper = TorchStepper(optimizers.SGD(model.parameters(), lr=0.05, weight_decay=1e-5))
    settings = SAATSettings(eps=8 / 255, step_size=2 / 255, iters=7)

    def batch():
        idx = torch.randint(0, s["n"], (s["batch"],), generator=g)
        x = torch.rand(s["batch"], 3, s["image_size"], s["image_size"], generator=g)
        return x, labels[idx].float(), idx

    # the loss of both paths on the same codes, before any training step
    u = torch.randn(s["batch"], s["bits"], generator=g).tanh()
    y = labels[:s["batch"]].float()
    loss_value = float((loss_fn.from_stats(u, y, *bank.dph_stats()) if method == "bank"
                        else loss_fn(u, y, bank.codes, bank.labels))[0])
    batches = [batch() for _ in range(s["warmup"] + s["steps"])]
    model.train()
    first = []
    for i, b in enumerate(batches[: s["warmup"]]):
        first.append(float(saat_step(model, stepper, b, bank, loss_fn, settings, i)["loss"]))
    t = time.perf_counter()
    for i, b in enumerate(batches[s["warmup"]:]):
        out = saat_step(model, stepper, b, bank, loss_fn, settings, s["warmup"] + i, check=False)
    float(out["loss"])
    seconds = time.perf_counter() - t
    queue.put({"images_per_second": s["steps"] * s["batch"] / seconds, "seconds_per_step": seconds / s["steps"],
               "loss_on_fixed_codes": loss_value, "first_step_losses": first,
               "peak_rss_gib": _peak_bytes() / 2**30})


def bench_saat_step(sizes: dict) -> dict:
    rows = []
    for n in sizes["items"]:
        case = {**sizes, "n": n}
        bank = _in_child(_case_saat_step, "bank", case)
        formula = _in_child(_case_saat_step, "formula", case)
        rows.append({"items": n, "code_bank": bank, "o_n_formula": formula,
                     "speedup": bank["images_per_second"] / formula["images_per_second"],
                     "loss_rel_diff": abs(bank["loss_on_fixed_codes"] - formula["loss_on_fixed_codes"])
                     / abs(formula["loss_on_fixed_codes"])})
    base = rows[0]["code_bank"]["images_per_second"]
    return {
        "case": "SAAT step vs bank size", "sizes": sizes, "rows": rows,
        "largest_vs_smallest": rows[-1]["code_bank"]["images_per_second"] / base,
        "max_loss_rel_diff": max(r["loss_rel_diff"] for r in rows),
        "targets": {"largest_vs_smallest_min": 0.8, "loss_rel_diff_max": 1e-6},
    }


def _big_database(base: Path, out: Path, count: int) -> None:
    """``base``'s shards with the database split replaced by ``count`` samples
    that repeat ``base``'s database images and labels (real images, any size)."""
    import shutil
    import tarfile

    import webdataset as wds

    from saat_dist.data.shards import MANIFEST, shard_name
    from saat_dist.data.source import DataSource

    src = DataSource.open(str(base))
    shutil.copytree(base, out)
    samples = []
    for url in src.urls("database"):
        with tarfile.open(url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({n.rsplit(".", 1)[0] for n in members})
        samples += [(members[k + ".png"], json.loads(members[k + ".json"])) for k in keys]
    for old in out.glob("database-*.tar"):
        old.unlink()
    per_shard, shards = 5000, []
    for s in range(0, count, per_shard):
        name = shard_name("database", len(shards))
        with open(out / name, "wb") as f, wds.TarWriter(f) as sink:
            for i in range(s, min(count, s + per_shard)):
                png, meta = samples[i % len(samples)]
                sink.write({"__key__": f"{i:08d}", "png": png,
                            "json": json.dumps({**meta, "index": i}).encode()})
        shards.append({"name": name, "count": min(count, s + per_shard) - s, "first_index": s})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["splits"]["database"] = {**manifest["splits"]["database"], "count": count, "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest))


def bench_eval(sizes: dict) -> dict:
    """Each size runs `saat-dist evaluate` in a fresh process (its own local Ray)."""
    import subprocess
    import sys
    import tempfile

    from saat_dist.config import load_config
    from saat_dist.data.demo import DemoSpec, build_demo
    from saat_dist.models.model_file import build_model, save_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="saat-bench-eval-") as tmp:
        tmp = Path(tmp)
        build_demo(tmp / "base", DemoSpec(train=480, query=max(48, sizes["queries"]), database=1000, seed=5,
                                          shard_size=40))
        for n in sizes["database"]:
            shards = tmp / f"db{n}"
            _big_database(tmp / "base" / "shards", shards, n)
            run = tmp / f"run{n}"
            overrides = [f"output_dir={run}", f"data.shard_dir={shards}", "data.build_demo=false",
                         f"distributed.num_workers={sizes['workers']}", f"eval.num_queries={sizes['queries']}",
                         f"attack.iters={sizes['attack_iters']}", "eval.top_k=5000", "model.bits=32"]
            cfg = load_config(None, overrides)
            save_model(cfg.model, run / "benign" / "model.pt",
                       {k: v.cpu() for k, v in build_model(cfg.model, cfg.seed, torch.device("cpu")).state_dict().items()}, 0)
            t = time.perf_counter()
            args = [sys.executable, "-m", "saat_dist.cli", "evaluate", "--which", "benign"]
            proc = subprocess.run([*args, *sum((["--set", o] for o in overrides), [])],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"evaluate failed for database {n}: {proc.stderr[-3000:]}")
            res = json.loads((run / "benign" / "eval.json").read_text())
            rows.append({"database": n, "command_seconds": time.perf_counter() - t, **res["resources"],
                         "codes_mib": n * cfg.model.bits * 4 / 2**20, "clean_map": res["clean_map"]})
    growth = [b - a for a, b in zip(rows[0]["peak_rss_mib_per_rank"], rows[-1]["peak_rss_mib_per_rank"])]
    return {"case": "streaming evaluation", "sizes": sizes, "rows": rows,
            "peak_rss_growth_mib_per_rank": growth,
            "codes_growth_mib": rows[-1]["codes_mib"] - rows[0]["codes_mib"],
            "images_growth_mib_if_held": (rows[-1]["database"] - rows[0]["database"]) * 3 * 32 * 32 / 2**20}


def _prometheus_query(api: str, expr: str) -> list:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=30) as r:
        return json.loads(r.read())["data"]["result"]


def bench_soak(sizes: dict) -> dict:
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile

    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("bench soak needs Prometheus (Debian package `prometheus`; launch/test.sh installs it)")
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="saat-soak-") as tmp:
        tmp = Path(tmp)
        run = tmp / "run"
        config = yaml.safe_load((repo / "cluster/monitoring/prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (job,) = config["scrape_configs"]
        job["file_sd_configs"] = [{"files": [str(run / "metrics" / "*.json")], "refresh_interval": "1s"}]
        config["rule_files"] = [str(repo / "cluster/monitoring/alerts.yml")]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        prom = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            t, t_wall = time.perf_counter(), time.time()
            argv = [sys.executable, "-m", "saat_dist.cli", "run", "--config", str(repo / sizes["config"]),
                    "--set", f"output_dir={run}", *sum((["--set", o] for o in sizes["overrides"]), [])]
            proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"the soak run failed: {proc.stderr[-3000:]}")
            time.sleep(3)
            window = f"{int(seconds) + 120}s"
            api = f"http://127.0.0.1:{port}"
            scrapes = _prometheus_query(api, f'sum(count_over_time(up{{job="saat-dist"}}[{window}]))')
            ok = _prometheus_query(api, f'sum(sum_over_time(up{{job="saat-dist"}}[{window}]))')
            firing = _prometheus_query(api, f'sum(count_over_time(ALERTS{{alertstate="firing"}}[{window}]))')
            # where the failed scrapes were: instance, stage, seconds into the run
            failed = _prometheus_query(api, f'(up{{job="saat-dist"}} == 0)[{window}:1s]')
            failures = [{"instance": f["metric"].get("instance"), "stage": f["metric"].get("stage"),
                         "rank": f["metric"].get("rank"),
                         "at_s": [round(float(v[0]) - t_wall, 1) for v in f["values"]]} for f in failed]
        finally:
            prom.terminate()
            prom.wait(30)
        total, good = float(scrapes[0]["value"][1]), float(ok[0]["value"][1])
        rss = {stage: json.loads((run / stage / "train.json").read_text())["epoch_rss_mib_per_rank"]
               for stage in ("benign", "saat")}
        report = json.loads((run / "report.json").read_text())
    saat = rss["saat"]
    later = saat[1:]  # SAAT epochs 2..E
    per_rank = [[epoch[r] for epoch in later] for r in range(len(later[0]))] if later else []
    return {"case": "soak: the demo under a 1 s Prometheus scrape", "sizes": sizes, "run_seconds": seconds,
            "scrapes": total, "failed_scrapes": total - good, "failed_scrape_times": failures, "alerts_fired": float(firing[0]["value"][1]) if firing else 0.0,
            "epoch_rss_mib_per_rank": rss,
            "saat_rss_growth_epochs_2_on_per_rank": [max(r) / min(r) - 1 for r in per_rank],
            "report": {k: report[k] for k in ("random_map", "stage_seconds")} | {
                s: {k: report[s][k] for k in ("clean_map", "attacked_map")} for s in ("benign", "saat")},
            "targets": {"failed_scrapes_max": 0, "saat_rss_growth_max": 0.10}}


# What the cases import; their processes fork from a server that imported it
# once (a fresh process, not a fork of this one, without ~4 s of imports each).
CHILD_PRELOAD = ["torch", "saat_dist.hashing", "saat_dist.mainstay", "saat_dist.metrics",
                 "saat_dist.metrics.reference", "saat_dist.models", "saat_dist.training"]


def _in_child(fn, method: str, sizes: dict) -> dict:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(CHILD_PRELOAD)
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


def _stream_data(tmp: Path, s: dict) -> dict[str, dict]:
    """The same ``s["images"]`` train items twice: the demo's PNG mosaics
    (read at 32 px), and as JPEG photos of ``s["photo"]`` pixels (each mosaic
    upscaled, with noise so that it compresses like a photo; read as the
    reference does: shorter side to 256, centre 224 x 224)."""
    import numpy as np
    from PIL import Image

    from saat_dist.data.convert import convert
    from saat_dist.data.demo import DemoSpec, build_demo

    n = s["images"]
    build_demo(tmp / "demo", DemoSpec(train=n, query=8, database=16, seed=5, shard_size=-(-n // s["shards"])))
    src, photos = tmp / "demo" / "list", tmp / "photos"
    rng = np.random.default_rng(0)
    (photos / "img").mkdir(parents=True)
    for split in ("train", "test", "database"):
        rel = (src / f"{split}_img.txt").read_text().split()
        out = []
        for k, path in enumerate(rel):
            img = Image.open(src / path).convert("RGB").resize(tuple(s["photo"]), Image.BILINEAR)
            noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-24, 25, (*img.size[::-1], 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(photos / "img" / f"{split}_{k}.jpg", quality=s["jpeg_quality"])
            out.append(f"img/{split}_{k}.jpg")
        (photos / f"{split}_img.txt").write_text("\n".join(out) + "\n")
        (photos / f"{split}_label.txt").write_text((src / f"{split}_label.txt").read_text())
    convert(photos, tmp / "photo-shards", shard_size=-(-n // s["shards"]), shard_multiple=1)
    return {"png_32": {"shard_dir": tmp / "demo" / "shards", "image_size": 32, "resize": None},
            "jpeg_224": {"shard_dir": tmp / "photo-shards", "image_size": 224, "resize": 256}}


def _stream_rate(source, data: dict, batch: int) -> float:
    """Images per second of one epoch of a 1-rank training stream."""
    from saat_dist.data.stream import ShardStream, StreamSpec

    stream = ShardStream(StreamSpec(shard_dir=source.shard_dir, split="train", batch_size=batch,
                                    image_size=data["image_size"], resize=data["resize"], source=source,
                                    base_url=source.base_url))
    t = time.perf_counter()
    images = sum(len(b[2]) for b in stream.epoch())
    return images / (time.perf_counter() - t)


def _bytes_rate(source) -> float:
    """Samples per second of the train shards' bytes alone, through the same reader (no decoding)."""
    from saat_dist.data.decode import shard_samples

    t = time.perf_counter()
    samples = sum(1 for url, digest in zip(source.urls("train"), source.digests("train"))
                  for _ in shard_samples(url, digest))
    return samples / (time.perf_counter() - t)


def _decode_rate(source, data: dict) -> float:
    """Decoding alone (image decode, resize, crop) of samples already in memory."""
    from saat_dist.data.decode import decode_sample, shard_samples

    samples = [x for url in source.urls("train") for x in shard_samples(url)]
    t = time.perf_counter()
    for sample in samples:
        decode_sample(sample, data["image_size"], resize=data["resize"])
    return len(samples) / (time.perf_counter() - t)


def _http_server(directory: Path):
    """``python -m http.server`` on 127.0.0.1 serving ``directory``, in its own process."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/manifest.json", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the HTTP server for {directory} did not start")


def bench_stream(sizes: dict) -> dict:
    """Each path ``sizes["rounds"]`` times, interleaved (a round visits the
    paths in a rotated order): medians, with the spread."""
    import statistics
    import tempfile

    from saat_dist.data.source import DataSource

    paths = [(where, verify) for where in ("disk", "http") for verify in (True, False)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one training worker's CPU (Ray's cpus_per_worker: 1)
    rows, parts = [], {}
    try:
        with tempfile.TemporaryDirectory(prefix="saat-bench-stream-") as tmp:
            for kind, data in _stream_data(Path(tmp), sizes).items():
                server, url = _http_server(data["shard_dir"])
                stream, raw = {p: [] for p in paths}, {p: [] for p in paths}
                decode = []
                try:
                    for r in range(sizes["rounds"]):
                        for where, verify in paths[r % len(paths):] + paths[: r % len(paths)]:
                            source = DataSource.open(str(data["shard_dir"]), url if where == "http" else None, verify)
                            stream[(where, verify)].append(_stream_rate(source, data, sizes["batch"]))
                            raw[(where, verify)].append(_bytes_rate(source))
                        decode.append(_decode_rate(DataSource.open(str(data["shard_dir"])), data))
                finally:
                    server.kill()
                    server.wait()
                for where, verify in paths:
                    rows.append({"data": kind, "from": where, "sha256_check": verify,
                                 "images_per_second": statistics.median(stream[(where, verify)]),
                                 "images_per_second_all": stream[(where, verify)],
                                 "bytes_alone_samples_per_second": statistics.median(raw[(where, verify)])})
                parts[kind] = {"decode_alone_images_per_second": statistics.median(decode)}
    finally:
        torch.set_num_threads(threads)

    def med(kind, where, verify, key="images_per_second"):
        return next(r[key] for r in rows if (r["data"], r["from"], r["sha256_check"]) == (kind, where, verify))

    for kind, part in parts.items():
        full = med(kind, "http", True)
        part["stream_vs_decode_alone"] = full / part["decode_alone_images_per_second"]
        part["http_vs_disk"] = full / med(kind, "disk", True)
        # the check's share of a streamed image's time, from the bytes-alone
        # rates (cheap to time well) rather than two noisy stream rates
        part["sha256_check_share_of_stream_time"] = {w: max(0.0, (
            1 / med(kind, w, True, "bytes_alone_samples_per_second")
            - 1 / med(kind, w, False, "bytes_alone_samples_per_second")) * med(kind, w, True)) for w in ("disk", "http")}
        part["loader_processes_per_1000_images_per_second"] = 1000 / full
    return {"case": "training stream of one worker", "sizes": sizes, "rows": rows, "by_data": parts,
            "note": "loader_processes_per_1000_images_per_second: data.loader_workers one worker needs per "
                    "1,000 images/s its accelerator's SAAT step consumes (each a CPU like the one measured)"}


def _convert_list(root: Path, s: dict) -> None:
    """A DeepHash list of ``s["images"]`` JPEGs, each side drawn from
    ``s["sides"]``, blocky with noise (compresses like a photo): 50 % train,
    10 % test, 40 % database."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    n = s["images"]
    counts = {"train": n // 2, "test": n // 10}
    counts["database"] = n - counts["train"] - counts["test"]
    for split, count in counts.items():
        paths = []
        for k in range(count):
            w, h = rng.integers(s["sides"][0], s["sides"][1] + 1, 2)
            blocks = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            img = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w].astype(np.int16)
            img = np.clip(img + rng.integers(-24, 25, img.shape), 0, 255).astype(np.uint8)
            paths.append(f"img/{split}_{k}.jpg")
            Image.fromarray(img).save(root / paths[-1], quality=s["jpeg_quality"])
        labels = (rng.random((count, s["classes"])) < 0.15).astype(int)
        (root / f"{split}_img.txt").write_text("".join(f"{p}\n" for p in paths))
        (root / f"{split}_label.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in labels))


def _convert_before_18(root: Path, out: Path, shard_size: int) -> None:
    """`data convert` before issue #18 (copied): every image decoded with PIL
    one after another, then the shards written one after another (the
    writer of one shard is unchanged)."""
    from PIL import Image

    from saat_dist.data.convert import plan_shards, write_shard
    from saat_dist.data.listformat import SPLITS, read_split
    from saat_dist.data.shards import IMAGE_EXTS, shard_name

    def image_info(path: Path) -> tuple[str, tuple[int, int]]:
        with Image.open(path) as im:
            im.load()
            fmt, size = (im.format or "").lower(), im.size
        ext = path.suffix.lower().lstrip(".") or fmt
        return (ext if ext in IMAGE_EXTS else {"jpeg": "jpg"}.get(fmt, fmt)), size

    lists = {split: read_split(root, split) for split in SPLITS}
    infos = {split: [image_info(root / p) for p in lst.paths] for split, lst in lists.items()}
    out.mkdir(parents=True)
    for split, lst in lists.items():
        lo = 0
        for i, size in enumerate(plan_shards(len(lst.paths), shard_size, 1)):
            hi = lo + size
            write_shard(out / shard_name(split, i), root, lo, lst.paths[lo:hi], lst.labels[lo:hi],
                        [e for e, _ in infos[split][lo:hi]])
            lo += size


def _check_decoder_rates(root: Path, paths: list[str]) -> dict:
    """Images/s of one process decoding each file in full to check it: PIL
    (``Image.open`` + ``load``, what `data convert` uses) and torchvision
    (``read_file`` + ``decode_image``, deprecated since torchvision 0.29 in
    favour of TorchCodec); best of 3 passes each, interleaved."""
    import warnings

    from PIL import Image
    from torchvision.io import decode_image, read_file

    def pil(path: Path) -> None:
        with Image.open(path) as im:
            im.load()

    def tv(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # one per image otherwise
            decode_image(read_file(str(path)))

    files = [root / p for p in paths]
    best = {"pil": 0.0, "torchvision": 0.0}
    for _ in range(3):
        for name, fn in (("pil", pil), ("torchvision", tv)):
            t = time.perf_counter()
            for f in files:
                fn(f)
            best[name] = max(best[name], len(files) / (time.perf_counter() - t))
    return {f"{k}_images_per_second": v for k, v in best.items()} | {"images": len(files)}


def bench_convert(sizes: dict) -> dict:
    """The same list converted by the pre-#18 loop and by today's `convert`
    (one checking process per CPU), each from a warm page cache; beside it
    the two decoders a check could use, in one process."""
    import tempfile

    from saat_dist.data.listformat import read_split
    from saat_dist.data.workers import cpu_count

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a checking process's CPU
    try:
        with tempfile.TemporaryDirectory(prefix="saat-bench-convert-") as tmp:
            root = Path(tmp) / "list"
            _convert_list(root, sizes)
            decoders = _check_decoder_rates(root, read_split(root, "train").paths[:2000])
            result = _convert_both(root, Path(tmp), sizes)
    finally:
        torch.set_num_threads(threads)
    return result | {"processes": cpu_count(), "check_decoders_one_process": decoders}


def _convert_both(root: Path, tmp: Path, sizes: dict) -> dict:
    """Seconds of the pre-#18 loop and of today's `convert` on the list at
    ``root``, ``sizes["rounds"]`` times each, interleaved (after a warm-up
    pass: every run finds the files cached; each starts after an
    ``os.sync``, so that no run pays for the writes of the one before), and
    whether their shards are the same bytes."""
    import os
    import shutil
    import statistics

    from saat_dist.data.convert import convert

    def before(out: Path) -> None:
        _convert_before_18(root, out, sizes["shard_size"])

    def now(out: Path) -> None:
        convert(root, out, sizes["shard_size"], 1)

    before(tmp / "warm-up")
    shutil.rmtree(tmp / "warm-up")
    seconds: dict[str, list[float]] = {"before_18": [], "now": []}
    for r in range(sizes["rounds"]):
        for name, fn in [("before_18", before), ("now", now)][:: 1 if r % 2 == 0 else -1]:
            out = tmp / f"{name}-{r}"
            os.sync()
            t = time.perf_counter()
            fn(out)
            seconds[name].append(time.perf_counter() - t)
    tars = sorted(p.name for p in (tmp / "before_18-0").iterdir())
    same = tars == sorted(p.name for p in (tmp / "now-0").glob("*.tar")) and all(
        (tmp / "before_18-0" / t).read_bytes() == (tmp / "now-0" / t).read_bytes() for t in tars)
    rates = {k: {"seconds": statistics.median(v), "seconds_all": v,
                 "images_per_second": sizes["images"] / statistics.median(v)} for k, v in seconds.items()}
    return {"case": "data convert", "sizes": sizes, **rates,
            "speedup": rates["before_18"]["seconds"] / rates["now"]["seconds"], "identical_shards": same}


def bench_cost(sizes: dict) -> dict:
    """``cost_model.cost_tables``, with the passes measured in the runs
    under $SAAT_COST_FROM (their train.json ``cost`` records) when set."""
    import os

    from saat_dist.cost_model import cost_tables, measured_passes

    run_dir = os.environ.get("SAAT_COST_FROM")
    measured = measured_passes(run_dir) if run_dir else None
    return cost_tables(sizes, measured) | {"measured_from": run_dir}


def bench_modes(sizes: dict) -> dict:
    """Every training mode's step on the demo model in one process, timed
    side by side (rounds interleaved, the median kept): seconds per batch and
    per full-resolution pass, forward/backward passes per sample (counted by
    the trainer's ``PassCounter``), and each against SAAT's. The curriculum
    is timed in each of its phases and weighted by their shares of the steps."""
    import statistics

    from saat_dist.config import load_config
    from saat_dist.defences import DEFENCES
    from saat_dist.defences.base import StepContext
    from saat_dist.hashing import DPHLoss
    from saat_dist.mainstay import CodeBank
    from saat_dist.models import build_hash_model
    from saat_dist.training import TorchStepper, benign_step
    from saat_dist.training.trainer import PassCounter

    cfg = load_config(sizes["config"])
    b, bits, side = sizes["batch"], cfg.model.bits, cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(sizes["items"], 5, generator=g) < 0.3).float()
    labels[labels.sum(1) == 0, 0] = 1
    bank = CodeBank(labels, bits)
    bank.update(torch.arange(sizes["items"]), torch.sign(torch.randn(sizes["items"], bits, generator=g)))
    torch.manual_seed(0)
    model = build_hash_model(cfg.model.backbone, bits, width=cfg.model.width).train()
    stepper = TorchStepper(optimizers.SGD(model.parameters(), lr=1e-4))
    counter = PassCounter(model, side)
    total = 100  # a curriculum's phases are fractions of this

    def step_of(name: str, at: int):
        if name == "benign":
            return lambda batch, i: benign_step(model, stepper, batch, bank, DPHLoss(), i, check=False)
        ctx = StepContext(model, stepper, bank, DPHLoss(), getattr(cfg, name), cfg.seed, name, total_steps=total,
                          extras={})
        return lambda batch, i: DEFENCES[name].step(ctx, batch, at)

    phases = cfg.saat_curriculum.phases
    cases = {"benign": [(1.0, 0)], **{n: [(1.0, 0)] for n in sizes["modes"] if n != "saat_curriculum"},
             "saat_curriculum": [(p.until - (phases[i - 1].until if i else 0.0), int((phases[i - 1].until if i else 0)
                                                                                    * total)) for i, p in
                                 enumerate(phases)]}
    seconds: dict[str, list[float]] = {n: [] for n in cases}
    passes: dict[str, float] = {}
    for r in range(sizes["rounds"]):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            took, counted = 0.0, 0.0
            for share, at in cases[name]:
                fn = step_of(name, at)
                idx = torch.randint(0, sizes["items"], (b,), generator=g)
                batch = (torch.rand(b, 3, side, side, generator=g), labels[idx], idx)
                fn(batch, 0)  # warm-up
                counter.passes = 0.0
                t = time.perf_counter()
                for i in range(sizes["steps"]):
                    fn(batch, i)
                took += share * (time.perf_counter() - t) / sizes["steps"]
                counted += share * counter.passes / (sizes["steps"] * b)
            seconds[name].append(took)
            passes[name] = counted
    med = {n: statistics.median(v) for n, v in seconds.items()}
    rows = {n: {"seconds_per_batch": med[n], "seconds_all": seconds[n], "passes_per_sample": passes[n],
                "seconds_per_pass_image": med[n] / (passes[n] * b),
                "seconds_vs_saat": med[n] / med["saat"], "passes_vs_saat": passes[n] / passes["saat"]}
            for n in cases}
    return {"case": "training modes, side by side", "sizes": sizes, "batch": b, "image_size": side,
            "threads": torch.get_num_threads(), "modes": rows,
            "note": "per batch of one trainer step (free: its replays); epochs not included: a stage's cost is "
                    "this x its steps (free SAAT runs fewer epochs)"}


def run_bench(which: str, out_dir: Path, small: bool = False) -> dict:
    table = SMALL if small else SIZES
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, fn in (("map", bench_map), ("mainstay", bench_mainstay), ("saat-step", bench_saat_step),
                     ("eval", bench_eval), ("stream", bench_stream), ("convert", bench_convert), ("cost", bench_cost),
                     ("modes", bench_modes),
                     ("soak", bench_soak)):
        if which == name or (which == "all" and name != "soak"):  # soak is a whole demo run: only by name
            res = fn(table[name])
            res["machine"] = {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                              "torch": torch.__version__, "small": small}
            (out_dir / f"{name}.json").write_text(json.dumps(res, indent=1))
            results[name] = res
    return results
