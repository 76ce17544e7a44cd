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


class ConfigError(ValueError):
    pass


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


@dataclass
class DataConfig:
    shard_dir: str = "data/demo/shards"  # directory with manifest.json and the shards (output of `data convert`)
    build_demo: bool = True  # build the embedded demo data set here if shard_dir has no manifest
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)  # demo data parameters
    image_size: int = 32  # images are resized to image_size x image_size
    loader_workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    skip_corrupt: bool = False  # skip corrupt samples (and the unreadable rest of a broken shard) with a warning, counted in saat_skipped_samples_total and the report; off: stop with one line naming shard and sample
    base_url: str | None = None  # read manifest + shards from here instead of shard_dir: a prefix (http://host/shards) or a template with {name} (pipe:aws s3 cp s3://b/shards/{name} -)


@dataclass
class ModelConfig:
    backbone: Literal["small_cnn", "alexnet", "vgg11", "vgg16", "vgg19", "resnet18", "resnet50"] = "small_cnn"  # feature extractor
    bits: int = 32  # hash code length K
    pretrained_path: str | None = None  # local torchvision ImageNet weights; never downloaded
    hash_bn: bool = True  # BatchNorm1d on the hash logits (keeps DPH codes from collapsing)
    width: int = 32  # channel width of small_cnn


@dataclass
class OptimConfig:
    name: Literal["adam", "sgd"] = "adam"  # optimizer
    lr: float = 1e-3  # learning rate
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # L2 weight decay
    milestones: list[float] = field(default_factory=list)  # fractions of all steps where lr is multiplied by gamma
    gamma: float = 0.1  # lr factor at each milestone


@dataclass
class TrainConfig:
    loss: Literal["dph", "dpsh", "hashnet", "csq"] = "dph"  # benign hashing loss
    epochs: int = 6  # training epochs
    batch_size: int = 64  # batch size per step
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer of benign training


@dataclass
class SAATConfig:
    epochs: int = 6  # adversarial training epochs, starting from the benign model
    batch_size: int = 64  # batch size per step
    eps: float = 16 / 255  # L-inf budget of the inner maximisation
    step_size: float = 4 / 255  # inner PGD step
    iters: int = 7  # inner PGD iterations
    lam: float = 1.0  # weight of the adversarial mainstay term (lambda)
    mu: float = 1e-4  # weight of the adversarial quantisation term (mu)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.05, weight_decay=1e-5, milestones=[0.5, 0.75]))  # optimizer of SAAT


@dataclass
class AttackConfig:
    eps: float = 16 / 255  # L-inf budget of the evaluation attacks
    step_size: float = 1 / 255  # PGD step
    iters: int = 100  # PGD iterations
    loss: Literal["plain", "sharp"] = "sharp"  # attack loss (sharp: the reference generators' loss)
    batch_size: int = 128  # images per attack batch
    strong_factor: int = 5  # the strong check runs strong_factor x iters ...
    strong_restarts: int = 3  # ... with this many random restarts (worst case per query)
    strong_queries: int = 100  # queries in the strong check (0: all); the plain attack is re-scored on the same ones


@dataclass
class EvalConfig:
    top_k: int = 5000  # mAP@top_k (the reference uses 5000)
    num_queries: int = 0  # evaluate on the first num_queries queries (0: all)
    pr_levels: int = 11  # recall levels of the PR curve (11: steps of 0.1)
    precision_at: list[int] = field(default_factory=lambda: [100, 200, 500, 1000])  # N of precision@N
    batch_size: int = 256  # images per encoding batch


@dataclass
class DistributedConfig:
    num_workers: int = 2  # Ray Train workers (processes); 0 runs every stage in this process, without Ray
    address: str | None = None  # Ray cluster to join (e.g. "auto", "ray://head:10001"); None starts a local Ray
    use_gpu: bool = False  # one GPU per worker (set device to auto or cuda)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker
    gpus_per_worker: float = 1.0  # GPUs Ray reserves per worker when use_gpu
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0, 1, 2 or 3
    precision: Literal["fp32", "bf16"] = "fp32"  # training precision of the Ray/DeepSpeed workers (bf16 is tested with ZeRO 2; in-process training stays fp32) and of evaluation
    grad_accum: int = 1  # gradient accumulation steps (global batch = batch_size x grad_accum x workers)
    gradient_clipping: float = 0.0  # clip gradients to this global norm, both launchers (0: off, as the reference; DeepSpeed's own default would be 1.0)
    bank_sync_every: int = 1  # all-reduce the code bank's label-set table every N steps (and at epoch ends)
    checkpoint_every: int = 0  # also checkpoint every N steps (0: only at epoch ends)
    storage_path: str | None = None  # Ray Train storage for checkpoints (None: <output_dir>/ray); shared or s3:// on clusters
    max_failures: int = 2  # Ray Train restarts the worker group from the newest checkpoint up to this many times
    num_to_keep: int = 2  # checkpoints kept per stage
    local_cpus: int | None = None  # CPUs of the local Ray started when address is None (None: all)


@dataclass
class MetricsConfig:
    enabled: bool = True  # serve Prometheus metrics from every worker
    bind: str = "127.0.0.1"  # address the metrics servers bind to (0.0.0.0 only inside a cluster network)
    port: int = 0  # 0: any free port; N: port N + local rank. Chosen ports land in <output_dir>/metrics/
    linger_s: float = 6.0  # seconds a worker keeps serving after withdrawing its target file at the end of a stage, so Prometheus (which applies discovery changes every 5 s) drops it before the endpoint closes


@dataclass
class RunConfig:
    name: str = "demo"  # run name, used in logs and reports
    output_dir: str = "runs/demo"  # where checkpoints, report.json/md and plots go
    seed: int = 0  # seed of models, data order and attacks
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when visible, else CPU
    log_every_s: float = 10.0  # seconds between progress lines
    data: DataConfig = field(default_factory=DataConfig)  # data
    model: ModelConfig = field(default_factory=ModelConfig)  # hash model
    train: TrainConfig = field(default_factory=TrainConfig)  # benign training
    saat: SAATConfig = field(default_factory=SAATConfig)  # SAAT adversarial training
    attack: AttackConfig = field(default_factory=AttackConfig)  # evaluation attacks
    eval: EvalConfig = field(default_factory=EvalConfig)  # retrieval evaluation
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # Ray Train + DeepSpeed
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus

    def __post_init__(self) -> None:
        """Range checks at load time, before any worker or Ray starts; each
        failure names the key. Options that do nothing in the chosen mode are
        warned about (``warnings()``)."""
        d, a, e = self.distributed, self.attack, self.eval
        checks = [
            ("model.bits", 8 <= self.model.bits <= 1024, "must be in [8, 1024]"),
            ("model.width", self.model.width >= 1, "must be >= 1"),
            ("data.image_size", 16 <= self.data.image_size <= 1024, "must be in [16, 1024]"),
            ("data.loader_workers", self.data.loader_workers >= 0, "must be >= 0"),
            ("log_every_s", self.log_every_s >= 0, "must be >= 0"),
            ("attack.eps", 0 <= a.eps <= 1, "must be in [0, 1]"),
            ("attack.step_size", 0 < a.step_size <= 1, "must be in (0, 1]"),
            ("attack.iters", a.iters >= 1, "must be >= 1"),
            ("attack.batch_size", a.batch_size >= 1, "must be >= 1"),
            ("attack.strong_factor", a.strong_factor >= 1, "must be >= 1"),
            ("attack.strong_restarts", a.strong_restarts >= 1, "must be >= 1"),
            ("attack.strong_queries", a.strong_queries >= 0, "must be >= 0 (0: all)"),
            ("eval.top_k", e.top_k >= 1, "must be >= 1"),
            ("eval.num_queries", e.num_queries >= 0, "must be >= 0 (0: all)"),
            ("eval.pr_levels", e.pr_levels >= 2, "must be >= 2"),
            ("eval.batch_size", e.batch_size >= 1, "must be >= 1"),
            ("eval.precision_at", all(n >= 1 for n in e.precision_at), "every N must be >= 1"),
            ("distributed.num_workers", d.num_workers >= 0, "must be >= 0"),
            ("distributed.cpus_per_worker", d.cpus_per_worker >= 0, "must be >= 0"),
            ("distributed.gpus_per_worker", d.gpus_per_worker > 0 if d.use_gpu else d.gpus_per_worker >= 0,
             "must be > 0 when use_gpu" if d.use_gpu else "must be >= 0"),
            ("distributed.local_cpus", d.local_cpus is None or d.local_cpus >= 1, "must be >= 1 (or null: all)"),
            ("distributed.zero_stage", d.zero_stage in (0, 1, 2, 3), "must be one of [0, 1, 2, 3]"),
            ("distributed.grad_accum", d.grad_accum >= 1, "must be >= 1"),
            ("distributed.gradient_clipping", d.gradient_clipping >= 0, "must be >= 0 (0: off)"),
            ("distributed.bank_sync_every", d.bank_sync_every >= 1, "must be >= 1"),
            ("distributed.checkpoint_every", d.checkpoint_every >= 0, "must be >= 0"),
            ("distributed.max_failures", d.max_failures >= -1, "must be >= -1 (-1: no limit)"),
            ("distributed.num_to_keep", d.num_to_keep >= 1, "must be >= 1"),
            ("metrics.port", 0 <= self.metrics.port <= 65535, "must be in [0, 65535]"),
            ("metrics.linger_s", 0 <= self.metrics.linger_s <= 600, "must be in [0, 600]"),
            ("device", not (d.use_gpu and self.device == "cpu"), "is 'cpu' but distributed.use_gpu is true"),
        ]
        for section in ("train", "saat"):
            tc = getattr(self, section)
            o = tc.optim
            checks += [
                (f"{section}.epochs", tc.epochs >= 0, "must be >= 0"),
                (f"{section}.batch_size", tc.batch_size >= 2, "must be >= 2 (BatchNorm needs two samples)"),
                (f"{section}.optim.lr", o.lr > 0, "must be > 0"),
                (f"{section}.optim.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
                (f"{section}.optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
                (f"{section}.optim.gamma", o.gamma > 0, "must be > 0"),
                (f"{section}.optim.milestones", all(0 < m < 1 for m in o.milestones),
                 f"milestones are fractions of the run in (0, 1), got {o.milestones}"),
            ]
        s = self.saat
        checks += [
            ("saat.eps", 0 <= s.eps <= 1, "must be in [0, 1]"),
            ("saat.step_size", 0 < s.step_size <= 1, "must be in (0, 1]"),
            ("saat.iters", s.iters >= 1, "must be >= 1"),
            ("saat.lam", s.lam >= 0, "must be >= 0"),
            ("saat.mu", s.mu >= 0, "must be >= 0"),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

    def warnings(self) -> list[str]:
        """Options set away from their defaults that have no effect in this mode."""
        d, default = self.distributed, DistributedConfig()
        out = []
        if d.num_workers == 0:
            for key in ("bank_sync_every", "zero_stage", "grad_accum", "use_gpu", "max_failures",
                        "storage_path", "address"):
                if getattr(d, key) != getattr(default, key):
                    out.append(f"distributed.{key}={getattr(d, key)!r} has no effect with distributed.num_workers=0 "
                               "(everything runs in this process)")
        if d.address is not None and d.local_cpus is not None:
            out.append("distributed.local_cpus has no effect when joining a cluster (distributed.address is set)")
        if self.train.loss == "csq" and d.bank_sync_every != 1 and self.saat.epochs == 0:
            out.append("distributed.bank_sync_every has no effect: CSQ reads no code bank and no SAAT stage runs")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        return _convert(value, args[0], key)
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) plus ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    try:
        return _build(RunConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def config_from_dict(tree: dict) -> RunConfig:
    """A RunConfig from ``to_dict()`` output (e.g. sent to Ray workers)."""
    return _build(RunConfig, tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from saat_dist.checkpoint import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
