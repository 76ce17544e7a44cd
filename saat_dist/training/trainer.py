"""The one training loop, for every launcher.

``train_stage`` runs a training stage (benign ``train``, or one of the
defences ``saat``, ``cgat``, ``atrdh``, ``pgd_at``: modes of this one loop,
chosen by the stage, each a step function of ``saat_dist.training.steps``)
in the calling process: in-process (``distributed.num_workers=0``,
``saat_dist.pipeline``) and in every Ray Train worker
(``saat_dist.distributed.worker``) alike. What differs between launchers is
passed in as a ``Launch``: rank and world size, the device, the backend
(torch optimizer or DeepSpeed engine), the checkpointer (local ``step-N``
directories or ``ray.train.report``) and the metrics sink (Prometheus or
none). The rest (model, data, code bank, RNG streams, loop, checkpoint
contents, the final model file) is written once, here.

Host syncs (``.item()``, finiteness checks) happen on log steps only: a
step's outputs stay on the device until the next log step, when they are
read back in one transfer and checked.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saat_dist.checkpoint import CheckpointError, load_state, save_state, write_text_atomic
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.data.stream import ShardStream, StreamSpec
from saat_dist.distributed.bank_sync import SyncedBank
from saat_dist.distributed.collectives import all_gather_ragged, all_reduce_sum, barrier
from saat_dist.hashing import build_hash_loss
from saat_dist.mainstay import CodeBank, label_set_counts
from saat_dist.models import build_hash_model
from saat_dist.progress import Progress
from saat_dist.stages import Stage
from saat_dist.training.encode import encode_batches
from saat_dist.training.steps import (
    ATRDHSettings,
    PGDATSettings,
    SAATSettings,
    atrdh_step,
    benign_step,
    cgat_step,
    pgd_at_step,
    saat_step,
)

log = logging.getLogger("saat_dist")
rank_log = logging.getLogger("saat_dist.rank")  # per-rank events (restores), logged by every rank
rank_log.setLevel(logging.INFO)
MODEL_FORMAT = "saat-dist-model/1"


class NullMetrics:
    """The metrics sink when none is wanted."""

    def record_step(self, out, samples, seconds, epoch, steps=1):
        pass

    def record_bank_sync(self, seconds, nbytes):
        pass

    def record_checkpoint(self, seconds):
        pass

    def record_skipped(self, samples):
        pass


@dataclass
class Launch:
    """What a launcher hands the loop."""

    rank: int
    world: int
    device: torch.device
    make_backend: Callable  # (model, optim_cfg, micro_batch, total_steps) -> backend
    checkpointer: object  # .restore() context, .save(step, metrics, write)
    metrics: object = field(default_factory=NullMetrics)


# ---------------------------------------------------------------- model files
def build_model(cfg: RunConfig, device) -> torch.nn.Module:
    """The configured hash model with the run's initial weights (same on every rank)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = build_hash_model(m.backbone, m.bits, m.pretrained_path, m.hash_bn, m.width, m.hash_init).to(device)
    if device.type == "cuda":  # every backbone is convolutional: NHWC is faster on tensor cores
        model = model.to(memory_format=torch.channels_last)
    return model


def load_model(cfg: RunConfig, path: Path, device) -> torch.nn.Module:
    """A model file written by ``save_model``, checked against the config."""
    state = load_state(path)
    if state.get("format") != MODEL_FORMAT or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{path}: not a {MODEL_FORMAT} file")
    if state.get("backbone") != cfg.model.backbone or state.get("bits") != cfg.model.bits:
        raise CheckpointError(f"{path}: saved for {state.get('backbone')}/{state.get('bits')} bits, "
                              f"the config asks for {cfg.model.backbone}/{cfg.model.bits}")
    model = build_model(cfg, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes
        raise CheckpointError(f"{path}: weights do not fit the configured model: {str(e)[:300]}") from e
    return model


def save_model(cfg: RunConfig, path: Path, weights: dict, steps: int) -> None:
    save_state({"format": MODEL_FORMAT, "backbone": cfg.model.backbone, "bits": cfg.model.bits,
                "model": weights, "steps": steps}, path)


# ---------------------------------------------------------------- code bank
def build_bank(cfg: RunConfig, source: DataSource, loss_fn, rank: int, world: int, device, on_sync) -> SyncedBank:
    """The code bank of this process. Losses that need every code (DPSH,
    HashNet) hold all N items and share codes every step; the others hold
    only this rank's items (its fixed shards) and share statistics."""
    share = bool(getattr(loss_fn, "needs_all_codes", False))
    set_labels = source.label_sets
    if share or world == 1:
        index, labels = source.labels("train")
        full = torch.zeros(source.count("train"), source.num_classes)
        full[index] = labels
        bank = CodeBank(full, cfg.model.bits, set_labels, device=device)
    else:
        index, labels = source.labels("train", source.rank_shards("train", rank, world))
        counts = all_reduce_sum(label_set_counts(labels, set_labels).to(device))
        bank = CodeBank(labels, cfg.model.bits, set_labels, index=index, set_counts=counts, device=device)
    return SyncedBank(bank, cfg.distributed.bank_sync_every, on_sync=on_sync, share_codes=share)


def fill_bank(cfg: RunConfig, source: DataSource, module, bank: SyncedBank, rank: int, world: int, device,
              also: SyncedBank | None = None) -> None:
    """Bank <- the model's binary codes of the training items: each rank
    encodes its own shards (streamed, one batch of images at a time).
    ``also``: a second bank (the continuous hash bank) gets the same codes."""
    index, codes = encode_batches(module, source.batches("train", cfg.data.image_size, cfg.eval.batch_size,
                                                         source.rank_shards("train", rank, world),
                                                         resize=cfg.data.resize), device)
    if bank.share_codes:
        index, codes = all_gather_ragged(index), all_gather_ragged(codes)
    bank.fill(index, codes)
    if also is not None:
        also.fill(index, codes)


def build_prototypes(cfg: RunConfig, source: DataSource, bank: SyncedBank, rank: int, world: int, total: int,
                     device):
    """ATRDH's PrototypeNet, the same on every rank. When each rank holds only
    its own items' codes, its circle loss is combined across ranks exactly
    (see ``attacks.prototype``)."""
    from saat_dist.attacks.prototype import PrototypeTrainer

    split = world > 1 and not bank.share_codes
    a = cfg.atrdh
    return PrototypeTrainer(source.num_classes, cfg.model.bits, source.label_sets, total_steps=max(1, total),
                            seed=cfg.seed + 77, device=device, lr=a.pnet_lr, betas=(0.5, 0.999),
                            gather=all_gather_ragged if split else None,
                            all_reduce=all_reduce_sum if split else None, world=world if split else 1)


def make_step(stage: Stage, cfg: RunConfig, backend, bank, hash_bank, loss_fn, generator, prototypes):
    """``step_fn(batch, step)`` of a stage: benign training or one of the defences."""
    model, stepper = backend.model, backend.stepper
    if stage.name == "train":
        return lambda batch, step: benign_step(model, stepper, batch, bank, loss_fn, step, check=False)
    tc = getattr(cfg, stage.section)
    if stage.name in ("saat", "cgat"):
        settings = SAATSettings(eps=tc.eps, step_size=tc.step_size, iters=tc.iters, lam=tc.lam, mu=tc.mu,
                                mode=tc.attack_mode)
        fn = saat_step if stage.name == "saat" else cgat_step
        return lambda batch, step: fn(model, stepper, batch, bank, loss_fn, settings, step, generator, check=False,
                                      hash_bank=hash_bank)
    if stage.name == "atrdh":
        settings = ATRDHSettings(eps=tc.eps, step_size=tc.step_size, iters=tc.iters, adv_weight=tc.adv_weight,
                                 mode=tc.attack_mode)
        return lambda batch, step: atrdh_step(model, stepper, batch, bank, loss_fn, settings, step, generator,
                                              prototypes, check=False, hash_bank=hash_bank)
    if stage.name == "pgd_at":
        settings = PGDATSettings(eps=tc.eps, step_size=tc.step_size, iters=tc.iters, lam=tc.lam,
                                 clean_weight=tc.clean_weight, mode=tc.attack_mode)
        return lambda batch, step: pgd_at_step(model, stepper, batch, bank, loss_fn, settings, step, generator,
                                               check=False, hash_bank=hash_bank)
    raise ValueError(f"no training step for stage {stage.name!r}")


# ---------------------------------------------------------------- train state
class TrainState:
    """Everything a checkpoint holds besides the backend's model/optimizer
    state, listed once: loop position and history, data position, code bank,
    RNG streams."""

    def __init__(self, stream: ShardStream, bank: SyncedBank, generator: torch.Generator,
                 extras: dict | None = None) -> None:
        self.step = 0
        self.history: list[dict[str, float]] = []  # per-epoch means
        self.epoch_sums: dict[str, float] = {}  # host sums of the running epoch
        self.stream, self.bank, self.generator = stream, bank, generator
        # what a defence adds: the continuous hash bank, ATRDH's PrototypeNet (state_dict / load_state_dict)
        self.extras = extras or {}

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "epoch_sums": self.epoch_sums,
                "stream": self.stream.state_dict(), "bank": self.bank.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "extras": {k: v.state_dict() for k, v in self.extras.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.epoch_sums = int(state["step"]), state["history"], state["epoch_sums"]
        self.stream.load_state_dict(state["stream"])
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        saved = state.get("extras", {})
        missing = sorted(set(self.extras) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint lacks the state of {missing} (saved by another stage or version)")
        for k, v in self.extras.items():
            v.load_state_dict(saved[k])

    def save(self, directory: Path, rank: int, backend) -> None:
        backend.save(directory)
        save_state(self.state_dict(), Path(directory) / f"rank-{rank}.pt")

    def restore(self, directory: Path, rank: int, backend) -> None:
        backend.load(directory)
        self.load_state_dict(load_state(Path(directory) / f"rank-{rank}.pt"))


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, float]]
    log_records: list[dict[str, float]]  # one per log step: step and means since the previous one


# ---------------------------------------------------------------- the loop
def train_stage(cfg: RunConfig, stage: Stage, run_dir: Path, launch: Launch, source: DataSource) -> TrainResult:
    """Run ``stage`` in this process and write ``<run_dir>/<stage.out>/model.pt``
    and ``train.json`` (rank 0). Restores the newest checkpoint first."""
    rank, world, device, metrics = launch.rank, launch.world, launch.device, launch.metrics
    tc = getattr(cfg, stage.section)
    d = cfg.distributed
    if stage.needs:
        model = load_model(cfg, run_dir / stage.needs / "model.pt", device)
    else:
        model = build_model(cfg, device)
    loss_fn = build_hash_loss(cfg.train.loss, source.num_classes, cfg.model.bits, cfg.seed)
    bank = build_bank(cfg, source, loss_fn, rank, world, device, metrics.record_bank_sync)
    stream = ShardStream(StreamSpec(
        shard_dir=source.shard_dir, split="train", batch_size=tc.batch_size, image_size=cfg.data.image_size,
        rank=rank, world_size=world, num_workers=cfg.data.loader_workers, seed=cfg.seed + stage.seed_offset,
        skip_corrupt=cfg.data.skip_corrupt, base_url=source.base_url, source=source, resize=cfg.data.resize))
    spe = stream.steps_per_epoch
    total = tc.epochs * spe
    backend = launch.make_backend(model, tc.optim, tc.batch_size, total)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * (rank + 1))
    extras: dict = {}
    hash_bank = None
    if stage.needs and tc.hash_bank == "continuous":  # the reference's U: continuous codes for the hash term
        hash_bank = extras["hash_bank"] = build_bank(cfg, source, loss_fn, rank, world, device,
                                                     metrics.record_bank_sync)
    if stage.name == "atrdh":
        extras["prototypes"] = build_prototypes(cfg, source, bank, rank, world, total, device)
    state = TrainState(stream, bank, generator, extras)

    with launch.checkpointer.restore() as ckpt_dir:
        if ckpt_dir is not None:
            state.restore(ckpt_dir, rank, backend)
            rank_log.info("rank %d: restored step %d of %d from checkpoint %s", rank, state.step, total,
                          getattr(launch.checkpointer, "where", ckpt_dir))
    if state.step == 0 and stage.needs:
        fill_bank(cfg, source, backend.module, bank, rank, world, device, also=hash_bank)
    step_fn = make_step(stage, cfg, backend, bank, hash_bank, loss_fn, generator, extras.get("prototypes"))

    who = f"{stage.name} (rank {rank}/{world})" if world > 1 else stage.name
    progress = Progress(who, total - state.step, every_s=cfg.log_every_s if rank == 0 else 1e9)
    channels_last = device.type == "cuda"  # as build_model laid out the weights
    pending: list[dict[str, torch.Tensor]] = []
    log_records: list[dict[str, float]] = []
    last_log = t_interval = time.monotonic()
    skipped_reported = stream.skipped
    epoch_rss: list[list[float]] = []
    backend.model.train()
    while state.step < total:
        x, y, index = (t.to(device, non_blocking=True) for t in next(stream))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pending.append(step_fn((x, y, index), state.step))
        state.step += 1
        epoch_end = state.step % spe == 0
        checkpoint = epoch_end or (d.checkpoint_every and state.step % d.checkpoint_every == 0)
        now = time.monotonic()
        if stream.skipped != skipped_reported:  # corrupt samples skipped (data.skip_corrupt)
            metrics.record_skipped(stream.skipped - skipped_reported)
            skipped_reported = stream.skipped
        if checkpoint or now - last_log >= cfg.log_every_s:
            means = _flush(pending, state, stage.name, tc.batch_size, now - t_interval, metrics, spe)
            log_records.append({"step": state.step, **means})
            progress.update(len(pending), epoch=(state.step - 1) // spe, loss=means["loss"])
            pending, last_log, t_interval = [], now, time.monotonic()
        if epoch_end:
            state.history.append({k: v / spe for k, v in state.epoch_sums.items()})
            state.epoch_sums = {}
            # resident memory of every rank at each epoch end: flat across epochs in a healthy run
            epoch_rss.append(all_gather_ragged(torch.tensor([_rss_mib()], dtype=torch.float64)).tolist())
            if rank == 0:
                log.info("%s epoch %d/%d %s", stage.name, state.step // spe, tc.epochs,
                         " ".join(f"{k}={v:.4g}" for k, v in state.history[-1].items()))
        if checkpoint:
            t = time.perf_counter()
            bank.sync_table()
            if hash_bank is not None:
                hash_bank.sync_table()
            means = state.history[-1] if epoch_end else {
                k: v / max(1, state.step % spe) for k, v in state.epoch_sums.items()}
            launch.checkpointer.save(state.step, means, lambda directory: state.save(directory, rank, backend))
            metrics.record_checkpoint(time.perf_counter() - t)

    digests = [bytes(r.tolist()).hex() for r in all_gather_ragged(
        torch.tensor(list(bytes.fromhex(backend.parameter_digest())), dtype=torch.uint8)[None])]
    skipped = all_gather_ragged(torch.tensor([stream.skipped], dtype=torch.int64)).tolist()
    weights = backend.full_state_dict()  # collective under ZeRO-3
    if rank == 0:
        same = all(x == digests[0] for x in digests)
        if world > 1:
            log.info("%s: parameters %s across %d ranks", stage.name, "identical" if same else "DIFFER", world)
        out = run_dir / stage.out
        save_model(cfg, out / "model.pt", weights, state.step)
        write_text_atomic(out / "train.json", json.dumps(
            {"history": state.history, "steps": state.step, "parameter_checksums": digests,
             "parameters_identical": same, "skipped_samples_per_rank": skipped,
             "epoch_rss_mib_per_rank": epoch_rss, "log": log_records}, indent=1))
    barrier()
    return TrainResult(state.step, progress.elapsed, state.history, log_records)


def _rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    import psutil  # a dependency of ray[default]

    return psutil.Process().memory_info().rss / 2**20


def _flush(pending, state: TrainState, what: str, batch: int, seconds: float, metrics, spe: int) -> dict:
    """Read the pending steps' outputs back to the host in one transfer, stop
    on a non-finite loss, add them to the epoch sums; returns their means."""
    keys = list(pending[0])
    values = torch.stack([torch.stack([o[k].float() for k in keys]) for o in pending]).cpu()
    first = state.step - len(pending)
    bad = (~torch.isfinite(values[:, keys.index("loss")])).nonzero()
    if len(bad):
        raise FloatingPointError(f"{what} loss is not finite at step {first + int(bad[0])}: stopping the run")
    sums = values.sum(0).tolist()
    for k, v in zip(keys, sums):
        state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v
    means = {k: v / len(pending) for k, v in zip(keys, sums)}
    metrics.record_step(means, batch * len(pending), seconds, (state.step - 1) // spe, steps=len(pending))
    return means
