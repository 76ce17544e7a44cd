"""DeepSpeed engine from the run config: the only place DeepSpeed's dict is built."""

from __future__ import annotations

import torch

from saat_dist import optimizers
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
        # Under bf16, buffers (BatchNorm running statistics) follow the weights'
        # dtype: DeepSpeed otherwise keeps them fp32 and BatchNorm refuses the mix.
        "data_types": {"buffer_dtype": "bf16"} if d.precision == "bf16" else {},
        # Our optimizers (torch Adam/SGD) are passed in; ZeRO needs this to accept them.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Always explicit: DeepSpeed's own default clips at norm 1.0, which the
        # in-process launcher would not do (0 = off, as the reference code).
        "gradient_clipping": d.gradient_clipping,
    }
    return cfg


def import_deepspeed():
    """``import deepspeed`` without its autotuner importing MLflow: DeepSpeed
    imports MLflow whenever it is installed (1.5 s of CPU in every worker
    process, measured with ``-X importtime``), though training never runs its
    autotuner. MLflow stays importable afterwards (``tracking``)."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # meanwhile `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def skip_shm_comm_build() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory comm extension
    when its first comm backend starts (45-65 s on 2 cores, needs g++ and
    ninja; printed as "... built successfully" by every worker). Only
    DeepSpeed's inference all-reduce uses it: training's all-reduces go
    through torch.distributed (gloo). Marked incompatible, it is not built
    (DeepSpeed keeps the probe's dict for such edits)."""
    import_deepspeed()
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)  # DeepSpeed 0.19's probe result
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def _zero_knows_the_package_adam() -> None:
    """ZeRO names the optimizers it has tested by exact type (it appends its
    own Muon to the list so). The package's Adam is torch's, without the
    import of torch._dynamo (saat_dist.optimizers): listed beside it, ZeRO
    1-3 do not warn of an untested optimizer."""
    from deepspeed.runtime.zero import utils

    supported = getattr(utils, "ZERO_SUPPORTED_OPTIMIZERS", None)
    if isinstance(supported, list) and torch.optim.Adam in supported and optimizers.Adam not in supported:
        supported.append(optimizers.Adam)


def build_engine(model: torch.nn.Module, optim: OptimConfig, d: DistributedConfig, schedule, world_size: int):
    """(engine, scheduler): the engine is the model wrapper and the stepper.
    ``schedule``: the stage's ``trainer.Schedule``; DeepSpeed's global batch
    is its global batch (micro batch x grad_accum x workers, checked here)."""
    deepspeed = import_deepspeed()  # first: a plain `import deepspeed` imports MLflow
    _zero_knows_the_package_adam()

    if schedule.micro_batch * schedule.grad_accum * world_size != schedule.global_batch:
        raise ValueError(f"micro batch {schedule.micro_batch} x {schedule.grad_accum} x {world_size} workers "
                         f"is not the global batch {schedule.global_batch}")
    optimizer = build_optimizer(model.parameters(), optim, schedule.global_batch)
    scheduler = build_scheduler(optimizer, optim, schedule.total_steps, schedule.steps_per_epoch,
                                schedule.global_batch)
    skip_shm_comm_build()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(d, schedule.micro_batch, world_size))
    return engine, scheduler


class DeepSpeedBackend:
    """A DeepSpeed engine behind the training loop's backend surface (see
    ``saat_dist.training.backend``). The engine is the model wrapper and
    the stepper; ZeRO-3 specifics (partitioned parameters, consolidated
    state dicts) stay in this class."""

    TAG = "engine"

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, d: DistributedConfig, schedule,
                 world_size: int) -> None:
        self.engine, _ = build_engine(model, optim, d, schedule, world_size)
        self.model = self.stepper = self.engine
        self.module = self.engine.module
        self.zero_stage = d.zero_stage

    def save(self, directory) -> None:
        from saat_dist.comm.collectives import average_buffers

        # One BatchNorm state for all ranks: DeepSpeed saves rank 0's only, and
        # a resumed run must continue exactly as an uninterrupted one.
        average_buffers(self.module)
        self.engine.save_checkpoint(str(directory), tag=self.TAG)

    def load(self, directory) -> None:
        self.engine.load_checkpoint(str(directory), tag=self.TAG, load_module_strict=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU (collective under ZeRO-3:
        every rank must call it)."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict() or {}
        else:
            state = self.module.state_dict()
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state.items()}

    def parameter_digest(self) -> str:
        from saat_dist.training.backend import parameter_digest

        def gather(p):
            import contextlib

            import deepspeed

            return deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_tensor") else contextlib.nullcontext()

        return parameter_digest(self.module.named_parameters(), gather)
