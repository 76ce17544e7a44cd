"""Typed run configuration, loaded from YAML with ``--set key=value`` overrides.

Every field is documented where it is declared. Unknown keys and bad values
raise ``ConfigError`` naming the key (and the allowed values) before any
work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from saat_dist.defences import DEFENCES as DEFENCE_REGISTRY
from saat_dist.defences.atrdh import ATRDHConfig
from saat_dist.defences.base import AdvTrainConfig
from saat_dist.defences.cgat import CgATConfig
from saat_dist.defences.pgd_at import PGDATConfig
from saat_dist.defences.saat import SAATConfig
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


@dataclass
class DemoDataConfig:
    train: int = 2000  # training images
    query: int = 500  # query (test) images
    database: int = 5000  # database images
    min_digits: int = 1  # fewest digits in a mosaic
    max_digits: int = 3  # most digits in a mosaic (1 and 1: single-label variant)
    grid: int = 2  # mosaic of grid x grid cells of 28 px
    seed: int = 0  # seed of the demo data (same seed: byte-identical shards)
    shard_size: int = 500  # target samples per shard
    colour: bool = False  # harder variant: random background and digit colours
    clutter: int = 0  # harder variant: stroke fragments of non-label digits per mosaic, in empty cells


@dataclass
class DataConfig:
    shard_dir: str = "data/demo/shards"  # directory with manifest.json and the shards (output of `data convert`)
    build_demo: bool = True  # build the embedded demo data set here if shard_dir has no manifest
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)  # demo data parameters
    image_size: int = 32  # images are resized to image_size x image_size
    resize: int | None = None  # if set: resize the shorter side to this, then centre-crop image_size (the reference: 256 then 224); None: resize straight to image_size x image_size
    loader_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process); they change the speed, never the samples of a step
    canonical_slots: int = 0  # the training order is defined over this many slots of the train shards (0: one per shard); any worker count that divides it sees the same global batches (data.order)
    skip_corrupt: bool = False  # skip corrupt samples (and the unreadable rest of a broken shard) with a warning, counted in saat_skipped_samples_total and the report; off: stop with one line naming shard and sample
    base_url: str | None = None  # read manifest + shards from here instead of shard_dir: a prefix (http://host/shards) or a template with {name} (pipe:aws s3 cp s3://b/shards/{name} -)
    verify_sha256: bool = True  # check each shard's bytes against the manifest's sha256 as they stream past (no second read): a changed shard stops the run naming it (with skip_corrupt: the whole shard is skipped, counted)


@dataclass
class TrainConfig:
    loss: Literal["dph", "dpsh", "hashnet", "csq", "dpn", "hswd", "ortho"] = "dph"  # benign hashing loss
    epochs: int = 6  # training epochs (of split count // batch_size steps, at any worker count)
    batch_size: int = 64  # the global batch: samples per optimizer step over all workers (each takes batch_size / workers)
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer of benign training


@dataclass
class AttackConfig:
    """The evaluation attacks: the shared budget and batch, the mainstay
    attack's own settings (saat_dist.attacks.mainstay_pgd), and one section
    per baseline, declared in its attack's file."""

    eps: float = 16 / 255  # L-inf budget of the evaluation attacks
    step_size: float = 1 / 255  # the mainstay attack's PGD step
    iters: int = 100  # the mainstay attack's PGD iterations (untargeted and targeted)
    loss: Literal["plain", "sharp"] = "sharp"  # attack loss (sharp: the reference generators' loss)
    batch_size: int = 128  # queries per global attack batch (batch b runs on worker b % workers)
    restarts: int = 3  # random restarts of the mainstay attack in `saat-dist experiment` (the strongest run per query is kept); `saat-dist run` makes one run and leaves restarts to its strong check
    strong_factor: int = 5  # the strong check (attack 'mainstay_strong') runs strong_factor x iters ...
    strong_restarts: int = 3  # ... with this many random restarts (worst case per query) ...
    strong_queries: int = 100  # ... on the first strong_queries queries (0: all); the plain attack is re-scored on the same ones
    hag: HAGConfig = field(default_factory=HAGConfig)  # HAG (Yang et al.): away from the clean code
    sdha: SDHAConfig = field(default_factory=SDHAConfig)  # SDHA (Lu et al.): away from relevant training codes
    dhta: AnchorAttackConfig = field(default_factory=AnchorAttackConfig)  # DHTA (Bai et al.): toward an anchor of 9 codes
    p2p: AnchorAttackConfig = field(default_factory=lambda: AnchorAttackConfig(anchors=1))  # P2P: DHTA with 1 anchor code
    tha: THAConfig = field(default_factory=THAConfig)  # THA (Wang et al.): toward a PrototypeNet code
    square: SquareConfig = field(default_factory=SquareConfig)  # black-box random search on the Hamming objective
    transfer: TransferConfig = field(default_factory=TransferConfig)  # BIM, DI-, NI-, SI-NI-, VMI-FGSM on the mainstay loss

    def problems(self, section: str) -> list[tuple[str, bool, str]]:
        out = [
            (f"{section}.eps", 0 <= self.eps <= 1, "must be in [0, 1]"),
            (f"{section}.step_size", 0 < self.step_size <= 1, "must be in (0, 1]"),
            (f"{section}.iters", self.iters >= 1, "must be >= 1"),
            (f"{section}.batch_size", self.batch_size >= 1, "must be >= 1"),
            (f"{section}.restarts", self.restarts >= 1, "must be >= 1"),
            (f"{section}.strong_factor", self.strong_factor >= 1, "must be >= 1"),
            (f"{section}.strong_restarts", self.strong_restarts >= 1, "must be >= 1"),
            (f"{section}.strong_queries", self.strong_queries >= 0, "must be >= 0 (0: all)"),
        ]
        for f in dataclasses.fields(self):  # each baseline's section, declared in its attack's file
            sub = getattr(self, f.name)
            if hasattr(sub, "problems"):
                out += sub.problems(f"{section}.{f.name}")
        return out


@dataclass
class EvalConfig:
    top_k: int = 5000  # mAP@top_k (the reference uses 5000)
    num_queries: int = 0  # evaluate (and attack) the first num_queries queries (0: all); every attack uses the same ones
    pr_levels: int = 11  # recall levels of the PR curve (11: steps of 0.1)
    pr_points: Literal["interpolated", "reference"] = "interpolated"  # interpolated precision at recall 0, 0.1, ..., 1 (queries without relevant items left out), or the reference's points: recall 1/(L-1) ... 1, precision where the ranking first reaches that share of the relevant items, averaged over all queries
    precision_at: list[int] = field(default_factory=lambda: [100, 200, 500, 1000])  # N of precision@N
    batch_size: int = 256  # images per encoding batch

    def problems(self, section: str) -> list[tuple[str, bool, str]]:
        return [(f"{section}.top_k", self.top_k >= 1, "must be >= 1"),
                (f"{section}.num_queries", self.num_queries >= 0, "must be >= 0 (0: all)"),
                (f"{section}.pr_levels", self.pr_levels >= 2, "must be >= 2"),
                (f"{section}.batch_size", self.batch_size >= 1, "must be >= 1"),
                (f"{section}.precision_at", all(n >= 1 for n in self.precision_at), "every N must be >= 1")]


@dataclass
class DistributedConfig:
    num_workers: int | list[int] = 2  # Ray Train workers (processes); 0 runs every stage in this process, without Ray; [min, max]: elastic (Ray Train starts with what the cluster has, at least min, and restarts from the newest checkpoint with fewer workers when a node is lost or more when nodes join; the global batch stays as configured; needs zero_stage 0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"  # Ray placement of the workers: PACK fills a node first; SPREAD (the cluster configs) one worker per node where it can; STRICT_SPREAD one per node or wait
    elastic_resize_s: float = 60.0  # with elastic num_workers: how often Ray Train looks for room to grow the worker group (a restart from the newest checkpoint)
    worker_start_timeout_s: float = 60.0  # how long a (re)started worker group waits for its workers before Ray Train tries again (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S); elastic: just after a node's loss Ray may still count its resources and ask for too many workers, and shrinks only after this wait
    address: str | None = None  # Ray cluster to join (e.g. "auto", "ray://head:10001"); None starts a local Ray
    use_gpu: bool = False  # one GPU per worker (set device to auto or cuda)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker
    gpus_per_worker: float = 1.0  # GPUs Ray reserves per worker when use_gpu
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    precision: Literal["fp32", "bf16"] = "fp32"  # training precision of the Ray/DeepSpeed workers (bf16 is tested with ZeRO 2; in-process training stays fp32) and of evaluation
    grad_accum: int = 1  # micro-batches per step: each worker's share of the global batch goes through in this many forward/backward passes, for memory; the global batch stays, but the bank then sees each micro-batch's codes before the next one's loss and BatchNorm normalises per micro-batch, so the numbers move slightly
    sync_batchnorm: bool = True  # BatchNorm statistics over the whole global batch (all workers' shares; an all-gather per BatchNorm layer per training forward); false: each worker's share, as DDP's default, and the answer then depends on the worker count
    gradient_clipping: float = 0.0  # clip gradients to this global norm, both launchers (0: off, as the reference; DeepSpeed's own default would be 1.0)
    bank_sync_every: int = 1  # all-reduce the code bank's label-set table every N steps (and at epoch ends)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    storage_path: str | None = None  # Ray Train storage for checkpoints (None: <output_dir>/ray); shared or s3:// on clusters
    max_failures: int = 2  # Ray Train restarts the worker group from the newest checkpoint up to this many times (worker errors, lost nodes)
    max_preemptions: int = -1  # restarts after node preemptions (Ray's drain notices), counted apart from max_failures (-1: no limit)
    preemption_check_every: int = 1  # steps between checks for a preemption notice (a barrier over the workers); on a notice every worker checkpoints at once, trains on, checkpoints again when the node's deadline is three steps and two checkpoints away and waits for Ray to stop it
    preemption_poll_s: float = 5.0  # how often Ray Train polls Ray for draining nodes (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S): a preempted node's grace must cover this, preemption_check_every steps and one checkpoint
    num_to_keep: int = 2  # checkpoints kept per stage
    local_cpus: int | None = None  # CPUs of the local Ray started when address is None (None: all)

    def problems(self, section: str) -> list[tuple[str, bool, str]]:
        return [
            *self._worker_problems(section),
            (f"{section}.elastic_resize_s", self.elastic_resize_s > 0, "must be > 0"),
            (f"{section}.worker_start_timeout_s", self.worker_start_timeout_s > 0, "must be > 0"),
            (f"{section}.max_preemptions", self.max_preemptions >= -1, "must be >= -1 (-1: no limit)"),
            (f"{section}.preemption_check_every", self.preemption_check_every >= 1, "must be >= 1"),
            (f"{section}.preemption_poll_s", self.preemption_poll_s > 0, "must be > 0"),
            (f"{section}.cpus_per_worker", self.cpus_per_worker >= 0, "must be >= 0"),
            (f"{section}.gpus_per_worker", self.gpus_per_worker > 0 if self.use_gpu else self.gpus_per_worker >= 0,
             "must be > 0 when use_gpu" if self.use_gpu else "must be >= 0"),
            (f"{section}.local_cpus", self.local_cpus is None or self.local_cpus >= 1, "must be >= 1 (or null: all)"),
            (f"{section}.zero_stage", self.zero_stage in (0, 1, 2, 3), "must be one of [0, 1, 2, 3]"),
            (f"{section}.grad_accum", self.grad_accum >= 1, "must be >= 1"),
            (f"{section}.gradient_clipping", self.gradient_clipping >= 0, "must be >= 0 (0: off)"),
            (f"{section}.bank_sync_every", self.bank_sync_every >= 1, "must be >= 1"),
            (f"{section}.checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            (f"{section}.max_failures", self.max_failures >= -1, "must be >= -1 (-1: no limit)"),
            (f"{section}.num_to_keep", self.num_to_keep >= 1, "must be >= 1"),
        ]

    def _worker_problems(self, section: str) -> list[tuple[str, bool, str]]:
        key = f"{section}.num_workers"
        if not isinstance(self.num_workers, list):
            return [(key, self.num_workers >= 0, "must be >= 0")]
        lo_hi = self.num_workers
        if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
            return [(key, False, f"{lo_hi}: an elastic range is [min, max] with 1 <= min <= max")]
        # DeepSpeed's ZeRO 1-3 checkpoints hold one optimizer partition per
        # rank: they do not load at another worker count
        return [(key, self.zero_stage == 0, f"elastic {lo_hi} needs distributed.zero_stage 0 (ZeRO "
                 f"{self.zero_stage} saves one optimizer partition per worker; they cannot be re-split)")]

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


@dataclass
class MetricsConfig:
    enabled: bool = True  # serve Prometheus metrics from every worker
    bind: str = "127.0.0.1"  # address the metrics servers bind to (0.0.0.0 only inside a cluster network)
    port: int = 0  # 0: any free port; N: port N + local rank. Chosen ports land in <output_dir>/metrics/
    linger_s: float = 6.0  # seconds a worker keeps serving after withdrawing its target file at the end of a stage, so Prometheus (which applies discovery changes every 5 s) drops it before the endpoint closes

    def problems(self, section: str) -> list[tuple[str, bool, str]]:
        return [(f"{section}.port", 0 <= self.port <= 65535, "must be in [0, 65535]"),
                (f"{section}.linger_s", 0 <= self.linger_s <= 600, "must be in [0, 600]")]


DEFENCES = ("none", *DEFENCE_REGISTRY)  # 'none': the benign model; the others: saat_dist.defences
ATTACKS = tuple(ATTACK_REGISTRY)  # every attack of the evaluation suite (saat_dist.attacks)
DEFAULT_ATTACKS = tuple(name for name, a in ATTACK_REGISTRY.items() if a.default)


@dataclass
class ChecksConfig:
    blackbox_margin: float = 0.0  # 'black-box beats white-box' triggers when the black-box mAP is below every white-box untargeted mAP by more than this
    min_drop: float = 0.005  # 'mAP not falling as eps grows' triggers when, after an earlier step of experiment.eps_sweep lowered mAP by this much, a step to a larger eps lowers it by less (or the whole sweep does, or a step raises it) ...
    floor_margin: float = 0.05  # ... while mAP is still more than this above both the theory bound and the random-code floor


@dataclass
class ExperimentConfig:
    hashes: list[str] = field(default_factory=lambda: ["dph"])  # hash losses of the grid (train.loss values)
    bits: list[int] = field(default_factory=lambda: [32])  # code lengths of the grid
    defences: list[str] = field(default_factory=lambda: list(DEFENCES))  # 'none' is the benign model
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))  # attacks run on every model
    transfer: bool = True  # also score BIM/DI/NI/SI-NI/VMI examples crafted on the benign model on every defence
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255])  # budgets of the mAP-vs-eps curve (mainstay attack)
    num_queries: int | None = None  # deprecated: eval.num_queries (the one setting of both evaluations); when set, it is copied there with a warning
    retrieval_queries: int = 4  # queries shown in the retrieval picture
    retrieval_top: int = 10  # results shown per query
    checks: ChecksConfig = field(default_factory=ChecksConfig)  # thresholds of the evaluation checks

    def problems(self, section: str) -> list[tuple[str, bool, str]]:
        from saat_dist.hashing.losses import LOSSES

        x = self
        return [
            (f"{section}.hashes", bool(x.hashes) and all(h in LOSSES for h in x.hashes),
             f"must be a non-empty list of {list(LOSSES)}, got {x.hashes}"),
            (f"{section}.bits", bool(x.bits) and all(8 <= b <= 1024 for b in x.bits), "must be a non-empty list in [8, 1024]"),
            (f"{section}.defences", bool(x.defences) and all(d in DEFENCES for d in x.defences)
             and len(set(x.defences)) == len(x.defences), f"must be distinct values of {list(DEFENCES)}, got {x.defences}"),
            (f"{section}.attacks", all(t in ATTACKS for t in x.attacks) and len(set(x.attacks)) == len(x.attacks),
             f"must be distinct values of {list(ATTACKS)}, got {x.attacks}"),
            (f"{section}.eps_sweep", all(0 <= v <= 1 for v in x.eps_sweep) and x.eps_sweep == sorted(set(x.eps_sweep)),
             "must be increasing distinct values in [0, 1]"),
            (f"{section}.num_queries", x.num_queries is None or x.num_queries >= 0, "must be >= 0 (0: all)"),
            (f"{section}.retrieval_queries", x.retrieval_queries >= 0, "must be >= 0"),
            (f"{section}.retrieval_top", x.retrieval_top >= 1, "must be >= 1"),
            (f"{section}.checks.min_drop", x.checks.min_drop >= 0, "must be >= 0"),
            (f"{section}.checks.floor_margin", x.checks.floor_margin >= 0, "must be >= 0"),
            (f"{section}.checks.blackbox_margin", x.checks.blackbox_margin >= 0, "must be >= 0"),
        ]


@dataclass
class RunConfig:
    name: str = "demo"  # run name, used in logs and reports
    output_dir: str = "runs/demo"  # where checkpoints, report.json/md and plots go
    seed: int = 0  # seed of models, data order and attacks
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when visible, else CPU
    log_every_s: float = 10.0  # seconds between progress lines
    resume: Literal["off", "auto"] = "off"  # auto (the cluster configs): a rerun of the same command skips finished stages and continues an interrupted one from the newest complete checkpoint under distributed.storage_path (what a restarted head or driver needs); off: stages start afresh. `--resume [auto|off]` overrides it
    data: DataConfig = field(default_factory=DataConfig)  # data
    model: ModelConfig = field(default_factory=ModelConfig)  # hash model
    train: TrainConfig = field(default_factory=TrainConfig)  # benign training
    saat: SAATConfig = field(default_factory=SAATConfig)  # SAAT adversarial training (saat_dist.defences.saat)
    cgat: CgATConfig = field(default_factory=CgATConfig)  # CgAT adversarial training (saat_dist.defences.cgat)
    atrdh: ATRDHConfig = field(default_factory=ATRDHConfig)  # ATRDH adversarial training (saat_dist.defences.atrdh)
    pgd_at: PGDATConfig = field(default_factory=PGDATConfig)  # PGD adversarial training (saat_dist.defences.pgd_at)
    attack: AttackConfig = field(default_factory=AttackConfig)  # evaluation attacks
    eval: EvalConfig = field(default_factory=EvalConfig)  # retrieval evaluation (run and experiment alike)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # Ray Train + DeepSpeed
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)  # `saat-dist experiment`: the grid and its reports

    def __post_init__(self) -> None:
        """Range checks at load time, before any worker or Ray starts; each
        failure names the key. Options that do nothing in the chosen mode are
        warned about (``warnings()``)."""
        if self.experiment.num_queries is not None:  # deprecated: one setting for both evaluations
            if self.eval.num_queries not in (0, self.experiment.num_queries):
                raise ConfigError(f"experiment.num_queries ({self.experiment.num_queries}) is deprecated and "
                                  f"differs from eval.num_queries ({self.eval.num_queries}): set only eval.num_queries")
            self.eval.num_queries, self.experiment.num_queries = self.experiment.num_queries, None
            self._deprecated = ["experiment.num_queries is deprecated: set eval.num_queries (copied there)"]
        checks = [*self._general_problems(), *self.attack.problems("attack"), *self.eval.problems("eval"),
                  *self.distributed.problems("distributed"), *self.metrics.problems("metrics"),
                  *self.experiment.problems("experiment")]
        for section in ("train", *ADV_SECTIONS):
            checks += self._training_problems(section)
        for section in ADV_SECTIONS:
            checks += getattr(self, section).problems(section)
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

    def _general_problems(self) -> list[tuple[str, bool, str]]:
        d = self.distributed
        return [
            ("model.bits", 8 <= self.model.bits <= 1024, "must be in [8, 1024]"),
            ("model.width", self.model.width >= 1, "must be >= 1"),
            ("data.image_size", 16 <= self.data.image_size <= 1024, "must be in [16, 1024]"),
            ("data.loader_workers", self.data.loader_workers >= 0, "must be >= 0"),
            ("data.canonical_slots", self.data.canonical_slots >= 0, "must be >= 0 (0: one per train shard)"),
            ("data.resize", self.data.resize is None or self.data.resize >= self.data.image_size,
             f"must be >= data.image_size ({self.data.image_size}) to centre-crop it, or null"),
            ("log_every_s", self.log_every_s >= 0, "must be >= 0"),
            ("device", not (d.use_gpu and self.device == "cpu"), "is 'cpu' but distributed.use_gpu is true"),
        ]

    def _training_problems(self, section: str) -> list[tuple[str, bool, str]]:
        """A training section's batch, schedule and optimizer against the worker
        layout (at every worker count of an elastic range)."""
        d, tc = self.distributed, getattr(self, section)
        out = [(f"{section}.epochs", tc.epochs >= 0, "must be >= 0"),
               (f"{section}.batch_size", tc.batch_size >= 2, "must be >= 2 (BatchNorm needs two samples)")]
        for workers in (max(1, w) for w in d.worker_counts):
            per_bn = tc.batch_size // workers // d.grad_accum * (workers if d.sync_batchnorm else 1)
            out += [
                (f"{section}.batch_size", tc.batch_size % (workers * d.grad_accum) == 0,
                 f"the global batch {tc.batch_size} must split evenly into {workers} worker(s) x {d.grad_accum} "
                 "micro-batch(es) (distributed.num_workers x distributed.grad_accum)"),
                (f"{section}.batch_size", per_bn >= 2,
                 f"BatchNorm would normalise over {per_bn} sample(s) (a micro-batch, over every worker with "
                 "distributed.sync_batchnorm): it needs two")]
        return out + tc.optim.problems(f"{section}.optim")

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
        for section in ("train", *ADV_SECTIONS):
            out += getattr(self, section).optim.warnings(f"{section}.optim", getattr(self, section).epochs,
                                                         getattr(self, section).batch_size)
        if self.model.backbone != "small_cnn" and not self.model.pretrained_path:
            out.append(f"model.pretrained_path is not set: {self.model.backbone} starts from random weights "
                       "(the paper's models start from ImageNet weights, read from a local file)")
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


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        listed = [a for a in args if typing.get_origin(a) is list]  # e.g. int | list[int]: a list takes the list form
        return _convert(value, listed[0] if listed and isinstance(value, list) else args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known keys here: {sorted(names)})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) plus ``key=value`` overrides.

    A section given in part keeps its other fields' defaults *of that
    section* (``--set saat.optim.lr=0.1`` keeps SAAT's SGD, weight decay and
    milestones), not those of the field's type."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        tree = _read_tree(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    try:
        return _build(RunConfig, _merge(RunConfig().to_dict(), tree))
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def config_from_dict(tree: dict) -> RunConfig:
    """A RunConfig from ``to_dict()`` output (e.g. sent to Ray workers)."""
    return _build(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from saat_dist.checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
