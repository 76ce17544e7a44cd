"""The one training loop, for every launcher.

``train_stage`` runs a training stage (benign ``train``, or a defence of
``saat_dist.defences``: modes of this one loop, each a step function found
through the stage's registry entry) in the calling process: in-process (``distributed.num_workers=0``,
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

Scale changes the speed, never the answer: ``batch_size`` is the global
batch, each of W workers takes its share of it (in ``grad_accum``
micro-batches), an epoch is split count // global batch steps at any W, the
global order of the samples (``saat_dist.data.order``) puts the same samples
in step t's batch at any W, BatchNorm normalises over the global batch
(``distributed.sync_batchnorm``), every random start of an inner attack is
keyed by (stage, step, item), and the epoch history is the mean over all
workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from saat_dist.checkpoint import CheckpointError, load_state, save_state, write_text_atomic
from saat_dist.config import RunConfig
from saat_dist.data.source import DataSource
from saat_dist.data.stream import ShardStream, StreamSpec
from saat_dist.device import Place
from saat_dist.comm.bank_sync import SyncedBank
from saat_dist.comm.collectives import all_gather_json, all_gather_ragged, all_reduce_sum, barrier
from saat_dist.comm.sync_batchnorm import convert_sync_batchnorm
from saat_dist.hashing import build_hash_loss
from saat_dist.mainstay import CodeBank, label_set_counts
from saat_dist.models.model_file import build_model, load_model, save_model
from saat_dist.monitoring.tracking import Tracker, current_lr, prefixed
from saat_dist.progress import Progress
from saat_dist.stages import Stage
from saat_dist.training.encode import encode_batches
from saat_dist.training.optim import lr_factor
from saat_dist.defences import ExtrasContext, StepContext
from saat_dist.training.steps import benign_step

log = logging.getLogger("saat_dist")
rank_log = logging.getLogger("saat_dist.rank")  # per-rank events (restores), logged by every rank
rank_log.setLevel(logging.INFO)


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

    def close(self, linger_s: float = 0.0):
        pass


@dataclass(frozen=True)
class Notice:
    """The launcher's word that this job will be stopped: what and (if known)
    when, in unix seconds."""

    text: str
    deadline: float | None = None
    # how long before the deadline a checkpoint must be written for the
    # launcher to keep it (Ray Train: two polls of its controller, see
    # distributed.preemption.report_keep_s); closer, the restart restores
    # an older one
    keep_s: float = 0.0


class PreemptionWatch:
    """What the loop does about a preemption notice, asked every
    ``distributed.preemption_check_every`` steps: checkpoint at once, train
    on, and when the deadline is near (three steps and two checkpoints
    away, the time of each as last measured, plus the launcher's time to
    keep a checkpoint, ``Notice.keep_s``) checkpoint again and wait for
    the stop, so that a restart loses no step. The decision is agreed by
    every rank (a one-number all-reduce per step once noticed). If no stop
    comes by a minute past the deadline, training goes on."""

    def __init__(self, launch: Launch, every: int, stage: str) -> None:
        self.ask, self.every, self.stage, self.rank = launch.notice, every, stage, launch.rank
        self.notice: Notice | None = None
        self.final = False
        self.step_s = self.checkpoint_s = 0.0

    def why_checkpoint(self, step: int, total: int) -> str | None:
        """A reason to checkpoint after ``step`` (a collective), or None."""
        if self.ask is None or step >= total or self.final:
            return None
        if self.notice is None:
            if step % self.every:
                return None
            self.notice = self.ask()
            if self.notice is not None and self.rank == 0:
                log.warning("%s: %s: checkpoint at step %d now", self.stage, self.notice.text, step)
            return "preemption notice" if self.notice else None
        if self.notice.deadline is None:
            return None
        margin = 3 * self.step_s + 2 * self.checkpoint_s + self.notice.keep_s + 1.0
        near = time.time() + margin >= self.notice.deadline
        if not all_reduce_sum(torch.tensor([float(near)], dtype=torch.float64)).item():
            return None
        self.final = True
        return "preemption deadline"

    def wait_for_the_stop(self, step: int) -> None:
        """After the last checkpoint before the deadline: no step the restart would redo."""
        if self.rank == 0:
            log.warning("%s: checkpoint of step %d written %.1f s before the preemption deadline; waiting for "
                        "the stop", self.stage, step, self.notice.deadline - time.time())
        while time.time() < self.notice.deadline + 60.0:
            time.sleep(0.5)
        log.warning("%s: no stop a minute after the preemption deadline: training on", self.stage)


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


@dataclass
class Launch:
    """What a launcher hands the loop."""

    rank: int
    world: int
    device: torch.device
    make_backend: Callable  # (model, optim_cfg, Schedule) -> backend
    checkpointer: object  # .restore() context, .save(step, metrics, write)
    metrics: object = field(default_factory=NullMetrics)
    # where this rank runs (host, process, and the launcher's own ids such as a Ray node id): train.json lists every rank's
    where: dict = field(default_factory=lambda: this_process())
    # a collective (every rank calls it at the same steps): a Notice that the job is about to be stopped (a node's
    # preemption), or None; see PreemptionWatch
    notice: Callable[[], "Notice | None"] | None = None
    tracker: Tracker = field(default_factory=Tracker)  # TensorBoard / MLflow (monitoring.tracking); rank 0 only

    @property
    def place(self) -> Place:
        return Place(self.device, self.rank, self.world)


@dataclass(frozen=True)
class Schedule:
    """A stage's batch and step plan, the same at any worker count."""

    global_batch: int  # samples per optimizer step, over all workers
    micro_batch: int  # samples per forward/backward pass on one worker
    grad_accum: int  # micro-batches per step and worker
    steps_per_epoch: int  # split count // global batch
    total_steps: int  # optimizer steps of the stage


# ---------------------------------------------------------------- code bank
def build_bank(cfg: RunConfig, source: DataSource, loss_fn, place: Place, on_sync) -> SyncedBank:
    """The code bank of this process. Losses that need every code (DPSH,
    HashNet) hold all N items and share codes every step; the others hold
    only this rank's items (its fixed shards) and share statistics."""
    share = bool(getattr(loss_fn, "needs_all_codes", False))
    set_labels, rank, world, device = source.label_sets, place.rank, place.world, place.device
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


def fill_bank(cfg: RunConfig, source: DataSource, module, bank: SyncedBank, place: Place,
              also: SyncedBank | None = None) -> None:
    """Bank <- the model's binary codes of the training items: each rank
    encodes its own shards (streamed, one batch of images at a time).
    ``also``: a second bank (the continuous hash bank) gets the same codes."""
    index, codes = encode_batches(module, source.batches("train", cfg.data.image_size, cfg.eval.batch_size,
                                                         source.rank_shards("train", place.rank, place.world),
                                                         resize=cfg.data.resize), place.device)
    if bank.share_codes:
        index, codes = all_gather_ragged(index), all_gather_ragged(codes)
    bank.fill(index, codes)
    if also is not None:
        also.fill(index, codes)


def make_step(stage: Stage, cfg: RunConfig, backend, bank, loss_fn, extras: dict, launch: Launch,
              schedule: Schedule):
    """(``step_fn(batch, step)``, ``epoch_end(epoch) -> dict`` or None) of a
    stage: benign training, or the step of the stage's defence with its
    context (the inner attack's draws keyed by (seed, stage, step, item)) and
    the defence's epoch-end hook."""
    model, stepper = backend.model, backend.stepper
    if stage.defence is None:
        return lambda batch, step: benign_step(model, stepper, batch, bank, loss_fn, step, check=False), None
    ctx = StepContext(model, stepper, bank, loss_fn, getattr(cfg, stage.section), cfg.seed, stage.name,
                      extras.get("hash_bank"), extras, launch.rank, launch.world,
                      schedule.global_batch // schedule.grad_accum, schedule.total_steps)
    hook = stage.defence.epoch_end
    return (lambda batch, step: stage.defence.step(ctx, batch, step),
            None if hook is None else (lambda epoch: hook(ctx, epoch)))


class PassCounter:
    """Forward/backward passes of the hash model in training, per image at
    full resolution: every forward made with gradients on (each is followed
    by a backward, to the input in an inner attack or to the weights in an
    update) adds its images x their pixels / the full image's pixels. The
    epoch-end probes and the bank fill are not training and are not counted."""

    def __init__(self, module: nn.Module, image_size: int) -> None:
        self.full, self.passes, self.paused = float(image_size * image_size), 0.0, False
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        if not self.paused and torch.is_grad_enabled() and args and torch.is_tensor(args[0]):
            x = args[0]
            self.passes += x.shape[0] * x.shape[-1] * x.shape[-2] / self.full

    def remove(self) -> None:
        self._handle.remove()


def build_extras(cfg: RunConfig, stage: Stage, source: DataSource, bank: SyncedBank, new_bank, launch: Launch,
                 schedule: Schedule) -> dict:
    """What a defence adds to the trainer's state (checkpointed with it): the
    continuous hash bank (``hash_bank: continuous``, the reference's U) and
    whatever the defence's own ``extras`` hook builds."""
    section = getattr(cfg, stage.section)
    extras: dict = {}
    if stage.defence is None:
        return extras
    if section.hash_bank == "continuous":
        extras["hash_bank"] = new_bank()
    if stage.defence.extras is not None:
        ctx = ExtrasContext(section, new_bank, bank, source.num_classes, source.label_sets, cfg.model.bits, cfg.seed,
                            launch.device, launch.rank, launch.world, schedule.total_steps * schedule.grad_accum,
                            probe_batch=lambda n: probe_items(cfg, source, n, launch.device))
        extras.update(stage.defence.extras(ctx))
    return extras


def probe_items(cfg: RunConfig, source: DataSource, n: int, device) -> tuple:
    """The first ``n`` training items in stored order (x float in [0, 1], y,
    index), on ``device``: the same on every rank."""
    xs, ys, idx, have = [], [], [], 0
    for x, y, index in source.batches("train", cfg.data.image_size, min(n, 256), resize=cfg.data.resize):
        xs.append(x), ys.append(y), idx.append(index)
        have += len(x)
        if have >= n:
            break
    x, y, index = (torch.cat(t)[:n] for t in (xs, ys, idx))
    return x.float().div_(255).to(device), y.float().to(device), index.to(device)


# ---------------------------------------------------------------- train state
class TrainState:
    """Everything a checkpoint holds besides the backend's model/optimizer
    state, listed once: loop position and history, data position, code bank,
    RNG streams."""

    def __init__(self, stream: ShardStream, bank: SyncedBank, extras: dict | None = None) -> None:
        self.step = 0
        self.resumed_from = 0  # the step this attempt restored from a checkpoint (0: from the start)
        self.resumed_from_workers: int | None = None  # the worker count that wrote that checkpoint
        self.restores: list[dict] = []  # every restore of this stage, oldest first: step and the writers' count
        self.settings = ""  # digest of the settings that shape training: a checkpoint of other settings is refused
        self.history: list[dict[str, float]] = []  # per-epoch means over every worker
        self.epoch_sums: dict[str, float] = {}  # this rank's host sums of the running epoch
        self.passes = 0.0  # training passes (PassCounter) of earlier attempts, over every rank (rank 0 holds them)
        self.seconds = 0.0  # training-loop seconds of earlier attempts
        self.counter: PassCounter | None = None  # this attempt's passes (this rank's)
        self.t_attempt = time.monotonic()  # when this attempt's loop started
        self.stream, self.bank = stream, bank
        # what a defence adds: the continuous hash banks, ATRDH's PrototypeNet (state_dict / load_state_dict)
        self.extras = extras or {}

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "epoch_sums": self.epoch_sums,
                "restores": self.restores, "settings": self.settings, "passes": self.passes, "seconds": self.seconds,
                "stream": self.stream.state_dict(), "bank": self.bank.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "extras": {k: v.state_dict() for k, v in self.extras.items()}}

    def load_state_dict(self, state: dict) -> None:
        if self.settings and state.get("settings", self.settings) != self.settings:
            raise CheckpointError("the checkpoint was written with other training settings (the stage's section, "
                                  "model, loss, seed or images changed): start afresh (--resume off) or restore "
                                  "the settings")
        self.step, self.history, self.epoch_sums = int(state["step"]), state["history"], state["epoch_sums"]
        self.restores = list(state.get("restores", []))
        self.passes, self.seconds = float(state.get("passes", 0.0)), float(state.get("seconds", 0.0))
        self.stream.load_state_dict(state["stream"])
        self.bank.load_state_dict(state["bank"])
        torch.set_rng_state(state["torch_rng"])
        saved = state.get("extras", {})
        missing = sorted(set(self.extras) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint lacks the state of {missing} (saved by another stage or version)")
        for k, v in self.extras.items():
            v.load_state_dict(saved[k])

    def save(self, directory: Path, rank: int, world: int, backend, why: str = "") -> None:
        """This rank's state (a collective: the epoch's running sums over every
        rank go in too, for a restart at another worker count); ``why``: what
        asked for this checkpoint (epoch end, every N steps, a preemption notice)."""
        keys = sorted(self.epoch_sums)
        now = self.passes + (self.counter.passes if self.counter else 0.0)  # rank 0 holds the earlier attempts'
        total = all_reduce_sum(torch.tensor([self.epoch_sums[k] for k in keys] + [now], dtype=torch.float64)).tolist()
        passes = total.pop()
        backend.save(directory)
        save_state({**self.state_dict(), "world": world, "why": why, "passes": passes,
                    "seconds": self.seconds + time.monotonic() - self.t_attempt,
                    "epoch_sums_per_rank": {k: v / world for k, v in zip(keys, total)}},
                   Path(directory) / f"rank-{rank}.pt")

    def restore(self, directory: Path, rank: int, world: int, backend) -> int:
        """Load a checkpoint written at any worker count (elastic restarts);
        returns the worker count that wrote it. Every rank's file holds the
        same model, bank and data position; a rank the writer did not have
        starts from rank 0's, and the epoch's running sums are re-split."""
        backend.load(directory)
        directory = Path(directory)
        state = load_state(directory / "rank-0.pt")
        saved_world = int(state.get("world", world))
        if saved_world == world:
            self.load_state_dict(load_state(directory / f"rank-{rank}.pt"))
            return world
        # another worker count: the code banks hold each rank's items, so this
        # rank's come from the writers' files; the rest is every rank's alike
        saved = [state, *(load_state(directory / f"rank-{r}.pt") for r in range(1, saved_world))]
        state["bank"] = _regroup_bank(self.bank, [s["bank"] for s in saved])
        for key, extra in self.extras.items():
            if isinstance(extra, SyncedBank):
                state["extras"][key] = _regroup_bank(extra, [s["extras"][key] for s in saved])
        self.load_state_dict(state)
        # the epoch's running sums as if this worker count had run the whole epoch; skipped samples counted once
        self.epoch_sums = {k: (v * world if rank == 0 else 0.0) for k, v in state["epoch_sums_per_rank"].items()}
        self.stream.skipped = sum(int(s["stream"].get("skipped", 0)) for s in saved) if rank == 0 else 0
        return saved_world


def _regroup_bank(bank: SyncedBank, saved: list[dict]) -> dict:
    """``bank``'s state with the codes of its items taken from the banks the
    ranks of another worker count saved (each holds its ranks' items, by
    global item index, or all of them)."""
    own = bank.state_dict()
    ours = own["bank"]
    count = max(int(s["bank"]["index"].max()) + 1 if "index" in s["bank"] else len(s["bank"]["codes"]) for s in saved)
    codes = torch.zeros(count, ours["codes"].shape[1], dtype=ours["codes"].dtype)
    held = torch.zeros(count, dtype=torch.bool)
    for s in saved:
        b = s["bank"]
        where = b["index"] if "index" in b else torch.arange(len(b["codes"]))
        codes[where], held[where] = b["codes"], True
    mine = ours["index"] if "index" in ours else torch.arange(len(ours["codes"]))
    if int(mine.max()) >= count or not bool(held[mine].all()):
        raise CheckpointError("the checkpoint's code banks do not hold every item this rank needs: written for "
                              "another training set")
    return {**own, "bank": {**ours, "codes": codes[mine]}, "updates": saved[0]["updates"]}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, float]]
    log_records: list[dict[str, float]]  # one per log step: step and means since the previous one


# ---------------------------------------------------------------- the loop
def stage_model(cfg: RunConfig, stage: Stage, run_dir: Path, launch: Launch) -> nn.Module:
    """The model a stage starts from: the one it needs, or a fresh one."""
    if stage.needs:
        model = load_model(cfg.model, cfg.seed, run_dir / stage.needs / "model.pt", launch.device)
    else:
        model = build_model(cfg.model, cfg.seed, launch.device)
    if cfg.distributed.sync_batchnorm and launch.world > 1:  # statistics of the global batch, as one process sees
        model = convert_sync_batchnorm(model)
    return model


def open_stream(cfg: RunConfig, stage: Stage, source: DataSource, launch: Launch) -> ShardStream:
    """This rank's part of the stage's global order over the train split."""
    return ShardStream(StreamSpec(
        shard_dir=source.shard_dir, split="train", batch_size=getattr(cfg, stage.section).batch_size,
        image_size=cfg.data.image_size, rank=launch.rank, world_size=launch.world,
        num_workers=cfg.data.loader_workers, seed=cfg.seed + stage.seed_offset, skip_corrupt=cfg.data.skip_corrupt,
        base_url=source.base_url, source=source, resize=cfg.data.resize, slots=cfg.data.canonical_slots,
        micro_batches=cfg.distributed.grad_accum))


def train_stage(cfg: RunConfig, stage: Stage, run_dir: Path, launch: Launch, source: DataSource) -> TrainResult:
    """Run ``stage`` in this process and write ``<run_dir>/<stage.out>/model.pt``
    and ``train.json`` (rank 0). Restores the newest checkpoint first."""
    rank, metrics = launch.rank, launch.metrics
    tc = getattr(cfg, stage.section)
    model = stage_model(cfg, stage, run_dir, launch)
    loss_fn = build_hash_loss(cfg.train.loss, source.num_classes, cfg.model.bits, cfg.seed)
    bank = build_bank(cfg, source, loss_fn, launch.place, metrics.record_bank_sync)
    stream = open_stream(cfg, stage, source, launch)
    spe = stream.steps_per_epoch
    schedule = Schedule(tc.batch_size, stream.micro_batch, cfg.distributed.grad_accum, spe, tc.epochs * spe)
    total = schedule.total_steps
    updates = stage.defence.updates_per_step(tc) if stage.defence and stage.defence.updates_per_step else 1
    # the lr schedule counts optimizer updates: free training makes `updates` per batch
    backend = launch.make_backend(model, tc.optim, schedule if updates == 1 else dataclasses.replace(
        schedule, steps_per_epoch=spe * updates, total_steps=schedule.total_steps * updates))
    extras = build_extras(cfg, stage, source, bank,
                          lambda: build_bank(cfg, source, loss_fn, launch.place, metrics.record_bank_sync),
                          launch, schedule)
    hash_bank = extras.get("hash_bank")
    state = TrainState(stream, bank, extras)
    state.settings = training_digest(cfg, stage)

    with launch.checkpointer.restore() as ckpt_dir:
        if ckpt_dir is not None:
            saved_world = state.restore(ckpt_dir, rank, launch.world, backend)
            state.resumed_from, state.resumed_from_workers = state.step, saved_world
            state.restores.append({"step": state.step, "written_by_workers": saved_world, "workers": launch.world})
            rank_log.info("rank %d: restored step %d of %d from checkpoint %s%s", rank, state.step, total,
                          getattr(launch.checkpointer, "where", ckpt_dir),
                          f" (written by {saved_world} workers, now {launch.world})" if saved_world != launch.world
                          else "")
    if rank != 0:  # a checkpoint holds the passes over every rank: counted once, on rank 0
        state.passes = 0.0
    if state.step == 0 and stage.needs:
        fill_bank(cfg, source, backend.module, bank, launch.place, also=hash_bank)
    step_fn, on_epoch_end = make_step(stage, cfg, backend, bank, loss_fn, extras, launch, schedule)
    state.counter = PassCounter(backend.module, cfg.data.image_size)
    if on_epoch_end is not None and state.step == 0:  # the defence's probe of the starting model: its baseline
        state.counter.paused = True
        on_epoch_end(0)
        state.counter.paused = False
        backend.model.train()
    t0 = state.t_attempt = time.monotonic()
    log_records, epoch_rss = _loop(cfg, stage, state, schedule, step_fn, backend, launch, on_epoch_end)
    seconds = time.monotonic() - t0
    state.counter.remove()
    state.seconds += seconds
    _finish(cfg, stage, run_dir, state, schedule, backend, launch, log_records, epoch_rss)
    return TrainResult(state.step, seconds, state.history, log_records)


def training_digest(cfg: RunConfig, stage: Stage) -> str:
    """What a checkpoint of this stage must have been written with: its
    section (epochs, batch, optimizer, budget...), the model, the hash loss,
    the seed and the image settings; not the worker count or the ports."""
    tree = cfg.to_dict()
    shape = {"section": tree[stage.section], "model": tree["model"], "loss": cfg.train.loss, "seed": cfg.seed,
             "images": [cfg.data.image_size, cfg.data.resize], "stage": stage.name}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _loop(cfg: RunConfig, stage: Stage, state: TrainState, schedule: Schedule, step_fn, backend,
          launch: Launch, on_epoch_end=None) -> tuple[list[dict[str, float]], list[list[float]]]:
    """Steps until the stage's last, with epoch ends, log lines and checkpoints;
    returns the log records (this rank's view: means since the previous
    record) and every rank's resident memory at each epoch end."""
    rank, world, device, metrics = launch.rank, launch.world, launch.device, launch.metrics
    d, spe, total, accum = cfg.distributed, schedule.steps_per_epoch, schedule.total_steps, schedule.grad_accum
    stream = state.stream
    who = f"{stage.name} (rank {rank}/{world})" if world > 1 else stage.name
    progress = Progress(who, total - state.step, every_s=cfg.log_every_s if rank == 0 else 1e9)
    channels_last = device.type == "cuda"  # as build_model laid out the weights
    pending: list[dict[str, torch.Tensor]] = []
    log_records: list[dict[str, float]] = []
    last_log = t_interval = time.monotonic()
    skipped_reported = stream.skipped
    epoch_rss: list[list[float]] = []
    preemption = PreemptionWatch(launch, d.preemption_check_every, stage.name)
    backend.model.train()
    while state.step < total:
        t_step = time.monotonic()
        for _ in range(accum):
            x, y, index = (t.to(device, non_blocking=True) for t in next(stream))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            pending.append(step_fn((x, y, index), state.step))
        state.step += 1
        epoch_end = state.step % spe == 0
        preemption.step_s = time.monotonic() - t_step
        checkpoint = epoch_end or (d.checkpoint_every and state.step % d.checkpoint_every == 0)
        why = preemption.why_checkpoint(state.step, total)
        checkpoint = checkpoint or why is not None
        now = time.monotonic()
        if stream.skipped != skipped_reported:  # corrupt samples skipped (data.skip_corrupt)
            metrics.record_skipped(stream.skipped - skipped_reported)
            skipped_reported = stream.skipped
        if checkpoint or now - last_log >= cfg.log_every_s:
            means = _flush(pending, state, stage.name, schedule.micro_batch, now - t_interval, metrics, spe, accum)
            log_records.append({"step": state.step, **means})
            rate = schedule.global_batch * (len(pending) // accum) / max(now - t_interval, 1e-9)  # samples/s, all ranks
            launch.tracker.log({**prefixed("step", means), "step/lr": current_lr(backend.stepper),
                                "step/samples_per_s": rate}, state.step)
            progress.update(len(pending) // accum, epoch=(state.step - 1) // spe, loss=means["loss"])
            pending, last_log, t_interval = [], now, time.monotonic()
        if epoch_end:
            probe = {}
            if on_epoch_end is not None:  # the defence's probe: not training, not counted as passes
                for bank in (state.bank, *(v for v in state.extras.values() if isinstance(v, SyncedBank))):
                    bank.sync_table()  # the probe's mainstay codes from every rank's codes, at any worker count
                state.counter.paused = True
                probe = on_epoch_end(state.step // spe)
                state.counter.paused = False
                backend.model.train()
            epoch_rss.append(_end_epoch(cfg, stage, state, schedule, rank, world, probe))
            launch.tracker.log(prefixed("epoch", state.history[-1]), len(state.history))
        if checkpoint:
            t_ckpt = time.monotonic()
            _checkpoint(state, schedule, epoch_end, rank, backend, launch,
                        why or ("epoch end" if epoch_end else f"every {d.checkpoint_every} steps"))
            preemption.checkpoint_s = time.monotonic() - t_ckpt
            if why == "preemption deadline":
                preemption.wait_for_the_stop(state.step)
    return log_records, epoch_rss


def _end_epoch(cfg: RunConfig, stage: Stage, state: TrainState, schedule: Schedule, rank: int,
               world: int, probe: dict | None = None) -> list[float]:
    """The epoch's means into the history (over every worker), with the
    defence's epoch-end values (``probe``); returns every rank's resident
    memory now (flat across epochs in a healthy run)."""
    state.history.append({**_epoch_means(state.epoch_sums, schedule.steps_per_epoch * schedule.grad_accum, world),
                          **(probe or {})})
    state.epoch_sums = {}
    rss = all_gather_ragged(torch.tensor([_rss_mib()], dtype=torch.float64)).tolist()
    if rank == 0:
        log.info("%s epoch %d/%d %s", stage.name, state.step // schedule.steps_per_epoch,
                 getattr(cfg, stage.section).epochs, " ".join(f"{k}={v:.4g}" for k, v in state.history[-1].items()))
    return rss


def _checkpoint(state: TrainState, schedule: Schedule, epoch_end: bool, rank: int, backend, launch: Launch,
                why: str) -> None:
    """Every bank's statistics synced, then this rank's state into the checkpointer."""
    t = time.perf_counter()
    for bank in (state.bank, *(v for v in state.extras.values() if isinstance(v, SyncedBank))):
        bank.sync_table()
    spe, accum = schedule.steps_per_epoch, schedule.grad_accum
    means = state.history[-1] if epoch_end else {
        k: v / max(1, (state.step % spe) * accum) for k, v in state.epoch_sums.items()}
    launch.checkpointer.save(state.step, means, lambda directory: state.save(directory, rank, launch.world, backend, why))
    launch.metrics.record_checkpoint(time.perf_counter() - t)


def _epoch_means(sums: dict[str, float], entries: int, world: int) -> dict[str, float]:
    """The epoch's mean of each loss term over every worker's micro-batches
    (one all-reduce per epoch): the same history at any worker count."""
    keys = sorted(sums)
    total = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / (entries * world) for k, v in zip(keys, total.tolist())}


def _finish(cfg: RunConfig, stage: Stage, run_dir: Path, state: TrainState, schedule: Schedule, backend,
            launch: Launch, log_records: list[dict[str, float]], epoch_rss: list[list[float]]) -> None:
    """The model file and train.json (rank 0), with every rank's parameter digest."""
    rank, world = launch.rank, launch.world
    workers = [{"rank": r, **w} for r, w in enumerate(all_gather_json(launch.where))]
    digests = [bytes(r.tolist()).hex() for r in all_gather_ragged(
        torch.tensor(list(bytes.fromhex(backend.parameter_digest())), dtype=torch.uint8)[None])]
    skipped = all_gather_ragged(torch.tensor([state.stream.skipped], dtype=torch.int64)).tolist()
    passes = all_reduce_sum(torch.tensor([state.passes + state.counter.passes], dtype=torch.float64)).item()
    weights = backend.full_state_dict()  # collective under ZeRO-3
    if rank == 0:
        same = all(x == digests[0] for x in digests)
        if world > 1:
            log.info("%s: parameters %s across %d ranks", stage.name, "identical" if same else "DIFFER", world)
        out = run_dir / stage.out
        optim = getattr(cfg, stage.section).optim
        earlier = out / "train.json"
        if state.resumed_from == state.step and earlier.is_file():  # nothing trained now: keep what was recorded
            kept = json.loads(earlier.read_text())
            log_records, epoch_rss = kept.get("log", log_records), kept.get("epoch_rss_mib_per_rank", epoch_rss)
        save_model(cfg.model, out / "model.pt", weights, state.step)
        write_text_atomic(out / "train.json", json.dumps(
            {"history": state.history, "steps": state.step, "resumed_from_step": state.resumed_from,
             "resumed_from_workers": state.resumed_from_workers, "restores": state.restores, "schedule": {
                **{k: getattr(schedule, k) for k in ("global_batch", "micro_batch", "grad_accum",
                                                     "steps_per_epoch", "total_steps")},
                "workers": world, "lr": optim.lr * lr_factor(optim, schedule.global_batch),
                "lr_rule": _lr_rule(optim, schedule.global_batch),
                "sync_batchnorm": cfg.distributed.sync_batchnorm},
             "ranks": workers, "parameter_checksums": digests, "parameters_identical": same,
             "skipped_samples_per_rank": skipped, "epoch_rss_mib_per_rank": epoch_rss,
             "cost": training_cost(passes, state, schedule), "log": log_records}, indent=1))
    barrier()


def training_cost(passes: float, state: TrainState, schedule: Schedule) -> dict:
    """What the stage cost: forward/backward passes of the model (in
    full-resolution images; ``PassCounter``) per training image over the
    whole stage and per sample of a step, and the training loop's seconds
    over every attempt."""
    images = schedule.steps_per_epoch * schedule.global_batch  # the training images an epoch visits
    return {"passes": passes, "passes_per_image": passes / max(1, images),
            "passes_per_sample": passes / max(1, state.step * schedule.global_batch),
            "epochs": state.step / max(1, schedule.steps_per_epoch), "seconds": state.seconds}


def _lr_rule(optim, global_batch: int) -> str:
    """The lr rule in words, for train.json and the reports."""
    if optim.lr_scaling == "none" or optim.base_batch is None:
        return f"lr {optim.lr:g} as configured (lr_scaling: none)"
    f = lr_factor(optim, global_batch)
    return (f"lr {optim.lr:g} at batch {optim.base_batch}, x {f:.4g} ({optim.lr_scaling} scaling) at the global "
            f"batch {global_batch}" + (f", warm-up over {optim.warmup_epochs:g} epochs" if optim.warmup_epochs else ""))


def _rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    import psutil  # a dependency of ray[default]

    return psutil.Process().memory_info().rss / 2**20


def _flush(pending, state: TrainState, what: str, batch: int, seconds: float, metrics, spe: int,
           accum: int = 1) -> dict:
    """Read the pending micro-batches' outputs back to the host in one
    transfer, stop on a non-finite loss, add them to the epoch sums; returns
    their means. ``batch``: samples per micro-batch on this rank."""
    keys = list(pending[0])
    values = torch.stack([torch.stack([o[k].float() for k in keys]) for o in pending]).cpu()
    first = state.step - len(pending) // accum
    bad = (~torch.isfinite(values[:, keys.index("loss")])).nonzero()
    if len(bad):
        raise FloatingPointError(f"{what} loss is not finite at step {first + int(bad[0]) // accum}: stopping the run")
    sums = values.sum(0).tolist()
    for k, v in zip(keys, sums):
        state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v
    means = {k: v / len(pending) for k, v in zip(keys, sums)}
    metrics.record_step(means, batch * len(pending), seconds, (state.step - 1) // spe, steps=len(pending) // accum)
    return means
