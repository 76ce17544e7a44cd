"""Typed run configuration, loaded from YAML with ``--set key=value`` overrides.

Every section is a pydantic v2 dataclass (``saat_dist.config_fields``):
each field carries its description and its range, budgets take ``N/255``,
and unknown keys and bad values raise ``ConfigError`` naming the source and
the key before any work starts. ``config_json_schema()`` is the schema of
docs/config.schema.json; ``render_config`` is ``saat-dist config show``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from saat_dist.config_fields import Budget, StepSize, field, parse_fraction, section
from saat_dist.defences import DEFENCES as DEFENCE_REGISTRY
from saat_dist.defences.atrdh import ATRDHConfig
from saat_dist.defences.base import AdvTrainConfig
from saat_dist.defences.cgat import CgATConfig
from saat_dist.defences.pgd_at import PGDATConfig
from saat_dist.defences.gaussian import GaussianConfig
from saat_dist.certify_settings import CertifyConfig
from saat_dist.defences.saat import SAATConfig
from saat_dist.defences.saat_noise import SAATNoiseConfig
from saat_dist.defences.saat_curriculum import SAATCurriculumConfig
from saat_dist.defences.saat_fgsm import SAATFGSMConfig
from saat_dist.defences.saat_free import SAATFreeConfig
from saat_dist.attacks import ATTACK_REGISTRY
from saat_dist.attacks.anchor import AnchorAttackConfig
from saat_dist.attacks.hag import HAGConfig
from saat_dist.attacks.prototype import THAConfig
from saat_dist.attacks.sdha import SDHAConfig
from saat_dist.attacks.square import SquareConfig
from saat_dist.attacks.transfer import TransferConfig
from saat_dist.models.model_file import ModelConfig
from saat_dist.training.optim import OptimConfig


class ConfigError(ValueError):
    pass


ADV_SECTIONS = tuple(DEFENCE_REGISTRY)  # config sections of the adversarial-training defences (their registry)
DEFENCES = ("none", *DEFENCE_REGISTRY)  # 'none': the benign model; the others: saat_dist.defences
# the paper's protocol: the default experiment.defences (the fast SAAT modes are named where wanted)
DEFAULT_DEFENCES = ("none", *(n for n, d in DEFENCE_REGISTRY.items() if d.in_default_experiment))
ATTACKS = tuple(ATTACK_REGISTRY)  # every attack of the evaluation suite (saat_dist.attacks)
DEFAULT_ATTACKS = tuple(name for name, a in ATTACK_REGISTRY.items() if a.default)
HashLoss = Literal["dph", "dpsh", "hashnet", "csq", "dpn", "hswd", "ortho"]


@section
class DemoDataConfig:
    """Demo data parameters (the embedded multi-label MNIST mosaics)."""

    train: Annotated[int, Field(description="training images")] = 2000
    query: Annotated[int, Field(description="query (test) images")] = 500
    database: Annotated[int, Field(description="database images")] = 5000
    min_digits: Annotated[int, Field(description="fewest digits in a mosaic")] = 1
    max_digits: Annotated[int, Field(description="most digits in a mosaic (1 and 1: single-label variant)")] = 3
    grid: Annotated[int, Field(description="mosaic of grid x grid cells of 28 px")] = 2
    seed: Annotated[int, Field(description="seed of the demo data (same seed: byte-identical shards)")] = 0
    shard_size: Annotated[int, Field(description="target samples per shard")] = 500
    colour: Annotated[bool, Field(description="harder variant: random background and digit colours")] = False
    clutter: Annotated[int, Field(description=(
        "harder variant: stroke fragments of non-label digits per mosaic, in empty cells"))] = 0


@section
class DataConfig:
    """Data: where the shards are and how images are read."""

    shard_dir: Annotated[str, Field(description=(
        "directory with manifest.json and the shards (output of `data convert`)"))] = "data/demo/shards"
    build_demo: Annotated[bool, Field(description=(
        "build the embedded demo data set here if shard_dir has no manifest"))] = True
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    image_size: Annotated[int, Field(ge=16, le=1024, description=(
        "images are resized to image_size x image_size"))] = 32
    resize: Annotated[int | None, Field(description=(
        "if set: resize the shorter side to this, then centre-crop image_size (the reference: 256 then 224); "
        "null: resize straight to image_size x image_size"))] = None
    loader_workers: Annotated[int, Field(ge=0, description=(
        "DataLoader worker processes per rank (0: read in the training process); they change the speed, never "
        "the samples of a step"))] = 0
    canonical_slots: Annotated[int, Field(ge=0, description=(
        "the training order is defined over this many slots of the train shards (0: one per shard); any worker "
        "count that divides it sees the same global batches (data.order)"))] = 0
    skip_corrupt: Annotated[bool, Field(description=(
        "skip corrupt samples (and the unreadable rest of a broken shard) with a warning, counted in "
        "saat_skipped_samples_total and the report; off: stop with one line naming shard and sample"))] = False
    base_url: Annotated[str | None, Field(description=(
        "read manifest + shards from here instead of shard_dir: a prefix (http://host/shards) or a template "
        "with {name} (pipe:aws s3 cp s3://b/shards/{name} -)"))] = None
    verify_sha256: Annotated[bool, Field(description=(
        "check each shard's bytes against the manifest's sha256 as they stream past (no second read): a changed "
        "shard stops the run naming it (with skip_corrupt: the whole shard is skipped, counted)"))] = True

    @model_validator(mode="after")
    def _crop_fits(self) -> DataConfig:
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(f"resize: must be >= data.image_size ({self.image_size}) to centre-crop it, or null")
        return self


@section
class TrainConfig:
    """Benign training."""

    loss: Annotated[HashLoss, Field(description="benign hashing loss")] = "dph"
    epochs: Annotated[int, Field(ge=0, description=(
        "training epochs (of split count // batch_size steps, at any worker count)"))] = 6
    batch_size: Annotated[int, Field(ge=2, description=(
        "the global batch: samples per optimizer step over all workers (each takes batch_size / workers); "
        "BatchNorm needs two"))] = 64
    optim: OptimConfig = field(default_factory=OptimConfig, description="optimizer of benign training")


@section
class AttackConfig:
    """The evaluation attacks: the shared budget and batch, the mainstay
    attack's own settings (saat_dist.attacks.mainstay_pgd), and one section
    per baseline, declared in its attack's file."""

    eps: Annotated[Budget, Field(description="L-inf budget of the evaluation attacks (a number or N/255)")] = 16 / 255
    step_size: Annotated[StepSize, Field(description="the mainstay attack's PGD step (a number or N/255)")] = 1 / 255
    iters: Annotated[int, Field(ge=1, description=(
        "the mainstay attack's PGD iterations (untargeted and targeted)"))] = 100
    loss: Annotated[Literal["plain", "sharp"], Field(description=(
        "attack loss (sharp: the reference generators' loss)"))] = "sharp"
    batch_size: Annotated[int, Field(ge=1, description=(
        "queries per global attack batch (batch b runs on worker b % workers)"))] = 128
    restarts: Annotated[int, Field(ge=1, description=(
        "random restarts of the mainstay attack in `saat-dist experiment` (the strongest run per query is kept); "
        "`saat-dist run` makes one run and leaves restarts to its strong check"))] = 3
    strong_factor: Annotated[int, Field(ge=1, description=(
        "the strong check (attack 'mainstay_strong') runs strong_factor x iters ..."))] = 5
    strong_restarts: Annotated[int, Field(ge=1, description=(
        "... with this many random restarts (worst case per query) ..."))] = 3
    strong_queries: Annotated[int, Field(ge=0, description=(
        "... on the first strong_queries queries (0: all); the plain attack is re-scored on the same ones"))] = 100
    hag: HAGConfig = field(default_factory=HAGConfig)
    sdha: SDHAConfig = field(default_factory=SDHAConfig)
    dhta: AnchorAttackConfig = field(default_factory=AnchorAttackConfig)
    p2p: AnchorAttackConfig = field(default_factory=lambda: AnchorAttackConfig(anchors=1),
                                    description="P2P: DHTA with 1 anchor code")
    tha: THAConfig = field(default_factory=THAConfig)
    square: SquareConfig = field(default_factory=SquareConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)


@section
class EvalConfig:
    """Retrieval evaluation (run and experiment alike)."""

    top_k: Annotated[int, Field(ge=1, description="mAP@top_k (the reference uses 5000)")] = 5000
    num_queries: Annotated[int, Field(ge=0, description=(
        "evaluate (and attack) the first num_queries queries (0: all); every attack uses the same ones"))] = 0
    pr_levels: Annotated[int, Field(ge=2, description="recall levels of the PR curve (11: steps of 0.1)")] = 11
    pr_points: Annotated[Literal["interpolated", "reference"], Field(description=(
        "interpolated precision at recall 0, 0.1, ..., 1 (queries without relevant items left out), or the "
        "reference's points: recall 1/(L-1) ... 1, precision where the ranking first reaches that share of the "
        "relevant items, averaged over all queries"))] = "interpolated"
    precision_at: Annotated[list[Annotated[int, Field(ge=1)]], Field(description="N of precision@N")] = field(
        default_factory=lambda: [100, 200, 500, 1000])
    batch_size: Annotated[int, Field(ge=1, description="images per encoding batch")] = 256


@section
class DistributedConfig:
    """Ray Train + DeepSpeed."""

    num_workers: Annotated[Annotated[int, Field(ge=0)] | list[int], Field(description=(
        "Ray Train workers (processes); 0 runs every stage in this process, without Ray; [min, max]: elastic "
        "(Ray Train starts with what the cluster has, at least min, and restarts from the newest checkpoint with "
        "fewer workers when a node is lost or more when nodes join; the global batch stays as configured; needs "
        "zero_stage 0)"))] = 2
    placement_strategy: Annotated[Literal["PACK", "SPREAD", "STRICT_SPREAD"], Field(description=(
        "Ray placement of the workers: PACK fills a node first; SPREAD (the cluster configs) one worker per node "
        "where it can; STRICT_SPREAD one per node or wait"))] = "PACK"
    elastic_resize_s: Annotated[float, Field(gt=0, description=(
        "with elastic num_workers: how often Ray Train looks for room to grow the worker group (a restart from "
        "the newest checkpoint)"))] = 60.0
    worker_start_timeout_s: Annotated[float, Field(gt=0, description=(
        "how long a (re)started worker group waits for the resources of its workers (its placement group) "
        "before Ray Train tries again (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; the workers' own start is not "
        "bounded by it); elastic: just after a node's loss Ray may still count its resources and ask for too "
        "many workers, and shrinks only after this wait"))] = 60.0
    address: Annotated[str | None, Field(description=(
        "Ray cluster to join (e.g. \"auto\", \"ray://head:10001\"); null starts a local Ray"))] = None
    use_gpu: Annotated[bool, Field(description="one GPU per worker (set device to auto or cuda)")] = False
    cpus_per_worker: Annotated[float, Field(ge=0, description="CPUs Ray reserves per worker")] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0, description="GPUs Ray reserves per worker when use_gpu")] = 1.0
    zero_stage: Annotated[Literal[0, 1, 2, 3], Field(description="DeepSpeed ZeRO stage: 0, 1, 2 or 3")] = 0
    precision: Annotated[Literal["fp32", "bf16"], Field(description=(
        "training precision of the Ray/DeepSpeed workers (bf16 is tested with ZeRO 2; in-process training stays "
        "fp32) and of evaluation"))] = "fp32"
    grad_accum: Annotated[int, Field(ge=1, description=(
        "micro-batches per step: each worker's share of the global batch goes through in this many "
        "forward/backward passes, for memory; the global batch stays, but the bank then sees each micro-batch's "
        "codes before the next one's loss and BatchNorm normalises per micro-batch, so the numbers move "
        "slightly"))] = 1
    sync_batchnorm: Annotated[bool, Field(description=(
        "BatchNorm statistics over the whole global batch (all workers' shares; an all-gather per BatchNorm layer "
        "per training forward); false: each worker's share, as DDP's default, and the answer then depends on the "
        "worker count"))] = True
    gradient_clipping: Annotated[float, Field(ge=0, description=(
        "clip gradients to this global norm, both launchers (0: off, as the reference; DeepSpeed's own default "
        "would be 1.0)"))] = 0.0
    bank_sync_every: Annotated[int, Field(ge=1, description=(
        "all-reduce the code bank's label-set table every N steps (and at epoch ends)"))] = 1
    checkpoint_every: Annotated[int, Field(ge=0, description=(
        "also checkpoint every N steps (0: only at epoch ends)"))] = 0
    storage_path: Annotated[str | None, Field(description=(
        "Ray Train storage for checkpoints (null: <output_dir>/ray); shared or s3:// on clusters"))] = None
    max_failures: Annotated[int, Field(ge=-1, description=(
        "Ray Train restarts the worker group from the newest checkpoint up to this many times (worker errors, "
        "lost nodes; -1: no limit)"))] = 2
    max_preemptions: Annotated[int, Field(ge=-1, description=(
        "restarts after node preemptions (Ray's drain notices), counted apart from max_failures "
        "(-1: no limit)"))] = -1
    preemption_notices: Annotated[bool, Field(description=(
        "act on preemption notices (the cluster configs): a Ray Train watcher per worker group and a check "
        "every preemption_check_every steps; on a notice every worker checkpoints at once, trains on and "
        "checkpoints again just before the node's deadline, so no step is redone. Off (the default, for one "
        "machine): no watcher and no checks; a preempted node still restarts the group, from the newest "
        "regular checkpoint"))] = False
    preemption_check_every: Annotated[int, Field(ge=1, description=(
        "steps between checks for a preemption notice (a barrier over the workers; with preemption_notices); "
        "on a notice every worker checkpoints at once, trains on, checkpoints again when the node's deadline is "
        "three steps, two checkpoints and the time Ray Train takes to keep a checkpoint (two polls, "
        "2 x RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 4 s by default) away and waits for Ray to stop it"))] = 1
    preemption_poll_s: Annotated[float, Field(gt=0, description=(
        "how often Ray Train polls Ray for draining nodes (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S): a preempted "
        "node's grace must cover this, preemption_check_every steps, two checkpoints and the time Ray Train "
        "takes to keep the last one (4 s by default)"))] = 5.0
    num_to_keep: Annotated[int, Field(ge=1, description=(
        "checkpoints kept per Ray run: a stage's, or a whole `saat-dist run`'s (its newest, the latest stage's)"))] = 2
    local_cpus: Annotated[Annotated[int, Field(ge=1)] | None, Field(description=(
        "CPUs of the local Ray started when address is null (null: all)"))] = None

    @model_validator(mode="after")
    def _layout(self) -> DistributedConfig:
        if isinstance(self.num_workers, list):
            lo_hi = self.num_workers
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"num_workers: {lo_hi}: an elastic range is [min, max] with 1 <= min <= max")
            # DeepSpeed's ZeRO 1-3 checkpoints hold one optimizer partition per
            # rank: they do not load at another worker count
            if self.zero_stage != 0:
                raise ValueError(f"num_workers: elastic {lo_hi} needs distributed.zero_stage 0 (ZeRO "
                                 f"{self.zero_stage} saves one optimizer partition per worker; they cannot be "
                                 "re-split)")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError("gpus_per_worker: must be > 0 when use_gpu")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def worker_counts(self) -> list[int]:
        """Every worker count a stage may run at: one, or each of an elastic range."""
        if isinstance(self.num_workers, list):
            return list(range(self.num_workers[0], self.num_workers[1] + 1))
        return [self.num_workers]

    @property
    def in_process(self) -> bool:
        """num_workers 0: every stage in this process, without Ray."""
        return self.num_workers == 0


@section
class MetricsConfig:
    """Prometheus."""

    enabled: Annotated[bool, Field(description="serve Prometheus metrics from every worker")] = True
    bind: Annotated[str, Field(description=(
        "address the metrics servers bind to (0.0.0.0 only inside a cluster network)"))] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535, description=(
        "0: any free port; N: port N + local rank. Chosen ports land in <output_dir>/metrics/"))] = 0
    linger_s: Annotated[float, Field(ge=0, le=600, description=(
        "seconds a worker keeps serving after withdrawing its target file at the end of a stage, so Prometheus "
        "(which applies discovery changes every 5 s) drops it before the endpoint closes"))] = 6.0


@section
class TrackingConfig:
    """Experiment tracking, from rank 0: TensorBoard event files and, optionally, MLflow runs."""

    tensorboard: Annotated[bool, Field(description=(
        "TensorBoard event files under <run_dir>/tensorboard/<stage> (losses, bits flipped, lr, samples/s, "
        "evaluation metrics)"))] = True
    mlflow_tracking_uri: Annotated[str | None, Field(description=(
        "MLflow tracking URI, e.g. file:///path/mlruns or http://host:5000 (null: no MLflow)"))] = None
    mlflow_experiment: Annotated[str, Field(min_length=1, description="MLflow experiment name")] = "saat-dist"

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _mlflow_installed(cls, uri: str | None) -> str | None:
        # at load time, before any worker starts (saat_dist.monitoring.tracking checks again at launch)
        if uri and importlib.util.find_spec("mlflow") is None:
            raise ValueError(f"{uri!r} is set but MLflow is not installed (pip install 'saat-dist[mlflow]', "
                             "mlflow-skinny==3.18.0; or leave the key unset)")
        return uri


@section
class ChecksConfig:
    """Thresholds of the evaluation checks."""

    blackbox_margin: Annotated[float, Field(ge=0, description=(
        "'black-box beats white-box' triggers when the black-box mAP is below every white-box untargeted mAP by "
        "more than this"))] = 0.0
    min_drop: Annotated[float, Field(ge=0, description=(
        "'mAP not falling as eps grows' triggers when, after an earlier step of experiment.eps_sweep lowered mAP "
        "by this much, a step to a larger eps lowers it by less (or the whole sweep does, or a step raises "
        "it) ..."))] = 0.005
    floor_margin: Annotated[float, Field(ge=0, description=(
        "... while mAP is still more than this above both the theory bound and the random-code floor"))] = 0.05


@section
class ExperimentConfig:
    """`saat-dist experiment`: the grid and its reports."""

    hashes: Annotated[list[str], Field(description="hash losses of the grid (train.loss values)")] = field(
        default_factory=lambda: ["dph"])
    bits: Annotated[list[Annotated[int, Field(ge=8, le=1024)]], Field(
        min_length=1, description="code lengths of the grid")] = field(default_factory=lambda: [32])
    defences: Annotated[list[str], Field(description="'none' is the benign model", json_schema_extra={
        "items": {"enum": list(DEFENCES)}})] = field(default_factory=lambda: list(DEFAULT_DEFENCES))
    attacks: Annotated[list[str], Field(description="attacks run on every model", json_schema_extra={
        "items": {"enum": list(ATTACKS)}})] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    transfer: Annotated[bool, Field(description=(
        "also score BIM/DI/NI/SI-NI/VMI examples crafted on the benign model on every defence"))] = True
    eps_sweep: Annotated[list[Budget], Field(description=(
        "budgets of the mAP-vs-eps curve (mainstay attack), increasing; numbers or N/255"))] = field(
        default_factory=lambda: [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255])
    num_queries: Annotated[Annotated[int, Field(ge=0)] | None, Field(description=(
        "deprecated: eval.num_queries (the one setting of both evaluations); when set, it is copied there with "
        "a warning"))] = None
    certify: Annotated[bool, Field(description=(
        "also certify every model of every cell (center smoothing, the certify section) and write the certified "
        "table beside Table II"))] = False
    retrieval_queries: Annotated[int, Field(ge=0, description="queries shown in the retrieval picture")] = 4
    retrieval_top: Annotated[int, Field(ge=1, description="results shown per query")] = 10
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    @field_validator("hashes")
    @classmethod
    def _known_losses(cls, hashes: list[str]) -> list[str]:
        from saat_dist.hashing.losses import LOSSES

        if not hashes or not all(h in LOSSES for h in hashes):
            raise ValueError(f"must be a non-empty list of {list(LOSSES)}, got {hashes}")
        return hashes

    @field_validator("defences")
    @classmethod
    def _known_defences(cls, defences: list[str]) -> list[str]:
        # the registry, not a Literal: a new defence file extends it
        if not defences or not all(d in DEFENCES for d in defences) or len(set(defences)) != len(defences):
            raise ValueError(f"must be distinct values of {list(DEFENCES)}, got {defences}")
        return defences

    @field_validator("attacks")
    @classmethod
    def _known_attacks(cls, attacks: list[str]) -> list[str]:
        if not all(t in ATTACKS for t in attacks) or len(set(attacks)) != len(attacks):
            raise ValueError(f"must be distinct values of {list(ATTACKS)}, got {attacks}")
        return attacks

    @field_validator("eps_sweep")
    @classmethod
    def _increasing(cls, sweep: list[float]) -> list[float]:
        if sweep != sorted(set(sweep)):
            raise ValueError(f"must be increasing distinct values in [0, 1], got {sweep}")
        return sweep


@section
class RunConfig:
    """A saat-dist run: every stage's settings."""

    name: Annotated[str, Field(description="run name, used in logs and reports")] = "demo"
    output_dir: Annotated[str, Field(description="where checkpoints, report.json/md and plots go")] = "runs/demo"
    seed: Annotated[int, Field(description="seed of models, data order and attacks")] = 0
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description=(
        "auto: CUDA when visible, else CPU"))] = "auto"
    log_every_s: Annotated[float, Field(ge=0, description="seconds between progress lines")] = 10.0
    resume: Annotated[Literal["off", "auto"], Field(description=(
        "auto (the cluster configs): a rerun of the same command skips finished stages and continues an "
        "interrupted one from the newest complete checkpoint under distributed.storage_path (what a restarted "
        "head or driver needs); off: stages start afresh. `--resume [auto|off]` overrides it"))] = "off"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    saat: SAATConfig = field(default_factory=SAATConfig)
    cgat: CgATConfig = field(default_factory=CgATConfig)
    atrdh: ATRDHConfig = field(default_factory=ATRDHConfig)
    pgd_at: PGDATConfig = field(default_factory=PGDATConfig)
    saat_fgsm: SAATFGSMConfig = field(default_factory=SAATFGSMConfig)
    saat_free: SAATFreeConfig = field(default_factory=SAATFreeConfig)
    saat_curriculum: SAATCurriculumConfig = field(default_factory=SAATCurriculumConfig)
    gaussian: GaussianConfig = field(default_factory=GaussianConfig)
    saat_noise: SAATNoiseConfig = field(default_factory=SAATNoiseConfig)
    attack: AttackConfig = field(default_factory=AttackConfig, description="evaluation attacks")
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig, description=(
        "certified robustness by center smoothing (`saat-dist certify`)"))

    @model_validator(mode="after")
    def _across_sections(self) -> RunConfig:
        """Checks across sections, at load time, before any worker or Ray
        starts; each failure names the key. Options that do nothing in the
        chosen mode are warned about (``warnings()``)."""
        if self.experiment.num_queries is not None:  # deprecated: one setting for both evaluations
            if self.eval.num_queries not in (0, self.experiment.num_queries):
                raise ValueError(f"experiment.num_queries ({self.experiment.num_queries}) is deprecated and "
                                 f"differs from eval.num_queries ({self.eval.num_queries}): set only "
                                 "eval.num_queries")
            self.eval.num_queries, self.experiment.num_queries = self.experiment.num_queries, None
            self._deprecated = ["experiment.num_queries is deprecated: set eval.num_queries (copied there)"]
        if self.distributed.use_gpu and self.device == "cpu":
            raise ValueError("device: is 'cpu' but distributed.use_gpu is true")
        for name in ("train", *ADV_SECTIONS):
            self._check_batch(name)
        return self

    def _check_batch(self, name: str) -> None:
        """A training section's global batch against the worker layout (at
        every worker count of an elastic range)."""
        d, batch = self.distributed, getattr(self, name).batch_size
        for workers in (max(1, w) for w in d.worker_counts):
            if batch % (workers * d.grad_accum):
                raise ValueError(f"{name}.batch_size: the global batch {batch} must split evenly into {workers} "
                                 f"worker(s) x {d.grad_accum} micro-batch(es) (distributed.num_workers x "
                                 "distributed.grad_accum)")
            per_bn = batch // workers // d.grad_accum * (workers if d.sync_batchnorm else 1)
            if per_bn < 2:
                raise ValueError(f"{name}.batch_size: BatchNorm would normalise over {per_bn} sample(s) (a "
                                 "micro-batch, over every worker with distributed.sync_batchnorm): it needs two")

    def warnings(self) -> list[str]:
        """Options set away from their defaults that have no effect in this mode."""
        d, default = self.distributed, DistributedConfig()
        out = list(getattr(self, "_deprecated", []))
        if d.in_process:
            for key in ("bank_sync_every", "zero_stage", "use_gpu", "max_failures", "storage_path", "address"):
                if getattr(d, key) != getattr(default, key):
                    out.append(f"distributed.{key}={getattr(d, key)!r} has no effect with distributed.num_workers=0 "
                               "(everything runs in this process)")
        if d.address is not None and d.local_cpus is not None:
            out.append("distributed.local_cpus has no effect when joining a cluster (distributed.address is set)")
        if self.train.loss == "csq" and d.bank_sync_every != 1 and self.saat.epochs == 0:
            out.append("distributed.bank_sync_every has no effect: CSQ reads no code bank and no SAAT stage runs")
        for name in ("train", *ADV_SECTIONS):
            out += getattr(self, name).optim.warnings(f"{name}.optim", getattr(self, name).epochs,
                                                      getattr(self, name).batch_size)
        if self.model.backbone != "small_cnn" and not self.model.pretrained_path and not self.model.factory:
            out.append(f"model.pretrained_path is not set: {self.model.backbone} starts from random weights "
                       "(the paper's models start from ImageNet weights, read from a local file)")
        c = self.certify
        dead = [r for r in c.radii if c.level(r) > 1]
        if dead:
            out.append(f"certify.radii {dead} cannot certify at sigma {c.sigma:g} with n_certify {c.n_certify} "
                       "(the certificate's level exceeds 1: every query abstains there); raise n_certify or lower "
                       "them")
        for name in ("gaussian", "saat_noise"):
            if getattr(self, name).sigma != c.sigma:
                out.append(f"{name}.sigma ({getattr(self, name).sigma:g}) differs from certify.sigma ({c.sigma:g}): "
                           "its model is certified under noise it was not trained with")
        if self.tracking.mlflow_tracking_uri is None and self.tracking.mlflow_experiment != "saat-dist":
            out.append("tracking.mlflow_experiment has no effect without tracking.mlflow_tracking_uri")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_defence_sections() -> None:
    """A defence file's registry entry needs its section here, of its type,
    extending ``AdvTrainConfig`` (the loop reads epochs, batch_size, optim and
    hash_bank from it): say so at import rather than at the first run."""
    hints = typing.get_type_hints(RunConfig)
    for d in DEFENCE_REGISTRY.values():
        if not issubclass(d.config, AdvTrainConfig):
            raise TypeError(f"saat_dist.defences.{d.name}: its config {d.config.__name__} must extend AdvTrainConfig")
        if hints.get(d.name) is not d.config:
            raise TypeError(f"saat_dist.defences registers '{d.name}': add `{d.name}: {d.config.__name__} = "
                            f"field(default_factory={d.config.__name__})` to RunConfig (saat_dist/config.py)")


_check_defence_sections()
_RUN_CONFIG = TypeAdapter(RunConfig)


# --- pydantic's errors as one line: the dotted key and a short message -----

_TYPE_MESSAGES = {
    "int_type": "expected an integer", "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list",
}


def _strip(tp: Any) -> Any:
    """The type under Annotated layers and an Optional's None."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]
            continue
        return tp


def _locate(loc: tuple) -> tuple[str, Any, Any]:
    """An error location's dotted key, the section holding its last key and
    the annotation there (None where it is unknown)."""
    key, holder, tp = "", None, RunConfig
    for item in loc:
        base = _strip(tp)
        if isinstance(item, int):
            key += f"[{item}]"
            tp = typing.get_args(base)[0] if typing.get_origin(base) is list else None
        elif dataclasses.is_dataclass(base):
            key, holder = f"{key}.{item}" if key else str(item), base
            tp = typing.get_type_hints(base, include_extras=True).get(item)
        # else: pydantic's tag of a union member ('constrained-int', 'list[int]'), not a key
    return key, holder, tp


def _bounds(tp: Any) -> dict[str, float]:
    """ge/gt/le/lt of an annotation, through its Annotated layers and union members."""
    out: dict[str, float] = {}
    if typing.get_origin(tp) is Annotated:
        out.update(_bounds(typing.get_args(tp)[0]))
        for meta in tp.__metadata__:
            for c in getattr(meta, "metadata", [meta]):  # a FieldInfo keeps its constraints in .metadata
                for name in ("ge", "gt", "le", "lt"):
                    if isinstance(c, getattr(annotated_types, name.capitalize())):
                        out[name] = getattr(c, name)
    elif typing.get_origin(tp) is not list:
        for arg in typing.get_args(tp):
            out.update(_bounds(arg))
    return out


def _num(x: float) -> str:
    return f"{x:g}"


def _range_message(bounds: dict[str, float], ctx: dict) -> str:
    lo = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    hi = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if lo and hi and set(ctx) & {lo[0], hi[0]}:
        return (f"must be in {'[' if lo[0] == 'ge' else '('}{_num(lo[1])}, {_num(hi[1])}"
                f"{']' if hi[0] == 'le' else ')'}")
    (kind, value), = ctx.items()
    return f"must be {dict(ge='>=', gt='>', le='<=', lt='<')[kind]} {_num(value)}"


def _error_line(e: ValidationError) -> str:
    """The first of pydantic's errors as ``key: message`` (or the unknown-key line)."""
    err = e.errors(include_url=False)[0]
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    key, holder, tp = _locate(err["loc"])
    base = _strip(tp)
    if kind == "unexpected_keyword_argument":
        known = sorted(f.name for f in dataclasses.fields(holder)) if holder else []
        return f"unknown key '{key}' (known keys here: {known})"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", err["msg"]))
        if dataclasses.is_dataclass(base):  # a section's check across its keys: "key: message"
            return f"{key}.{message}" if key else message
        return f"{key}: {message}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = _range_message(_bounds(tp), ctx)
    elif kind == "literal_error" and typing.get_origin(base) is Literal:
        message = f"{value!r} is not one of {list(typing.get_args(base))}"
    elif kind in _TYPE_MESSAGES:
        message = f"{_TYPE_MESSAGES[kind]}, got {value!r}"
    elif kind in ("dataclass_type", "dataclass_args_type") and dataclasses.is_dataclass(base):
        message = f"expected a mapping of {[f.name for f in dataclasses.fields(base)]}, got {value!r}"
    elif kind in ("too_short", "string_too_short"):
        message = "must not be empty"
    else:
        message = err["msg"]
    return f"{key or 'config'}: {message}"


def _validate(tree: dict) -> RunConfig:
    try:
        return _RUN_CONFIG.validate_python(tree)
    except ValidationError as e:
        raise ConfigError(_error_line(e)) from None


# --- files, presets and overrides ------------------------------------------

def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; ``base: other.yaml`` (relative to the file)
    is read first and this file's keys laid over it."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected the file name of another config, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ConfigError(f"{path}: base: {base} includes itself")
    return _merge(_read_tree(base_path, (*seen, path.resolve())), tree)


def _merge(base: dict, over: dict) -> dict:
    """``over`` laid onto ``base``, mappings merged key by key (lists and values replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def preset_root() -> Path:
    """The shipped configs: the package ``saat_dist.configs`` when installed,
    else ``configs/`` beside the package (a checkout)."""
    try:  # the package's folder, regular or namespace package alike (files() may be a MultiplexedPath)
        spec = importlib.util.find_spec("saat_dist.configs")
    except ModuleNotFoundError:
        spec = None
    found = [Path(p) for p in (spec.submodule_search_locations or []) if Path(p).is_dir()] if spec else []
    return found[0] if found else Path(__file__).resolve().parent.parent / "configs"


def presets() -> list[str]:
    """The names ``--preset`` takes: the shipped YAML files, relative, without .yaml."""
    root = preset_root()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def preset_path(name: str) -> Path:
    """The shipped config of a preset name (``demo``, ``paper/nus-wide``).
    The name is untrusted: a relative path of plain parts, inside the presets."""
    rel = name[:-5] if name.endswith(".yaml") else name
    if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*", rel) or any(p in ("..", ".") for p in rel.split("/")):
        raise ConfigError(f"--preset {name!r}: expected a shipped config's name such as paper/nus-wide "
                          "(no '..', no absolute path)")
    root = preset_root().resolve()
    path = (root / f"{rel}.yaml").resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ConfigError(f"--preset {name!r}: no such preset (shipped: {', '.join(presets())})")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                preset: str | None = None) -> RunConfig:
    """A RunConfig from a YAML file, a shipped preset (or the defaults) plus
    ``key=value`` overrides. Budgets take ``N/255`` in both.

    A section given in part keeps its other fields' defaults *of that
    section* (``--set saat.optim.lr=0.1`` keeps SAAT's SGD, weight decay and
    milestones), not those of the field's type."""
    if path is not None and preset is not None:
        raise ConfigError("give a config file or a preset, not both")
    if preset is not None:
        path = preset_path(preset)
    tree: dict = {}
    if path is not None:
        path = Path(path)
        tree = _read_tree(path)
    given: list[tuple[str, str]] = []  # (key, the --set item)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: not a YAML value ({' '.join(str(e).split())})") from e
        _set_path(tree, key.strip(), value)
        given.append((key.strip(), item))
    try:
        return _validate(_merge(RunConfig().to_dict(), tree))
    except ConfigError as e:
        raise ConfigError(f"{_override_source(str(e), given, path)}: {e}") from None


def _override_source(message: str, given: list[tuple[str, str]], path) -> str:
    """The ``--set`` item that set the failing key, else the file, else 'config'."""
    for key, item in reversed(given):
        if re.match(rf"(unknown key ')?{re.escape(key)}([.\[:']|$)", message):
            return f"--set {item}"
    return str(path) if path is not None else "config"


def config_from_dict(tree: dict) -> RunConfig:
    """A RunConfig from ``to_dict()`` output (e.g. sent to Ray workers)."""
    return _validate(tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from saat_dist.checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --- the schema, `config show` and `config check` ----------------------------

SCHEMA_FILE = "docs/config.schema.json"


def config_json_schema() -> dict:
    """The JSON Schema of a config file (docs/config.schema.json): for editor
    completion and checks of a YAML file's own keys (``base`` included)."""
    schema = _RUN_CONFIG.json_schema()
    schema["properties"] = {"base": {"type": "string", "description": (
        "another config file (relative to this one) read first; this file's keys are laid over it")},
        **schema["properties"]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "saat-dist/config.schema.json",
            "title": "saat-dist run config", **{k: v for k, v in schema.items() if k != "title"}}


def config_json_schema_text() -> str:
    return json.dumps(config_json_schema(), indent=2) + "\n"


def _descriptions(cls: type) -> dict[str, str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    own = getattr(cls, "__pydantic_fields__", {})  # a plain subclass inherits its base's: right for inherited keys
    out = {}
    for f in dataclasses.fields(cls):
        info = own.get(f.name)
        text = info.description if info is not None else None
        for meta in getattr(hints.get(f.name), "__metadata__", ()):
            text = text or getattr(meta, "description", None)
        out[f.name] = text or f.metadata.get("description", "")
    return out


def _is_budget(tp: Any) -> bool:
    """Whether an annotation takes N/255 (Budget, StepSize, a list or an Optional of them)."""
    if typing.get_origin(tp) is Annotated and any(
            getattr(m, "func", None) is parse_fraction for m in tp.__metadata__):
        return True
    return any(_is_budget(a) for a in typing.get_args(tp))


def _yaml_value(value: Any, budget: bool) -> str:
    """A value as YAML writes it in flow style; a budget as N/255 where that is its exact value."""
    if budget and isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v, True) for v in value) + "]"
    if budget and isinstance(value, float) and value and round(value * 255) / 255 == value:
        return f"{round(value * 255)}/255"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):  # a list of sections (phases)
        value = [dataclasses.asdict(v) for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").rstrip()


def render_config(cfg: RunConfig, header: list[str] | None = None, width: int = 100) -> str:
    """The config as YAML, each key under its description as a comment
    (``saat-dist config show``); the text loads back as a config file."""
    lines = [f"# {h}" for h in header or []] + ([""] if header else [])

    def emit(obj: Any, depth: int) -> None:
        pad = "  " * depth
        hints = typing.get_type_hints(type(obj), include_extras=True)
        for name, text in _descriptions(type(obj)).items():
            value = getattr(obj, name)
            section_here = dataclasses.is_dataclass(value)
            if depth == 0 and section_here:
                lines.append("")
            lines.extend(textwrap.wrap(text, width - len(pad), initial_indent=f"{pad}# ",
                                       subsequent_indent=f"{pad}# ", break_on_hyphens=False))
            if section_here:
                lines.append(f"{pad}{name}:")
                emit(value, depth + 1)
            else:
                lines.append(f"{pad}{name}: {_yaml_value(value, _is_budget(hints.get(name)))}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


def config_command(action: str, path: str | None = None, preset: str | None = None,
                   overrides: list[str] | None = None) -> int:
    """``saat-dist config show|check|schema``: what each prints on stdout."""
    if action == "schema":
        print(config_json_schema_text(), end="")
        return 0
    cfg = load_config(path, overrides, preset=preset)
    source = path or (f"preset {preset} ({preset_path(preset)})" if preset else "defaults")
    if action == "check":
        if cfg.model.factory:  # the user's model is built once: a factory that does not import or fit fails here
            from saat_dist.models.model_file import build_model

            build_model(cfg.model, cfg.seed, "cpu", image_size=cfg.data.image_size)
        print(f"ok: {source}")
        for warning in cfg.warnings():
            print(f"warning: {warning}")
        return 0
    header = [f"saat-dist config show: {source}" + "".join(f" --set {o}" for o in overrides or []),
              "The resolved config, every key under its description; it loads back with --config."]
    print(render_config(cfg, header), end="")
    return 0
