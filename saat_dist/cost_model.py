"""What SAAT and its fast modes cost at scale (issue 19), on paper and on a GPU.

Paper: a model's FLOPs per image, counted by ``torch.utils.flop_counter``
on a real model from ``build_hash_model`` (random weights), for the three
kinds of pass a training step makes -- forward, forward + backward to the
input (an inner attack step: no weight gradients), forward + full backward
(an update) -- times the passes each mode makes per training sample and
epoch (each mode's numbers are its config section's defaults,
``saat_dist.defences``), gives a stage's FLOPs and its hours on ``gpus``
GPUs at an assumed MFU. GPU: ``measure_step_mfu`` times SAAT-shaped steps (the project's PGD
for the inner steps, one clean + adversarial update) and divides their
counted FLOPs by the seconds (launch/gpu-smoke.sh runs it in bf16).

Counting convention (``FlopCounterMode``): a multiply-add is 2 FLOPs (a
matmul M x K by K x N is 2MKN); only matmuls and convolutions are counted,
not elementwise ops, BatchNorm or pooling. ``torchvision`` AlexNet's
published 0.71 GFLOPs are multiply-adds: 1.43 GFLOP here.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from saat_dist import optimizers

# Peak dense BF16 tensor throughput of one H200 SXM (the same chip as H100 SXM):
# NVIDIA's datasheets give 1,979 TFLOPS BF16 "with sparsity" (2:4); dense is half.
H200_BF16_DENSE_TFLOPS = 989.0
PEAK_SOURCE = ("NVIDIA H100/H200 SXM datasheets: BF16 Tensor Core 1,979 TFLOPS with 2:4 sparsity, "
               "989 TFLOPS dense")
FLOP_CONVENTION = ("torch.utils.flop_counter.FlopCounterMode: a multiply-add counts 2 FLOPs; only matmuls and "
                   "convolutions are counted (elementwise ops, BatchNorm, pooling, the optimizer step are not)")


def _count(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def pass_flops(model: nn.Module, x_BCHW: torch.Tensor) -> dict[str, float]:
    """FLOPs per image of ``model`` (a hash model: ``model(x)`` -> codes) on
    ``x_BCHW`` (B >= 2 in train mode: the hash BatchNorm needs two):
    ``forward``; ``forward_input_backward``, the forward and a backward to the
    input only (parameters frozen, as an inner attack step: autograd then
    computes no weight gradient); ``forward_full_backward``, the forward and
    the backward of an update (weight gradients, none for the input). The
    parameters' ``requires_grad`` is restored after."""
    b = x_BCHW.shape[0]
    x = x_BCHW.detach()
    trainable = [p for p in model.parameters() if p.requires_grad]
    fwd = _count(lambda: model(x))
    try:
        for p in trainable:
            p.requires_grad_(False)
        xi = x.clone().requires_grad_(True)
        to_input = _count(lambda: model(xi).sum().backward())
    finally:
        for p in trainable:
            p.requires_grad_(True)
    full = _count(lambda: model(x).sum().backward())
    model.zero_grad(set_to_none=True)
    return {"forward": fwd / b, "forward_input_backward": to_input / b, "forward_full_backward": full / b}


def model_flops(backbone: str, image_size: int, bits: int, batch: int = 2, width: int = 32,
                device: str = "cpu") -> dict:
    """FLOPs per image of the project's hash model ``backbone`` (random
    weights, train mode) at ``image_size`` px and ``bits`` bits:
    ``pass_flops``'s three counts and the convention they use. ``device``:
    ``cpu`` runs the passes; ``meta`` only propagates shapes (the same
    counts, without the initialisation and the arithmetic: for quick runs)."""
    from saat_dist.models import build_hash_model

    torch.manual_seed(0)
    with torch.device(device):
        model = build_hash_model(backbone, bits, width=width).train()
        x = torch.rand(batch, 3, image_size, image_size)
    return {"backbone": backbone, "image_size": image_size, "bits": bits, "counted_on": device,
            **pass_flops(model, x), "convention": FLOP_CONVENTION}


def phases_from_config(phases: Iterable) -> list[dict]:
    """``saat_curriculum``'s config phases (``until``, ``iters``, ``scale``:
    the whole step, attack and update, on the batch resized; objects or
    dicts) in ``default_mode_passes``' form."""
    out, start = [], 0.0
    for p in phases:
        get = p.get if isinstance(p, dict) else lambda k, p=p: getattr(p, k)
        out.append({"fraction": get("until") - start, "inner": get("iters"), "resolution": get("scale"),
                    "outer_resolution": get("scale")})
        start = get("until")
    return out


def mode_defaults() -> dict[str, dict]:
    """The numbers the formula takes from each mode's config section
    (``saat_dist.defences``, their defaults): SAAT's ``iters`` and
    ``epochs`` (the schedule's reference), single-step SAAT's ``iters`` and
    ``epochs``, free SAAT's ``replays`` and ``epochs``, the curriculum's
    ``phases`` (``phases_from_config``) and ``epochs``."""
    from saat_dist.defences.saat import SAATConfig
    from saat_dist.defences.saat_curriculum import SAATCurriculumConfig
    from saat_dist.defences.saat_fgsm import SAATFGSMConfig
    from saat_dist.defences.saat_free import SAATFreeConfig

    saat, fgsm, free, curriculum = SAATConfig(), SAATFGSMConfig(), SAATFreeConfig(), SAATCurriculumConfig()
    return {"saat": {"iters": saat.iters, "epochs": saat.epochs},
            "saat_fgsm": {"iters": fgsm.iters, "epochs": fgsm.epochs},
            "saat_free": {"replays": free.replays, "epochs": free.epochs},
            # the tables are at 224 px, where the phases' scale (0.5: 112 px) stays above min_side (32)
            "saat_curriculum": {"phases": phases_from_config(curriculum.phases), "epochs": curriculum.epochs}}


def default_mode_passes(phases: Iterable[dict] | None = None, replays: int | None = None,
                        inner_scale: Callable[[float], float] | None = None,
                        outer_scale: Callable[[float], float] | None = None) -> dict[str, dict]:
    """The formula's passes per training sample and epoch of each mode:
    ``inner`` (forward + backward to the input) and ``outer`` (forward +
    full backward), in full-resolution equivalents, and ``epoch_factor``,
    the mode's epochs as a fraction of SAAT's; the modes' numbers are their
    config defaults (``mode_defaults``). ``phases``: saat_curriculum's
    instead of the config's (``fraction`` of the stage, ``inner`` steps,
    their image side factor ``resolution``, the update's
    ``outer_resolution``, default 1; ``phases_from_config`` turns the
    config's form into this); ``replays``: saat_free's instead of the
    config's (its epochs stay the config's). A pass at side factor r costs
    ``inner_scale(r)`` / ``outer_scale(r)`` of a full one (default r**2,
    the pixels, as the trainer counts: exact for convolutions, an
    underestimate where a fixed-size head follows an adaptive pooling, as
    AlexNet's)."""
    cfg = mode_defaults()
    inner_at = inner_scale or (lambda r: r * r)
    outer_at = outer_scale or (lambda r: r * r)
    phases = [{"outer_resolution": 1.0, **p} for p in (cfg["saat_curriculum"]["phases"] if phases is None else phases)]
    if abs(sum(p["fraction"] for p in phases) - 1.0) > 1e-9:
        raise ValueError(f"curriculum phases: fractions sum to {sum(p['fraction'] for p in phases)}, not 1")
    replays = replays or cfg["saat_free"]["replays"]
    inner = sum(p["fraction"] * p["inner"] * inner_at(p["resolution"]) for p in phases)
    outer = sum(p["fraction"] * 2.0 * outer_at(p["outer_resolution"]) for p in phases)
    saat_epochs = cfg["saat"]["epochs"]
    share = {mode: cfg[mode]["epochs"] / saat_epochs if saat_epochs else 1.0 for mode in cfg}
    # every update's loss takes the clean and the adversarial forward: 2 outer passes per sample
    return {
        "benign": {"inner": 0.0, "outer": 1.0, "epoch_factor": 1.0},  # at SAAT's epochs, for scale
        "saat": {"inner": float(cfg["saat"]["iters"]), "outer": 2.0, "epoch_factor": 1.0},
        "saat_fgsm": {"inner": float(cfg["saat_fgsm"]["iters"]), "outer": 2.0, "epoch_factor": share["saat_fgsm"]},
        # one backward per replay serves the weights and the input: no separate inner pass
        "saat_free": {"inner": 0.0, "outer": 2.0 * replays, "epoch_factor": share["saat_free"]},
        "saat_curriculum": {"inner": inner, "outer": outer, "epoch_factor": share["saat_curriculum"],
                            "phases": phases},
    }


def passes_entry(value: dict, default: dict | None) -> dict:
    """One mode's passes from a measured record, in one of two forms.
    ``{"inner", "outer"}``: full-resolution passes per training sample and
    epoch (optional ``epochs``, or ``epoch_factor`` of the schedule's).
    A train.json ``cost`` record (``training.trainer.training_cost``):
    ``passes_per_sample``, the full-resolution passes per sample of a step
    (attack and update together; else ``passes_per_image`` / ``epochs``,
    that is per training image over the stage), split into the formula's
    update passes (``default``'s ``outer``) and the rest as inner passes;
    its ``epochs`` kept as ``measured_epochs`` (``resolve_passes`` turns
    them into the mode's share of SAAT's epochs)."""
    extra = {k: value[k] for k in ("epoch_factor", "epochs") if k in value}
    if "inner" in value and "outer" in value:
        return {**(default or {}), "inner": float(value["inner"]), "outer": float(value["outer"]), **extra}
    if "passes_per_sample" in value:
        total = float(value["passes_per_sample"])
    elif "passes_per_image" in value and value.get("epochs"):
        total = float(value["passes_per_image"]) / float(value["epochs"])
    else:
        raise ValueError("cost record: needs inner and outer, passes_per_sample, or passes_per_image and epochs; "
                         f"got {sorted(value)}")
    if default is None:
        raise ValueError(f"cost record: {total:g} passes per sample in all; splitting them needs the mode's "
                         "formula (an unknown mode: give inner and outer)")
    outer = float(default["outer"])
    if total < outer - 1e-9:
        raise ValueError(f"cost record: {total:g} passes per sample is below the mode's {outer:g} update passes")
    out = {**default, "inner": total - outer, "outer": outer}
    if value.get("epochs"):
        out["measured_epochs"] = float(value["epochs"])
    return out


def resolve_passes(measured: dict[str, dict] | None = None, defaults: dict[str, dict] | None = None) -> dict:
    """Every mode's passes: the measured ones (``passes_entry``) where given
    (``source: measured``), the formula's elsewhere (``source: formula``);
    with SAAT's record measured, a measured mode's epochs are its share of
    SAAT's (else the formula's ``epoch_factor``)."""
    defaults = defaults or default_mode_passes()
    out = {name: {**entry, "source": "formula"} for name, entry in defaults.items()}
    for name, value in (measured or {}).items():
        out[name] = {**passes_entry(value, defaults.get(name)), "source": "measured"}
    # measured records of SAAT and another mode: that mode's epochs as their ratio (a demo's 6 epochs
    # and free training's 6 / 4 become the table's 20 and 5)
    saat_epochs = out.get("saat", {}).get("measured_epochs")
    for entry in out.values():
        if saat_epochs and "measured_epochs" in entry and "epochs" not in entry:
            entry["epoch_factor"] = entry["measured_epochs"] / saat_epochs
    return out


def measured_passes(run_dir: str | Path) -> dict[str, dict]:
    """The ``cost`` records of every train.json under ``run_dir``, by mode:
    the record's ``mode`` when it names one, else its folder's name."""
    out = {}
    for path in sorted(Path(run_dir).rglob("train.json")):
        cost = json.loads(path.read_text()).get("cost")
        if isinstance(cost, dict):
            out[str(cost.get("mode") or path.parent.name)] = cost
    return out


def training_cost(mode_passes: dict[str, dict] | None, flops: dict, images: int, epochs: float | None = None,
                  gpus: int = 8, peak_tflops: float = H200_BF16_DENSE_TFLOPS, mfu: float = 0.4,
                  defaults: dict[str, dict] | None = None) -> dict:
    """Per mode: FLOPs of a stage over ``images`` training images, its hours
    on ``gpus`` GPUs at ``mfu`` of ``peak_tflops`` each, and the ratio to
    SAAT's. ``mode_passes``: measured passes (``passes_entry``'s forms) by
    mode; the formula's (``defaults``, else ``default_mode_passes()``) for
    the modes not given (``None``: all). ``flops``:
    ``pass_flops`` / ``model_flops``' per-image counts. ``epochs``: the
    schedule's (default: SAAT's config's, the reference's 20); a mode runs
    ``epochs x epoch_factor`` unless its entry gives ``epochs``. Hours assume the GPUs
    run the FLOPs at that MFU throughout (no input pipeline, bank or
    communication stalls)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    passes = resolve_passes(mode_passes, defaults)
    epochs = mode_defaults()["saat"]["epochs"] if epochs is None else epochs
    rate = gpus * peak_tflops * 1e12 * mfu  # FLOP/s of the whole machine
    f_in, f_full = flops["forward_input_backward"], flops["forward_full_backward"]
    modes = {}
    for name, p in passes.items():
        mode_epochs = float(p.get("epochs", epochs * p.get("epoch_factor", 1.0)))
        per_sample_epoch = p["inner"] * f_in + p["outer"] * f_full
        total = per_sample_epoch * images * mode_epochs
        modes[name] = {"inner_passes": p["inner"], "outer_passes": p["outer"], "passes": p["inner"] + p["outer"],
                       "epochs": mode_epochs, "source": p["source"],
                       "flops_per_sample_epoch": per_sample_epoch, "flops": total,
                       "hours_per_epoch": per_sample_epoch * images / rate / 3600, "hours": total / rate / 3600}
    saat = modes["saat"]["flops"]
    for m in modes.values():
        m["ratio_to_saat"] = m["flops"] / saat
    return {"images": images, "epochs": epochs, "gpus": gpus, "peak_tflops_per_gpu": peak_tflops,
            "peak_source": PEAK_SOURCE, "mfu_assumed": mfu, "flops_per_image": {
                k: flops[k] for k in ("forward", "forward_input_backward", "forward_full_backward")},
            "modes": modes}


def saat_like_step(model: nn.Module, optimizer: torch.optim.Optimizer, x_BCHW: torch.Tensor, guide_BK: torch.Tensor,
                   inner: int, eps: float = 8 / 255, step_size: float = 2 / 255) -> torch.Tensor:
    """A SAAT step's passes: ``inner`` PGD steps of the project's attack
    (input gradients only, model in eval mode as ``saat.attack_mode``'s
    default), then one update on clean + adversarial codes (a proxy of the
    outer loss: the same two forwards and one backward; the code bank's
    mainstay codes are replaced by the fixed ``guide_BK``, their cost is
    ``bench saat-step``'s). Returns the loss (not synchronised)."""
    from saat_dist.attacks.mainstay_pgd import model_mode, pgd

    with model_mode(model, "eval"):
        x_adv = pgd(model, x_BCHW, lambda u: (u * guide_BK).mean(1), eps=eps, step_size=step_size, iters=inner)
    u, u_adv = model(x_BCHW), model(x_adv)
    loss = (u - guide_BK).pow(2).mean() - (u_adv * guide_BK).mean() + 1e-4 * (u_adv - u_adv.sign()).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_mfu(model: nn.Module, batch: torch.Tensor, device: str | torch.device, dtype: torch.dtype,
                     steps: int, *, inner: int | None = None, warmup: int = 2,
                     peak_tflops: float = H200_BF16_DENSE_TFLOPS) -> dict:
    """Times ``steps`` ``saat_like_step``s of ``model`` on ``batch`` (B x 3 x
    S x S images in [0, 1]) on ``device``, under autocast to ``dtype`` unless
    it is float32, after ``warmup`` untimed steps, with ``inner`` PGD steps
    (default: SAAT's config's ``iters``); achieved FLOP/s =
    counted FLOPs per step x steps / seconds, and its fraction of
    ``peak_tflops`` (meaningful only against that device's peak at that
    dtype). The FLOPs per step are the per-image counts (``pass_flops``,
    dtype-independent) x B x (inner + 2 updates), and a count of one real
    step beside them (``flops_per_step_counted``)."""
    inner = mode_defaults()["saat"]["iters"] if inner is None else inner
    device = torch.device(device)
    model = model.to(device).train()
    x = batch.to(device)
    if device.type == "cuda":  # as the trainer lays out convolutions on GPUs
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    b = x.shape[0]
    with torch.no_grad():
        bits = model(x[:2]).shape[1]
    guide = torch.randint(0, 2, (b, bits), device=device).float() * 2 - 1
    optimizer = optimizers.SGD(model.parameters(), lr=1e-4, weight_decay=1e-5)
    cast = (contextlib.nullcontext() if dtype == torch.float32
            else torch.autocast(device_type=device.type, dtype=dtype))
    per_image = pass_flops(model, x[:2])
    per_step = b * (inner * per_image["forward_input_backward"] + 2 * per_image["forward_full_backward"])
    with cast:
        counted = _count(lambda: saat_like_step(model, optimizer, x, guide, inner))
        for _ in range(warmup):
            saat_like_step(model, optimizer, x, guide, inner)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            loss = saat_like_step(model, optimizer, x, guide, inner)
        _sync(device)
        seconds = time.perf_counter() - t
    achieved = per_step * steps / seconds
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "dtype": str(dtype).removeprefix("torch."), "batch": b, "image_size": int(x.shape[-1]),
            "inner": inner, "steps": steps, "warmup": warmup, "seconds": seconds, "seconds_per_step": seconds / steps,
            "images_per_second": b * steps / seconds, "flops_per_image": per_image, "flops_per_step": per_step,
            "flops_per_step_counted": counted, "achieved_tflops": achieved / 1e12, "peak_tflops": peak_tflops,
            "peak_source": PEAK_SOURCE, "mfu": achieved / (peak_tflops * 1e12), "final_loss": float(loss),
            "convention": FLOP_CONVENTION}


def mfu_report(backbones: Iterable[str] = ("resnet50", "alexnet"), image_size: int = 224, bits: int = 64,
               batch: int = 128, steps: int = 10, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
               peak_tflops: float = H200_BF16_DENSE_TFLOPS) -> dict:
    """``measure_step_mfu`` of each backbone's hash model (random weights)."""
    from saat_dist.models import build_hash_model

    rows = {}
    for name in backbones:
        torch.manual_seed(0)
        model = build_hash_model(name, bits)
        x = torch.rand(batch, 3, image_size, image_size)
        rows[name] = measure_step_mfu(model, x, device, dtype, steps, peak_tflops=peak_tflops)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    inner = mode_defaults()["saat"]["iters"]
    return {"case": f"SAAT step MFU ({inner} input-gradient PGD steps + 1 clean+adversarial update)", "bits": bits,
            "torch": torch.__version__, "rows": rows}


def cost_tables(sizes: dict, measured: dict[str, dict] | None = None) -> dict:
    """``bench cost``: FLOPs of each model in ``sizes["models"]`` and the
    time table of each data set in ``sizes["tables"]`` (its backbone's
    FLOPs; low-resolution passes at that backbone's counted FLOPs, not the
    pixel ratio); ``sizes["phases"]``: saat_curriculum's phases in the
    config's form (``until``, ``iters``, ``scale``; default: the config's);
    ``sizes["epochs"]``: the schedule's (default: SAAT's config's);
    ``measured``: passes by mode (``measured_passes``), the formula's for
    the others."""
    devices = {f"{m['backbone']}@{m['image_size']}": m.get("device", sizes.get("device", "cpu"))
               for m in sizes["models"]}  # where each model is counted: cpu, or meta (shapes only)
    flops = {f"{m['backbone']}@{m['image_size']}": model_flops(
        m["backbone"], m["image_size"], m["bits"], device=devices[f"{m['backbone']}@{m['image_size']}"])
        for m in sizes["models"]}
    phases = (phases_from_config(sizes["phases"]) if sizes.get("phases")
              else mode_defaults()["saat_curriculum"]["phases"])
    sides = {p[k] for p in phases for k in ("resolution", "outer_resolution")} - {1.0}
    tables = {}
    for name, t in sizes["tables"].items():
        key = f"{t['backbone']}@{t['image_size']}"
        full = flops[key]
        ratios = {1.0: {"inner": 1.0, "outer": 1.0}}
        for r in sorted(sides):
            low = model_flops(t["backbone"], max(16, round(t["image_size"] * r)), t["bits"], device=devices[key])
            ratios[r] = {"inner": low["forward_input_backward"] / full["forward_input_backward"],
                         "outer": low["forward_full_backward"] / full["forward_full_backward"]}
        scales = {"inner_scale": lambda r: ratios[r]["inner"], "outer_scale": lambda r: ratios[r]["outer"]}
        table = training_cost(measured, full, t["images"], sizes.get("epochs"), sizes["gpus"], sizes["peak_tflops"],
                              sizes["mfu"], defaults=default_mode_passes(phases, **scales))
        tables[name] = {"backbone": key, **table,
                        "low_res_flop_ratio": {str(r): v for r, v in sorted(ratios.items())}}
    certify = {name: certification_cost(flops[key]["forward"], c["queries"], c["settings"], sizes["peak_tflops"],
                                        sizes["mfu"], key)
               for name, c in sizes.get("certify", {}).items() for key in [f"{c['backbone']}@{c['image_size']}"]}
    return {"case": "cost at scale", "sizes": sizes, "flop_convention": FLOP_CONVENTION, "models": flops,
            "tables": tables, "certify": certify}


def certification_cost(forward_flops: float, queries: int, settings: dict[str, dict], peak_tflops: float,
                       mfu: float, model: str) -> dict:
    """Center-smoothing certificates (issue 20) on ONE GPU: forwards per
    query 2 n_center + n_certify + 1 (no backward; the attack check apart),
    per setting {name: {"n_center", "n_certify"}}, at ``mfu`` of
    ``peak_tflops``."""
    out = {"model": model, "queries": queries, "gpus": 1, "mfu_assumed": mfu, "peak_tflops_per_gpu": peak_tflops,
           "settings": {}}
    for name, s in settings.items():
        forwards = 2 * s["n_center"] + s["n_certify"] + 1
        total = forwards * forward_flops * queries
        out["settings"][name] = {**s, "forwards_per_query": forwards, "flops_per_query": forwards * forward_flops,
                                 "flops": total, "hours": total / (peak_tflops * 1e12 * mfu) / 3600}
    return out
