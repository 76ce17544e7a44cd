"""Single-process training loops for the benign and SAAT stages.

Each loop builds the stream, bank and optimizer, and calls ``benign_step`` /
``saat_step`` for ``epochs x steps_per_epoch`` steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from saat_dist.config import RunConfig
from saat_dist.data.stream import ShardStream, StreamSpec, load_split
from saat_dist.hashing import build_hash_loss
from saat_dist.mainstay import CodeBank
from saat_dist.progress import Progress
from saat_dist.training.encode import encode
from saat_dist.training.optim import build_optimizer, build_scheduler
from saat_dist.training.steps import SAATSettings, TorchStepper, benign_step, saat_step

log = logging.getLogger("saat_dist")


@dataclass
class LoopResult:
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch means


def _stream(cfg: RunConfig, batch_size: int, seed_offset: int) -> ShardStream:
    d = cfg.data
    return ShardStream(StreamSpec(
        shard_dir=d.shard_dir, split="train", batch_size=batch_size, image_size=d.image_size,
        num_workers=d.loader_workers, seed=cfg.seed + seed_offset, skip_corrupt=d.skip_corrupt,
        base_url=d.base_url))


def _to(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


def _run(what: str, epochs: int, stream: ShardStream, step_fn, every_s: float) -> LoopResult:
    total = epochs * stream.steps_per_epoch
    progress = Progress(what, total, every_s=every_s)
    history, step = [], 0
    for epoch in range(epochs):
        sums: dict[str, float] = {}
        for batch in stream.epoch():
            out = step_fn(batch, step)
            step += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            progress.update(1, epoch=epoch, loss=float(out["loss"]))
        history.append({k: v / stream.steps_per_epoch for k, v in sums.items()})
        log.info("%s epoch %d/%d %s", what, epoch + 1, epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in history[-1].items()))
    return LoopResult(step, progress.elapsed, history)


def train_benign(cfg: RunConfig, model: nn.Module, bank: CodeBank, num_classes: int, device) -> LoopResult:
    loss_fn = build_hash_loss(cfg.train.loss, num_classes, cfg.model.bits, cfg.seed)
    stream = _stream(cfg, cfg.train.batch_size, 0)
    optimizer = build_optimizer(model.parameters(), cfg.train.optim)
    stepper = TorchStepper(optimizer, build_scheduler(optimizer, cfg.train.optim, cfg.train.epochs * stream.steps_per_epoch))
    model.train()
    return _run("benign", cfg.train.epochs, stream,
                lambda b, s: benign_step(model, stepper, _to(b, device), bank, loss_fn, s), cfg.log_every_s)


def fill_bank(cfg: RunConfig, model: nn.Module, bank: CodeBank, device) -> None:
    """Initialise the bank with the model's binary codes of every training item."""
    images, _, index = load_split(cfg.data.shard_dir, "train", cfg.data.image_size, cfg.data.base_url)
    bank.update(index, encode(model, images, device, cfg.eval.batch_size))


def train_saat(cfg: RunConfig, model: nn.Module, bank: CodeBank, num_classes: int, device) -> LoopResult:
    """SAAT from the (benign) model; ``bank`` must hold its codes (``fill_bank``)."""
    loss_fn = build_hash_loss(cfg.train.loss, num_classes, cfg.model.bits, cfg.seed)
    stream = _stream(cfg, cfg.saat.batch_size, 1)
    optimizer = build_optimizer(model.parameters(), cfg.saat.optim)
    stepper = TorchStepper(optimizer, build_scheduler(optimizer, cfg.saat.optim, cfg.saat.epochs * stream.steps_per_epoch))
    s = cfg.saat
    settings = SAATSettings(eps=s.eps, step_size=s.step_size, iters=s.iters, lam=s.lam, mu=s.mu)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    model.train()
    return _run("saat", cfg.saat.epochs, stream,
                lambda b, st: saat_step(model, stepper, _to(b, device), bank, loss_fn, settings, st, gen),
                cfg.log_every_s)
