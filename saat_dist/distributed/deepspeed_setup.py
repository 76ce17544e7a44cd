"""DeepSpeed engine from the run config: the only place DeepSpeed's dict is built."""

from __future__ import annotations

import torch

from saat_dist.config import DistributedConfig, OptimConfig
from saat_dist.training.optim import build_optimizer, build_scheduler


def deepspeed_config(d: DistributedConfig, micro_batch: int, world_size: int) -> dict:
    """DeepSpeed's config; the global batch is derived here, once:
    train_batch_size = micro batch x gradient accumulation x world size."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": micro_batch * d.grad_accum * world_size,
        "zero_optimization": {"stage": d.zero_stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": d.precision == "bf16"},
        # Our optimizers (torch Adam/SGD) are passed in; ZeRO needs this to accept them.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if d.gradient_clipping > 0:
        cfg["gradient_clipping"] = d.gradient_clipping
    return cfg


def build_engine(model: torch.nn.Module, optim: OptimConfig, d: DistributedConfig, micro_batch: int,
                 world_size: int, total_micro_steps: int):
    """(engine, scheduler): the engine is the model wrapper and the stepper."""
    import deepspeed

    optimizer = build_optimizer(model.parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, max(1, total_micro_steps // d.grad_accum))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(d, micro_batch, world_size))
    return engine, scheduler
