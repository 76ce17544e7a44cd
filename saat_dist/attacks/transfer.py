"""Transfer-attack generators on the mainstay loss (the reference's
``model/adv_generator``): BIM, DI-FGSM, NI-FGSM, SI-NI-FGSM and VMI-FGSM.

All minimise ``attack_loss`` against the guide code (b*(y) untargeted, b*(y_t)
targeted; the reference's sharper form by default) with signed steps of
``step_size``, projection onto the eps-ball and [0, 1] after each step and
alpha on the 10-phase schedule. With g the loss gradient normalised per image
by its mean absolute value, the momentum methods keep m = decay m + g and step
along -sign(m):

- BIM: plain signed gradient steps from x (no random start, no momentum).
- DI-FGSM (Xie et al. 2019): random start; with probability ``di_prob`` per
  step the batch is shrunk to a random size in [di_resize S, S) and padded
  back to S at a random place before the forward pass; decay 0 as the
  reference (so m = g).
- NI-FGSM (Lin et al. 2020): the gradient at the Nesterov look-ahead point
  x_adv - decay * step * m.
- SI-NI-FGSM: NI-FGSM with the gradient averaged over the scale copies
  x / 2^i, i < si_copies (the paper's form; the reference divides its copies
  cumulatively, x / 2^(i(i+1)/2)).
- VMI-FGSM (Wang & He 2021): the gradient plus the variance term
  v = mean over N neighbours x_adv + U(-beta eps, beta eps) of their
  gradients, minus the gradient at x_adv, from the previous step.

``transfer_codes`` encodes examples crafted on one model with others: the
transfer evaluation (crafted on model A, scored on model B).

With ``keys`` (``saat_dist.keyed_random.ItemKeys``) every random draw is the
image's own: DI-FGSM's start and its transform (drawn per image: its own
coin, size and offset each step, where the reference draws one transform
per batch) and VMI-FGSM's neighbours; a result then does not depend on the
batch or the worker. Without keys they come from ``generator``, per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.attacks.mainstay_pgd import ALPHA_SCHEDULE, alpha_at, attack_loss, model_mode, project
from saat_dist.config_fields import StepSize, section
from saat_dist.models.adapter import as_hash_model
from saat_dist.keyed_random import ItemKeys


@section
class TransferConfig:
    """Transfer attacks: BIM, DI-, NI-, SI-NI- and VMI-FGSM on the mainstay loss."""

    iters: Annotated[int, Field(ge=1, description=(
        "iterations of BIM, DI-, NI-, SI-NI- and VMI-FGSM (the reference: 100)"))] = 100
    step_size: Annotated[StepSize, Field(description="step of each (a number or N/255)")] = 1 / 255
    decay: Annotated[float, Field(description=(
        "momentum decay (NI, SI-NI, VMI; DI-FGSM uses 0 as the reference)"))] = 1.0
    di_prob: Annotated[float, Field(ge=0, le=1, description=(
        "DI-FGSM: probability of the random resize-and-pad"))] = 0.5
    di_resize: Annotated[float, Field(gt=0, lt=1, description=(
        "DI-FGSM: images are shrunk to a random size in [di_resize, 1) x S, then padded"))] = 0.9
    si_copies: Annotated[int, Field(ge=1, description="SI-NI-FGSM: scale copies x / 2^i, i < si_copies")] = 5
    vmi_neighbours: Annotated[int, Field(ge=1, description=(
        "VMI-FGSM: neighbours sampled for the gradient variance ..."))] = 5
    vmi_beta: Annotated[float, Field(description="... uniformly within beta x eps")] = 1.5


GENERATORS = ("bim", "difgsm", "nifgsm", "sinifgsm", "vmifgsm")


def _loss_grad(model, guide, targeted, loss, alpha, transform=None):
    """x -> gradient of the summed attack loss at x (optionally of transform(x))."""
    def grad(x):
        x = x.detach().requires_grad_(True)
        inp = x if transform is None else transform(x)
        obj = attack_loss(model(inp, alpha=alpha), guide, targeted, loss).sum()
        return torch.autograd.grad(obj, x)[0]
    return grad


def _normalised(g: torch.Tensor) -> torch.Tensor:
    return g / g.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)


def input_diversity(x: torch.Tensor, resize: float, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """DI-FGSM's transform: with probability ``prob`` shrink the batch to a
    random side in [resize S, S) and zero-pad it back to S at a random offset."""
    if float(torch.rand(1, generator=generator)) >= prob:
        return x
    size = x.shape[-1]
    low = int(size * resize)
    side = int(torch.randint(low, size, (1,), generator=generator)) if low < size else size
    shrunk = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    rem = size - side
    top = int(torch.randint(0, rem + 1, (1,), generator=generator))
    left = int(torch.randint(0, rem + 1, (1,), generator=generator))
    return F.pad(shrunk, [left, rem - left, top, rem - top], value=0)


def keyed_input_diversity(x: torch.Tensor, resize: float, prob: float, keys: ItemKeys) -> torch.Tensor:
    """DI-FGSM's transform with each image's own draws (coin, side, offsets)."""
    size = x.shape[-1]
    low = int(size * resize)
    u = keys.uniform((4,), x.device).tolist()
    out = []
    for i, (coin, side_u, top_u, left_u) in enumerate(u):
        xi = x[i : i + 1]
        if coin >= prob:
            out.append(xi)
            continue
        side = min(size - 1, low + int(side_u * (size - low))) if low < size else size
        rem = size - side
        top, left = min(rem, int(top_u * (rem + 1))), min(rem, int(left_u * (rem + 1)))
        shrunk = F.interpolate(xi, size=(side, side), mode="bilinear", align_corners=False)
        out.append(F.pad(shrunk, [left, rem - left, top, rem - top], value=0))
    return torch.cat(out)


def transfer_start(name: str, x_BCHW: torch.Tensor, eps: float, keys: ItemKeys) -> torch.Tensor:
    """Where a keyed ``transfer_attack`` starts: x, or DI-FGSM's random start."""
    if name != "difgsm":
        return x_BCHW.clone()
    noise = keys.child("start").uniform(tuple(x_BCHW.shape[1:]), x_BCHW.device).to(x_BCHW.dtype) * (2 * eps) - eps
    return project(x_BCHW, x_BCHW + noise, eps)


def transfer_attack(name: str, model: nn.Module, x_BCHW: torch.Tensor, guide_BK: torch.Tensor, *, eps: float,
                    step_size: float = 1 / 255, iters: int = 100, targeted: bool = False, loss: str = "sharp",
                    decay: float = 1.0, di_prob: float = 0.5, di_resize: float = 0.9, si_copies: int = 5,
                    vmi_neighbours: int = 5, vmi_beta: float = 1.5,
                    alpha_schedule: tuple[float, ...] | None = ALPHA_SCHEDULE,
                    generator: torch.Generator | None = None, mode: str = "eval",
                    keys: ItemKeys | None = None) -> torch.Tensor:
    """Adversarial images from generator ``name`` (one of ``GENERATORS``)."""
    if name not in GENERATORS:
        raise ValueError(f"transfer generator {name!r} is not one of {list(GENERATORS)}")
    model = as_hash_model(model)
    x = x_BCHW
    guide = guide_BK.to(x.device, x.dtype)
    # DI-FGSM's random numbers come from a CPU generator (shapes and offsets)
    cpu_gen = None if generator is None or keys is not None else torch.Generator().manual_seed(int(torch.randint(
        0, 2**62, (1,), generator=generator, device=generator.device)))

    def uniform(low: float, high: float, *parts) -> torch.Tensor:  # a draw of x's shape
        if keys is None:
            return torch.empty_like(x).uniform_(low, high, generator=generator)
        return keys.child(*parts).uniform(tuple(x.shape[1:]), x.device).to(x.dtype) * (high - low) + low

    with model_mode(model, mode):
        x_adv = x.clone()
        if name == "difgsm":
            x_adv = project(x, x + uniform(-eps, eps, "start"), eps)
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        for it in range(iters):
            alpha = alpha_at(it, iters, alpha_schedule)
            grad: Callable = _loss_grad(model, guide, targeted, loss, alpha)
            if name == "bim":
                g = grad(x_adv)
                x_adv = project(x, x_adv - step_size * g.sign(), eps)
                continue
            if name == "difgsm":
                if keys is None:
                    def diversity(t):
                        return input_diversity(t, di_resize, di_prob, cpu_gen)
                else:
                    def diversity(t, k=keys.child("it", it)):
                        return keyed_input_diversity(t, di_resize, di_prob, k)
                g = _loss_grad(model, guide, targeted, loss, alpha, diversity)(x_adv)
                m = _normalised(g)  # decay 0 (no momentum), as the reference
            elif name in ("nifgsm", "sinifgsm"):
                nes = x_adv - decay * step_size * m
                if name == "nifgsm":
                    g = grad(nes)
                else:
                    g = sum(grad(nes / 2**i) / 2**i for i in range(si_copies)) / si_copies
                m = decay * m + _normalised(g)
            else:  # vmifgsm
                g = grad(x_adv)
                m = decay * m + _normalised(g + v)
                neighbours = sum(grad(x_adv + uniform(-vmi_beta * eps, vmi_beta * eps, "it", it, "nb", k))
                                 for k in range(vmi_neighbours))
                v = neighbours / vmi_neighbours - g
            x_adv = project(x, x_adv - step_size * m.sign(), eps)
    return x_adv.detach()


@torch.no_grad()
def transfer_codes(models: dict[str, nn.Module], x_adv_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
    """+-1 codes of examples crafted elsewhere under each of ``models`` (eval mode, alpha 1)."""
    out = {}
    for name, m in models.items():
        m = as_hash_model(m, source=name)
        with model_mode(m, "eval"):
            out[name] = torch.where(m(x_adv_BCHW, alpha=1.0) >= 0, 1.0, -1.0)
    return out


def _run(name: str):
    def run(ctx: AttackContext, x, labels, index) -> AttackOutput:
        a, t = ctx.settings, ctx.settings.transfer
        keys = ctx.keys(index, name)
        adv = transfer_attack(name, ctx.model, x, ctx.guide_of(labels).to(ctx.device), eps=a.eps, step_size=t.step_size,
                              iters=t.iters, loss=a.loss, decay=t.decay, di_prob=t.di_prob, di_resize=t.di_resize,
                              si_copies=t.si_copies, vmi_neighbours=t.vmi_neighbours, vmi_beta=t.vmi_beta, keys=keys)
        return AttackOutput(adv, [x, transfer_start(name, x, a.eps, keys)])
    return run


LABELS = {"bim": "BIM", "difgsm": "DI-FGSM", "nifgsm": "NI-FGSM", "sinifgsm": "SI-NI-FGSM", "vmifgsm": "VMI-FGSM"}
ATTACKS = tuple(Attack(g, LABELS[g], "untargeted", lambda a: (a.eps, a.transfer.iters, 1), _run(g), order=40 + i)
                for i, g in enumerate(GENERATORS))
