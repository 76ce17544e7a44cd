"""The Ray Train worker function: one stage of a run on every worker.

Stages: ``train`` (benign hashing), ``saat`` (adversarial training from the
benign model) and ``evaluate``. Training workers wrap the hash model in a
DeepSpeed engine, stream disjoint shard subsets, keep the code bank in sync
(``SyncedBank``), serve Prometheus metrics, and checkpoint everything needed
to resume (DeepSpeed state, bank, data position, RNG, step) through
``ray.train.report``; at start they restore from ``ray.train.get_checkpoint()``
so Ray's failure retries and ``--resume`` continue from the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from saat_dist.checkpoint import load_state, save_state
from saat_dist.config import RunConfig, config_from_dict
from saat_dist.data.shards import load_manifest
from saat_dist.data.stream import ShardStream, StreamSpec, load_labels, load_split
from saat_dist.distributed.bank_sync import SyncedBank
from saat_dist.distributed.collectives import all_gather_ragged, average_buffers, barrier
from saat_dist.distributed.deepspeed_setup import build_engine
from saat_dist.hashing import build_hash_loss
from saat_dist.mainstay import CodeBank
from saat_dist.models import build_hash_model
from saat_dist.monitoring.prometheus import WorkerMetrics
from saat_dist.progress import Progress
from saat_dist.training.encode import encode
from saat_dist.training.steps import SAATSettings, benign_step, saat_step

log = logging.getLogger("saat_dist")
# Per-rank events (ports, restores) are logged by every rank.
rank_log = logging.getLogger("saat_dist.rank")
rank_log.setLevel(logging.INFO)


def worker_main(config: dict) -> None:
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    cfg: RunConfig = config_from_dict(config["run"])
    stage = config["stage"]
    ctx = ray.train.get_context()
    rank, world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    if rank != 0:  # progress and results are logged once, by rank 0
        log.setLevel(logging.WARNING)
    device = _device(cfg)
    run_dir = Path(cfg.output_dir)
    metrics = WorkerMetrics(rank, stage if stage != "evaluate" else f"evaluate_{config['which']}")
    if cfg.metrics.enabled:
        port = metrics.serve(cfg.metrics.bind, cfg.metrics.port, run_dir, local_rank)
        rank_log.info("rank %d (pid %d) serves metrics on %s:%d", rank, os.getpid(), cfg.metrics.bind, port)
    try:
        if stage == "evaluate":
            _evaluate(cfg, config["which"], rank, world, device, run_dir)
        else:
            _train(cfg, stage, rank, world, device, run_dir, metrics)
    finally:
        metrics.close()


def _device(cfg: RunConfig) -> torch.device:
    if cfg.distributed.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _model(cfg: RunConfig, device) -> torch.nn.Module:
    m = cfg.model
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return build_hash_model(m.backbone, m.bits, m.pretrained_path, m.hash_bn, m.width).to(device)


def _load_weights(model: torch.nn.Module, path: Path, cfg: RunConfig) -> None:
    state = load_state(path)
    if state.get("backbone") != cfg.model.backbone or state.get("bits") != cfg.model.bits:
        raise ValueError(f"{path}: saved for {state.get('backbone')}/{state.get('bits')} bits, "
                         f"the config asks for {cfg.model.backbone}/{cfg.model.bits}")
    model.load_state_dict(state["model"])


def _rows_of_rank(n: int, rank: int, world: int) -> slice:
    per = -(-n // world)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def make_row_map(rank: int, world: int):
    """``row_map`` for evaluation: each process takes a contiguous slice of the
    rows, results are gathered in row order on every process."""

    def row_map(fn, *tensors):
        sl = _rows_of_rank(len(tensors[0]), rank, world)
        return all_gather_ragged(fn(*(t[sl] for t in tensors)).cpu())

    return row_map


def _fill_bank_from_model(cfg: RunConfig, engine, bank: CodeBank, rank: int, world: int, device) -> None:
    """Bank <- the model's codes of every training item; each rank encodes
    its share of the shards, then all ranks exchange them."""
    manifest = load_manifest(cfg.data.shard_dir, cfg.data.base_url)
    shards = list(range(rank, len(manifest["splits"]["train"]["shards"]), world))
    images, _, index = load_split(cfg.data.shard_dir, "train", cfg.data.image_size, cfg.data.base_url, shards)
    codes = encode(engine.module, images, device, cfg.eval.batch_size)
    all_index = all_gather_ragged(index)
    all_codes = all_gather_ragged(codes)
    bank.update(all_index, all_codes)
    bank.take_pending()  # every rank applied every code: nothing left to sync


def _train(cfg: RunConfig, stage: str, rank: int, world: int, device, run_dir: Path, metrics: WorkerMetrics) -> None:
    import ray.train

    d, tc = cfg.distributed, (cfg.train if stage == "train" else cfg.saat)
    manifest = load_manifest(cfg.data.shard_dir, cfg.data.base_url)
    model = _model(cfg, device)
    if stage == "saat":
        _load_weights(model, run_dir / "benign" / "model.pt", cfg)
    loss_fn = build_hash_loss(cfg.train.loss, manifest["num_classes"], cfg.model.bits, cfg.seed)
    bank = CodeBank(load_labels(cfg.data.shard_dir, "train", cfg.data.base_url), cfg.model.bits,
                    torch.tensor(manifest["label_sets"], dtype=torch.int64))
    synced = SyncedBank(bank, d.bank_sync_every, on_sync=metrics.record_bank_sync)
    stream = ShardStream(StreamSpec(
        shard_dir=cfg.data.shard_dir, split="train", batch_size=tc.batch_size, image_size=cfg.data.image_size,
        rank=rank, world_size=world, num_workers=cfg.data.loader_workers,
        seed=cfg.seed + (0 if stage == "train" else 1), skip_corrupt=cfg.data.skip_corrupt,
        base_url=cfg.data.base_url))
    spe = stream.steps_per_epoch
    total = tc.epochs * spe
    engine, _ = build_engine(model, tc.optim, d, tc.batch_size, world, total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * (rank + 1))

    step, history, sums = 0, [], {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag="engine", load_module_strict=True)
            state = load_state(Path(ckpt_dir) / f"rank-{rank}.pt")
        bank.load_state_dict(state["bank"])
        stream.load_state_dict(state["stream"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        synced.updates = int(state["bank_updates"])
        step, history, sums = int(state["step"]), state["history"], state["epoch_sums"]
        rank_log.info("rank %d: restored step %d of %d from checkpoint %s", rank, step, total, ckpt.path)
    elif stage == "saat":
        _fill_bank_from_model(cfg, engine, bank, rank, world, device)

    settings = SAATSettings(eps=cfg.saat.eps, step_size=cfg.saat.step_size, iters=cfg.saat.iters,
                            lam=cfg.saat.lam, mu=cfg.saat.mu)
    progress = Progress(f"{stage} (rank {rank}/{world})", total - step, every_s=cfg.log_every_s if rank == 0 else 1e9)
    engine.train()
    while step < total:
        epoch = step // spe
        x, y, index = (t.to(device) for t in next(stream))
        t = time.perf_counter()
        if stage == "train":
            out = benign_step(engine, engine, (x, y, index), synced, loss_fn, step)
        else:
            out = saat_step(engine, engine, (x, y, index), synced, loss_fn, settings, step, gen)
        metrics.record_step(out, len(x), time.perf_counter() - t, epoch)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        step += 1
        progress.update(1, epoch=epoch, loss=float(out["loss"]))
        epoch_end = step % spe == 0
        if epoch_end:
            history.append({k: v / spe for k, v in sums.items()})
            sums = {}
            if rank == 0:
                log.info("%s epoch %d/%d %s", stage, epoch + 1, tc.epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in history[-1].items()))
        if epoch_end or (d.checkpoint_every and step % d.checkpoint_every == 0):
            _checkpoint(engine, synced, stream, gen, step, history, sums, rank, metrics,
                        history[-1] if epoch_end else {k: v / max(1, step % spe) for k, v in sums.items()})

    checksums = _parameter_checksums(engine)
    # ZeRO-3 gathers the full weights collectively, so every rank takes part.
    final = engine._zero3_consolidated_16bit_state_dict() if d.zero_stage == 3 else engine.module.state_dict()
    if rank == 0:
        same = all(c == checksums[0] for c in checksums)
        log.info("%s: parameters %s across %d ranks", stage, "identical" if same else "DIFFER", world)
        _save_final(cfg, stage, final, bank, step, history, run_dir,
                    {"parameter_checksums": checksums, "parameters_identical": same})
    barrier()


def _parameter_checksums(engine) -> list[str]:
    """A digest of this rank's full parameters, gathered from every rank."""
    import hashlib

    h = hashlib.sha256()
    params = dict(engine.module.named_parameters())
    for name in sorted(params):
        p = params[name]
        if hasattr(p, "ds_tensor"):  # ZeRO-3: gather the partitioned parameter to hash it
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                h.update(p.detach().float().cpu().numpy().tobytes())
        else:
            h.update(p.detach().float().cpu().numpy().tobytes())
    digest = torch.tensor(list(bytes.fromhex(h.hexdigest())), dtype=torch.uint8)
    return [bytes(row.tolist()).hex() for row in all_gather_ragged(digest[None]).reshape(-1, 32)]


def _checkpoint(engine, synced: SyncedBank, stream, gen, step, history, sums, rank, metrics, means) -> None:
    """Every rank: sync the bank table, save DeepSpeed state + this rank's
    state, and report them to Ray as one checkpoint (collective)."""
    import ray.train

    t = time.perf_counter()
    synced.sync_table()
    average_buffers(engine.module)  # one BatchNorm state for all ranks (DeepSpeed saves rank 0's)
    with tempfile.TemporaryDirectory(prefix="saat-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag="engine")
        save_state({
            "step": step, "history": history, "epoch_sums": sums, "bank": synced.bank.state_dict(),
            "stream": stream.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "bank_updates": synced.updates,
        }, Path(tmp) / f"rank-{rank}.pt")
        ray.train.report({"step": step, **{k: float(v) for k, v in means.items()}},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp))
    metrics.record_checkpoint(time.perf_counter() - t)


def _save_final(cfg: RunConfig, stage: str, state: dict, bank: CodeBank, steps: int, history, run_dir: Path,
                extra: dict) -> None:
    """The stage's model as a plain state_dict (what evaluation and SAAT load)."""
    out = run_dir / ("benign" if stage == "train" else "saat")
    save_state({"format": "saat-dist-model/1", "backbone": cfg.model.backbone, "bits": cfg.model.bits,
                "model": {k: v.detach().cpu() for k, v in state.items()}, "bank": bank.state_dict(),
                "steps": steps}, out / "model.pt")
    (out / "train.json").write_text(json.dumps({"history": history, "steps": steps, **extra}, indent=1))


def _evaluate(cfg: RunConfig, which: str, rank: int, world: int, device, run_dir: Path) -> None:
    from saat_dist.evaluation import EvalData, evaluate_model, random_map

    model = _model(cfg, device)
    _load_weights(model, run_dir / which / "model.pt", cfg)
    data = EvalData(cfg)
    res = evaluate_model(cfg, model, data, device, which, strong=(which == "saat"),
                         row_map=make_row_map(rank, world))
    if rank == 0:
        res["random_map"] = random_map(data, cfg.model.bits, cfg.eval.top_k, cfg.seed + 20)
        (run_dir / which / "eval.json").write_text(json.dumps(res, indent=1))
    barrier()
