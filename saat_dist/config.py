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


ADV_SECTIONS = ("saat", "cgat", "atrdh", "pgd_at")  # config sections of the adversarial-training defences


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


@dataclass
class ModelConfig:
    backbone: Literal["small_cnn", "alexnet", "vgg11", "vgg16", "vgg19", "resnet18", "resnet50"] = "small_cnn"  # feature extractor
    bits: int = 32  # hash code length K
    pretrained_path: str | None = None  # local torchvision ImageNet weights; never downloaded
    hash_bn: bool = True  # BatchNorm1d on the hash logits (keeps DPH codes from collapsing); the reference has none (false)
    hash_init: Literal["torch", "reference"] = "torch"  # hash layer init: torch's Linear default, or the reference's (N(0, 0.01) weights and zero bias for ResNets, torch's default for AlexNet/VGG)
    width: int = 32  # channel width of small_cnn


@dataclass
class OptimConfig:
    name: Literal["adam", "sgd"] = "adam"  # optimizer
    lr: float = 1e-3  # learning rate (at base_batch, when lr_scaling is not none)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam's betas (ATRDH: 0.5, 0.999)
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # L2 weight decay
    milestones: list[float] = field(default_factory=list)  # fractions of all steps where lr is multiplied by gamma
    milestone_epochs: list[int] = field(default_factory=list)  # or: epochs (0-based) at whose start lr is multiplied by gamma; overrides milestones (the reference's benign schedule: [34, 67] of 100)
    gamma: float = 0.1  # lr factor at each milestone
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # rule for a global batch other than base_batch: lr x (batch / base_batch) (linear, Goyal et al. 2017) or its square root (sqrt); none: lr as given at any batch
    base_batch: int | None = None  # the global batch lr was set for (null: lr_scaling has nothing to scale)
    warmup_epochs: float = 0.0  # with a scaled lr: ramp linearly from the unscaled lr to the scaled one over this many epochs (Goyal et al.: 5)


@dataclass
class TrainConfig:
    loss: Literal["dph", "dpsh", "hashnet", "csq", "dpn", "hswd", "ortho"] = "dph"  # benign hashing loss
    epochs: int = 6  # training epochs (of split count // batch_size steps, at any worker count)
    batch_size: int = 64  # the global batch: samples per optimizer step over all workers (each takes batch_size / workers)
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer of benign training


@dataclass
class AdvTrainConfig:
    """What every adversarial-training defence shares (SAAT, CgAT, ATRDH, PGD-AT):
    a training stage from the benign model with an inner PGD of ``iters`` steps."""

    epochs: int = 6  # adversarial training epochs, starting from the benign model
    batch_size: int = 64  # the global batch: samples per optimizer step over all workers (each takes batch_size / workers)
    eps: float = 16 / 255  # L-inf budget of the inner maximisation
    step_size: float = 4 / 255  # inner PGD step
    iters: int = 7  # inner PGD iterations
    lam: float = 1.0  # weight of the adversarial term (lambda)
    mu: float = 1e-4  # weight of the quantisation term on adversarial codes (mu)
    attack_mode: Literal["eval", "train"] = "eval"  # model mode during the inner attack: eval (BatchNorm running statistics, no dropout; this project's default) or train (the reference: batch statistics, dropout on, running statistics updated by the attack's forwards)
    hash_bank: Literal["sign", "continuous"] = "sign"  # codes the benign hash term compares with: the bank of sign codes (this project's default) or a second bank of the continuous codes of each item's last forward (the reference's U); guide codes always come from sign codes
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.05, weight_decay=1e-5, milestones=[0.5, 0.75]))  # optimizer


@dataclass
class SAATConfig(AdvTrainConfig):
    """SAAT (SAAT.md §5): inner PGD away from the mainstay code b*(y) (cosine
    weights); outer L_hash + lam * (-mean(F(x_adv) b*)) + mu * quantisation.
    Reference: eps 8/255, step 2/255, 7 iterations, SGD 0.05, weight decay
    1e-5, 20 epochs at batch 32."""


@dataclass
class CgATConfig(AdvTrainConfig):
    """CgAT (Wang et al., WWW 2023): as SAAT with the centre code of a label
    (the sign of the mean code of relevant items minus that of irrelevant
    items: uniform weights) as the guide, no quantisation term. Reference:
    SGD 0.01, momentum 0.9, weight decay 5e-4, 30 epochs."""

    mu: float = 0.0  # CgAT has no quantisation term
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, milestones=[0.5, 0.75]))  # optimizer


@dataclass
class ATRDHConfig(AdvTrainConfig):
    """ATRDH (Wang et al., SIGIR 2021): a PrototypeNet learns a target code per
    label set (circle loss against the bank); the inner PGD pulls the batch
    toward the target codes of random label sets; outer L_hash + adv_weight x
    the DPH loss of the adversarial codes against the bank (adversarial codes
    keep the clean codes' pairwise similarities). Reference: Adam 1e-4,
    betas (0.5, 0.999), 100 epochs."""

    mu: float = 0.0  # not used by ATRDH
    adv_weight: float = 2.0  # weight of the adversarial pairwise term (the reference's 2)
    pnet_lr: float = 1e-4  # PrototypeNet's Adam learning rate (betas 0.5, 0.999, lr x 0.1 at 50 % and 75 %)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="adam", lr=1e-4, betas=[0.5, 0.999], milestones=[0.5, 0.75]))  # optimizer of the hash model


@dataclass
class PGDATConfig(AdvTrainConfig):
    """Plain PGD adversarial training on the benign hash loss (Madry et al.),
    the floor any defence must beat: the inner PGD maximises the benign hash
    loss of F(x + delta); outer clean_weight x L_hash(x) + lam x L_hash(x_adv)."""

    mu: float = 0.0  # not used by PGD-AT
    clean_weight: float = 1.0  # weight of the clean hash loss (0: Madry's adversarial loss only)


@dataclass
class HAGConfig:
    iters: int = 2000  # iterations (HAG paper's default)
    lr: float = 100.0  # SGD learning rate on the image (momentum 0.9), as the reference
    threshold: float = 0.5  # a bit stops counting once |F(x_adv) - sign(F(x))| exceeds 1 + threshold
    beta: float = 1.0  # weight of the code-balance term


@dataclass
class SDHAConfig:
    iters: int = 1500  # iterations (SDHA paper's default)
    lr: float = 0.01  # Adam learning rate on the image
    weight: float = 25.0  # weight of the surrogate term (divided by K), beside the MSE to the clean image
    sigma: float = 5.0  # sigmoid sharpness of the soft Hamming distance
    z: float = 0.5  # relevant items weighted by (Hamming distance + 1e-8)^-z


@dataclass
class AnchorAttackConfig:
    iters: int = 2000  # PGD iterations toward the anchor code (DHTA paper's default)
    eps: float | None = None  # budget (None: attack.eps; the reference's DHTA uses 0.032)
    step_size: float = 1 / 255  # PGD step
    anchors: int = 9  # anchor = sign of the sum of this many database codes of the target label set (P2P: 1)


@dataclass
class THAConfig:
    iters: int = 100  # PGD iterations toward the PrototypeNet's target code
    step_size: float = 1 / 255  # PGD step
    pnet_steps: int = 30000  # PrototypeNet training steps (the reference: 100 epochs x 300)
    pnet_batch: int = 128  # label sets per PrototypeNet step, drawn from the database's label sets (the reference: its attack batch, 128)
    pnet_lr: float = 1e-4  # Adam learning rate (betas 0.5, 0.999; x 0.1 at 50 % and 75 %)


@dataclass
class SquareConfig:
    iters: int = 1000  # queries per image (one forward pass each; no gradients)
    p_init: float = 0.1  # initial share of pixels in the random square (halved on the Square attack's schedule)


@dataclass
class TransferConfig:
    iters: int = 100  # iterations of BIM, DI-, NI-, SI-NI- and VMI-FGSM (the reference: 100)
    step_size: float = 1 / 255  # step of each
    decay: float = 1.0  # momentum decay (NI, SI-NI, VMI; DI-FGSM uses 0 as the reference)
    di_prob: float = 0.5  # DI-FGSM: probability of the random resize-and-pad
    di_resize: float = 0.9  # DI-FGSM: images are shrunk to a random size in [di_resize, 1) x S, then padded
    si_copies: int = 5  # SI-NI-FGSM: scale copies x / 2^i, i < si_copies
    vmi_neighbours: int = 5  # VMI-FGSM: neighbours sampled for the gradient variance ...
    vmi_beta: float = 1.5  # ... uniformly within beta x eps


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
    restarts: int = 3  # experiment: random restarts of the mainstay attack (the strongest run per query is kept)
    hag: HAGConfig = field(default_factory=HAGConfig)  # HAG (Yang et al.): away from the clean code
    sdha: SDHAConfig = field(default_factory=SDHAConfig)  # SDHA (Lu et al.): away from relevant training codes
    dhta: AnchorAttackConfig = field(default_factory=AnchorAttackConfig)  # DHTA (Bai et al.): toward an anchor of 9 codes
    p2p: AnchorAttackConfig = field(default_factory=lambda: AnchorAttackConfig(anchors=1))  # P2P: DHTA with 1 anchor code
    tha: THAConfig = field(default_factory=THAConfig)  # THA (Wang et al.): toward a PrototypeNet code
    square: SquareConfig = field(default_factory=SquareConfig)  # black-box random search on the Hamming objective
    transfer: TransferConfig = field(default_factory=TransferConfig)  # BIM, DI-, NI-, SI-NI-, VMI-FGSM on the mainstay loss


@dataclass
class EvalConfig:
    top_k: int = 5000  # mAP@top_k (the reference uses 5000)
    num_queries: int = 0  # evaluate on the first num_queries queries (0: all)
    pr_levels: int = 11  # recall levels of the PR curve (11: steps of 0.1)
    pr_points: Literal["interpolated", "reference"] = "interpolated"  # interpolated precision at recall 0, 0.1, ..., 1 (queries without relevant items left out), or the reference's points: recall 1/(L-1) ... 1, precision where the ranking first reaches that share of the relevant items, averaged over all queries
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
    grad_accum: int = 1  # micro-batches per step: each worker's share of the global batch goes through in this many forward/backward passes, for memory; the global batch stays, but the bank then sees each micro-batch's codes before the next one's loss and BatchNorm normalises per micro-batch, so the numbers move slightly
    sync_batchnorm: bool = True  # BatchNorm statistics over the whole global batch (all workers' shares; an all-gather per BatchNorm layer per training forward); false: each worker's share, as DDP's default, and the answer then depends on the worker count
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


DEFENCES = ("none", "saat", "atrdh", "cgat", "pgd_at")
ATTACKS = ("mainstay", "hag", "sdha", "square", "bim", "difgsm", "nifgsm", "sinifgsm", "vmifgsm",
           "mainstay_targeted", "dhta", "p2p", "tha")
TRANSFER_ATTACKS = ("bim", "difgsm", "nifgsm", "sinifgsm", "vmifgsm")


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
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))  # attacks run on every model
    transfer: bool = True  # also score BIM/DI/NI/SI-NI/VMI examples crafted on the benign model on every defence
    eps_sweep: list[float] = field(default_factory=lambda: [0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255])  # budgets of the mAP-vs-eps curve (mainstay attack)
    num_queries: int = 0  # attack the first num_queries queries (0: all); every attack uses the same ones
    retrieval_queries: int = 4  # queries shown in the retrieval picture
    retrieval_top: int = 10  # results shown per query
    checks: ChecksConfig = field(default_factory=ChecksConfig)  # thresholds of the evaluation checks


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
    cgat: CgATConfig = field(default_factory=CgATConfig)  # CgAT adversarial training (experiments)
    atrdh: ATRDHConfig = field(default_factory=ATRDHConfig)  # ATRDH adversarial training (experiments)
    pgd_at: PGDATConfig = field(default_factory=PGDATConfig)  # PGD adversarial training (experiments)
    attack: AttackConfig = field(default_factory=AttackConfig)  # evaluation attacks
    eval: EvalConfig = field(default_factory=EvalConfig)  # retrieval evaluation
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # Ray Train + DeepSpeed
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # Prometheus
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)  # `saat-dist experiment`: the grid and its reports

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
            ("data.resize", self.data.resize is None or self.data.resize >= self.data.image_size,
             f"must be >= data.image_size ({self.data.image_size}) to centre-crop it, or null"),
            ("log_every_s", self.log_every_s >= 0, "must be >= 0"),
            ("attack.eps", 0 <= a.eps <= 1, "must be in [0, 1]"),
            ("attack.step_size", 0 < a.step_size <= 1, "must be in (0, 1]"),
            ("attack.iters", a.iters >= 1, "must be >= 1"),
            ("attack.batch_size", a.batch_size >= 1, "must be >= 1"),
            ("attack.strong_factor", a.strong_factor >= 1, "must be >= 1"),
            ("attack.strong_restarts", a.strong_restarts >= 1, "must be >= 1"),
            ("attack.strong_queries", a.strong_queries >= 0, "must be >= 0 (0: all)"),
            ("attack.restarts", a.restarts >= 1, "must be >= 1"),
            ("attack.hag.iters", a.hag.iters >= 1, "must be >= 1"),
            ("attack.hag.lr", a.hag.lr > 0, "must be > 0"),
            ("attack.sdha.iters", a.sdha.iters >= 1, "must be >= 1"),
            ("attack.sdha.lr", a.sdha.lr > 0, "must be > 0"),
            ("attack.square.iters", a.square.iters >= 1, "must be >= 1"),
            ("attack.square.p_init", 0 < a.square.p_init <= 1, "must be in (0, 1]"),
            ("attack.tha.iters", a.tha.iters >= 1, "must be >= 1"),
            ("attack.tha.step_size", 0 < a.tha.step_size <= 1, "must be in (0, 1]"),
            ("attack.tha.pnet_steps", a.tha.pnet_steps >= 1, "must be >= 1"),
            ("attack.tha.pnet_batch", a.tha.pnet_batch >= 1, "must be >= 1"),
            ("attack.transfer.iters", a.transfer.iters >= 1, "must be >= 1"),
            ("attack.transfer.step_size", 0 < a.transfer.step_size <= 1, "must be in (0, 1]"),
            ("attack.transfer.di_prob", 0 <= a.transfer.di_prob <= 1, "must be in [0, 1]"),
            ("attack.transfer.di_resize", 0 < a.transfer.di_resize < 1, "must be in (0, 1)"),
            ("attack.transfer.si_copies", a.transfer.si_copies >= 1, "must be >= 1"),
            ("attack.transfer.vmi_neighbours", a.transfer.vmi_neighbours >= 1, "must be >= 1"),
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
        for name in ("dhta", "p2p"):
            c = getattr(a, name)
            checks += [(f"attack.{name}.iters", c.iters >= 1, "must be >= 1"),
                       (f"attack.{name}.step_size", 0 < c.step_size <= 1, "must be in (0, 1]"),
                       (f"attack.{name}.eps", c.eps is None or 0 <= c.eps <= 1, "must be in [0, 1] (or null: attack.eps)"),
                       (f"attack.{name}.anchors", c.anchors >= 1, "must be >= 1")]
        x = self.experiment
        from saat_dist.hashing.losses import LOSSES

        checks += [
            ("experiment.hashes", bool(x.hashes) and all(h in LOSSES for h in x.hashes),
             f"must be a non-empty list of {list(LOSSES)}, got {x.hashes}"),
            ("experiment.bits", bool(x.bits) and all(8 <= b <= 1024 for b in x.bits), "must be a non-empty list in [8, 1024]"),
            ("experiment.defences", bool(x.defences) and all(d in DEFENCES for d in x.defences)
             and len(set(x.defences)) == len(x.defences), f"must be distinct values of {list(DEFENCES)}, got {x.defences}"),
            ("experiment.attacks", all(t in ATTACKS for t in x.attacks) and len(set(x.attacks)) == len(x.attacks),
             f"must be distinct values of {list(ATTACKS)}, got {x.attacks}"),
            ("experiment.eps_sweep", all(0 <= v <= 1 for v in x.eps_sweep) and x.eps_sweep == sorted(set(x.eps_sweep)),
             "must be increasing distinct values in [0, 1]"),
            ("experiment.num_queries", x.num_queries >= 0, "must be >= 0 (0: all)"),
            ("experiment.retrieval_queries", x.retrieval_queries >= 0, "must be >= 0"),
            ("experiment.retrieval_top", x.retrieval_top >= 1, "must be >= 1"),
            ("experiment.checks.min_drop", x.checks.min_drop >= 0, "must be >= 0"),
            ("experiment.checks.floor_margin", x.checks.floor_margin >= 0, "must be >= 0"),
            ("experiment.checks.blackbox_margin", x.checks.blackbox_margin >= 0, "must be >= 0"),
        ]
        workers = max(1, d.num_workers)
        for section in ("train", *ADV_SECTIONS):
            tc = getattr(self, section)
            o = tc.optim
            share = tc.batch_size // workers // d.grad_accum
            checks += [
                (f"{section}.epochs", tc.epochs >= 0, "must be >= 0"),
                (f"{section}.batch_size", tc.batch_size >= 2, "must be >= 2 (BatchNorm needs two samples)"),
                (f"{section}.batch_size", tc.batch_size % (workers * d.grad_accum) == 0,
                 f"the global batch {tc.batch_size} must split evenly into {workers} worker(s) x {d.grad_accum} "
                 "micro-batch(es) (distributed.num_workers x distributed.grad_accum)"),
                (f"{section}.batch_size", share * (workers if d.sync_batchnorm else 1) >= 2,
                 f"BatchNorm would normalise over {share * (workers if d.sync_batchnorm else 1)} sample(s) "
                 "(a micro-batch, over every worker with distributed.sync_batchnorm): it needs two"),
                (f"{section}.optim.base_batch", o.base_batch is None or o.base_batch >= 1, "must be >= 1 (or null)"),
                (f"{section}.optim.warmup_epochs", o.warmup_epochs >= 0, "must be >= 0"),
                (f"{section}.optim.milestone_epochs", all(m > 0 for m in o.milestone_epochs),
                 f"epochs > 0, got {o.milestone_epochs}"),
                (f"{section}.optim.lr", o.lr > 0, "must be > 0"),
                (f"{section}.optim.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
                (f"{section}.optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
                (f"{section}.optim.gamma", o.gamma > 0, "must be > 0"),
                (f"{section}.optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
                 f"must be two values in [0, 1), got {o.betas}"),
                (f"{section}.optim.milestones", all(0 < m < 1 for m in o.milestones),
                 f"milestones are fractions of the run in (0, 1), got {o.milestones}"),
            ]
        for section in ADV_SECTIONS:
            s = getattr(self, section)
            checks += [
                (f"{section}.eps", 0 <= s.eps <= 1, "must be in [0, 1]"),
                (f"{section}.step_size", 0 < s.step_size <= 1, "must be in (0, 1]"),
                (f"{section}.iters", s.iters >= 1, "must be >= 1"),
                (f"{section}.lam", s.lam >= 0, "must be >= 0"),
                (f"{section}.mu", s.mu >= 0, "must be >= 0"),
            ]
        checks += [("atrdh.adv_weight", self.atrdh.adv_weight >= 0, "must be >= 0"),
                   ("atrdh.pnet_lr", self.atrdh.pnet_lr > 0, "must be > 0"),
                   ("pgd_at.clean_weight", self.pgd_at.clean_weight >= 0, "must be >= 0")]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"{key}: {msg}")

    def warnings(self) -> list[str]:
        """Options set away from their defaults that have no effect in this mode."""
        d, default = self.distributed, DistributedConfig()
        out = []
        if d.num_workers == 0:
            for key in ("bank_sync_every", "zero_stage", "use_gpu", "max_failures",
                        "storage_path", "address"):
                if getattr(d, key) != getattr(default, key):
                    out.append(f"distributed.{key}={getattr(d, key)!r} has no effect with distributed.num_workers=0 "
                               "(everything runs in this process)")
        if d.address is not None and d.local_cpus is not None:
            out.append("distributed.local_cpus has no effect when joining a cluster (distributed.address is set)")
        if self.train.loss == "csq" and d.bank_sync_every != 1 and self.saat.epochs == 0:
            out.append("distributed.bank_sync_every has no effect: CSQ reads no code bank and no SAAT stage runs")
        for section in ("train", *ADV_SECTIONS):
            o = getattr(self, section).optim
            if o.lr_scaling != "none" and o.base_batch is None:
                out.append(f"{section}.optim.lr_scaling={o.lr_scaling!r} has no effect without {section}.optim.base_batch")
            if o.warmup_epochs and (o.lr_scaling == "none" or o.base_batch in (None, getattr(self, section).batch_size)):
                out.append(f"{section}.optim.warmup_epochs has no effect: the lr is not scaled "
                           "(it ramps from the unscaled lr to the scaled one)")
            if o.milestone_epochs and o.milestones:
                out.append(f"{section}.optim.milestones has no effect: {section}.optim.milestone_epochs is set")
            if o.warmup_epochs > getattr(self, section).epochs:
                out.append(f"{section}.optim.warmup_epochs={o.warmup_epochs:g} is longer than the stage: "
                           "the lr never reaches its scaled value")
            late = [m for m in o.milestone_epochs if m >= getattr(self, section).epochs]
            if late:
                out.append(f"{section}.optim.milestone_epochs {late} have no effect: the stage has "
                           f"{getattr(self, section).epochs} epochs")
        if self.model.backbone != "small_cnn" and not self.model.pretrained_path:
            out.append(f"model.pretrained_path is not set: {self.model.backbone} starts from random weights "
                       "(the paper's models start from ImageNet weights, read from a local file)")
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
