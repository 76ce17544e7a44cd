"""A black-box random-search attack on the Hamming objective, in the style of
the Square attack (Andriushchenko et al., ECCV 2020), L-inf version: no
gradients, one forward pass per iteration.

Objective (minimised): the Hamming agreement of sign(F(x + delta)) with the
guide code, sum_k sign(F_k) b_k, with 0.5 mean(F b) as a tie-break (it lies
in (-0.5, 0.5), so it never outweighs one bit). Start: vertical stripes of
+-eps per column and channel. Each iteration, per image, a random square of
side round(sqrt(p H W)) gets a new random +-eps per channel; the change is
kept if the objective drops. p starts at ``p_init`` and is halved on the
Square attack's schedule (at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
of 10,000 iterations, scaled to ``iters``).

With ``keys`` every image draws its stripes, squares and signs from its own
keyed stream (iteration ``it``: ``keys.child("it", it)``), so its result does
not depend on the batch or worker it ran in; without, from ``generator``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.attacks.mainstay_pgd import model_mode
from saat_dist.config_fields import section
from saat_dist.keyed_random import ItemKeys
from saat_dist.models.adapter import as_hash_model


@section
class SquareConfig:
    """Square: black-box random search on the Hamming objective."""

    iters: Annotated[int, Field(ge=1, description="queries per image (one forward pass each; no gradients)")] = 1000
    p_init: Annotated[float, Field(gt=0, le=1, description=(
        "initial share of pixels in the random square (halved on the Square attack's schedule)"))] = 0.1


_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_share(p_init: float, it: int, iters: int) -> float:
    """Share of the image a square covers at iteration ``it``."""
    t = int(it / iters * 10000)
    return p_init / 2 ** sum(t > s for s in _SCHEDULE)


def _keyed_stripes(keys: ItemKeys, x: torch.Tensor) -> torch.Tensor:
    c, w = x.shape[1], x.shape[3]
    return (keys.child("stripes").uniform((c, 1, w), x.device) < 0.5).to(x.dtype) * 2 - 1


def square_start(x_BCHW: torch.Tensor, eps: float, keys: ItemKeys) -> torch.Tensor:
    """Where a keyed ``square_attack`` starts: vertical stripes of +-eps."""
    return (x_BCHW + eps * _keyed_stripes(keys, x_BCHW).expand_as(x_BCHW)).clamp(0, 1)


def hamming_objective(codes_BK: torch.Tensor, guide_BK: torch.Tensor) -> torch.Tensor:
    return (torch.sign(codes_BK) * guide_BK).sum(1) + 0.5 * (codes_BK * guide_BK).mean(1)


@torch.no_grad()
def square_attack(model: nn.Module, x_BCHW: torch.Tensor, guide_BK: torch.Tensor, *, eps: float, iters: int = 1000,
                  p_init: float = 0.1, targeted: bool = False, generator: torch.Generator | None = None,
                  mode: str = "eval", keys: ItemKeys | None = None) -> torch.Tensor:
    """Adversarial images (||delta||_inf <= eps, values in [0, 1]) from forward
    passes only. Untargeted: away from ``guide_BK`` (b*(y)); targeted: toward it."""
    model = as_hash_model(model)
    x = x_BCHW
    b, c, h, w = x.shape
    dev = x.device
    guide = guide_BK.to(dev, x.dtype) * (-1.0 if targeted else 1.0)

    def rand_sign(*shape):
        return torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1

    def draws(it: int, side: int):
        """(top B x 1, left B x 1, signs B x C x 1 x 1) of iteration ``it``."""
        if keys is None:
            return (torch.randint(0, h - side + 1, (b, 1), generator=generator, device=dev),
                    torch.randint(0, w - side + 1, (b, 1), generator=generator, device=dev), rand_sign(b, c, 1, 1))
        u = keys.child("it", it).uniform((2 + c,), dev)
        top = (u[:, :1] * (h - side + 1)).long().clamp_max(h - side)
        left = (u[:, 1:2] * (w - side + 1)).long().clamp_max(w - side)
        return top, left, ((u[:, 2:] < 0.5).to(x.dtype) * 2 - 1).view(b, c, 1, 1)

    with model_mode(model, mode):
        stripes = rand_sign(b, c, 1, w) if keys is None else _keyed_stripes(keys, x)
        delta = eps * stripes.expand(b, c, h, w).clone()
        x_adv = (x + delta).clamp(0, 1)
        best = hamming_objective(model(x_adv, alpha=1.0), guide)
        rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
        for it in range(iters):
            side = max(1, min(h, w, int(round((square_share(p_init, it, iters) * h * w) ** 0.5))))
            top, left, signs = draws(it, side)
            in_rows = (rows >= top) & (rows < top + side)  # B x H
            in_cols = (cols >= left) & (cols < left + side)  # B x W
            window = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # B x 1 x H x W
            cand_delta = torch.where(window, eps * signs, delta)
            cand = (x + cand_delta).clamp(0, 1)
            score = hamming_objective(model(cand, alpha=1.0), guide)
            better = score < best
            delta = torch.where(better[:, None, None, None], cand_delta, delta)
            x_adv = torch.where(better[:, None, None, None], cand, x_adv)
            best = torch.where(better, score, best)
    return x_adv


def _run(ctx: AttackContext, x, labels, index) -> AttackOutput:
    a = ctx.settings
    keys = ctx.keys(index, "square")
    adv = square_attack(ctx.model, x, ctx.guide_of(labels).to(ctx.device), eps=a.eps, iters=a.square.iters,
                        p_init=a.square.p_init, keys=keys)
    return AttackOutput(adv, [x, square_start(x, a.eps, keys)])


ATTACKS = (Attack("square", "random search (black-box)", "untargeted", lambda a: (a.eps, a.square.iters, 1), _run,
                  order=30, whitebox=False),)
