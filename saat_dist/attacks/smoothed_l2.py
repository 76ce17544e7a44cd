"""An l2 PGD attack on a center-smoothed hash code (the check of the
certificates of ``saat_dist.evaluation.center_smoothing``).

Maximises the expected disagreement of the tanh codes with the query's
center code over the smoothing noise,
    E_z[ mean_bits (1 - F(x + delta + sigma z) * c) / 2 ],
estimated with ``samples`` keyed draws per query and step (fresh each
step), within ||delta||_2 <= eps and x + delta in [0, 1]. Steps follow the
normalised gradient (l2 PGD), then delta is projected onto the l2 ball and
the image clipped to [0, 1] (clipping only shrinks |delta|, so the ball
holds). Starts at delta = 0. With sigma = 0 and one sample it is a plain l2
attack on the unsmoothed code.

Not in the evaluation suite's registry (no ``ATTACKS`` entry): it attacks
the smoothed model, which only the certification runs.
"""

from __future__ import annotations

import torch
from torch import nn

from saat_dist.attacks.mainstay_pgd import model_mode
from saat_dist.keyed_random import ItemKeys
from saat_dist.models.adapter import as_hash_model


def disagreement(codes_BSK: torch.Tensor, center_BK: torch.Tensor) -> torch.Tensor:
    """Per query (B,): mean over samples and bits of (1 - F * c) / 2, in [0, 1]."""
    return ((1 - codes_BSK * center_BK[:, None, :]) / 2).mean((1, 2))


def smoothed_l2_attack(model: nn.Module, x_BCHW: torch.Tensor, center_BK: torch.Tensor, *, eps: float, iters: int,
                       samples: int, sigma: float, keys: ItemKeys, step_size: float | None = None,
                       mode: str = "eval") -> torch.Tensor:
    """x + delta with ||delta||_2 <= eps per query and values in [0, 1] (see
    the module docstring). ``step_size`` defaults to 2.5 eps / iters; step t's
    noise comes from ``keys.child("step", t, "draw", s)``, keyed by item."""
    if iters < 1 or samples < 1 or eps < 0 or sigma < 0:
        raise ValueError("smoothed_l2_attack: need iters >= 1, samples >= 1, eps >= 0, sigma >= 0")
    model = as_hash_model(model)
    step = 2.5 * eps / iters if step_size is None else step_size
    b, shape = len(x_BCHW), tuple(x_BCHW.shape[1:])
    center = center_BK.to(x_BCHW.device, torch.float32)
    delta = torch.zeros_like(x_BCHW, requires_grad=True)
    with model_mode(model, mode):
        for t in range(iters):
            if sigma > 0:
                noise = torch.stack([keys.child("step", t, "draw", s).normal(shape, x_BCHW.device, x_BCHW.dtype)
                                     for s in range(samples)], 1)
            else:
                noise = x_BCHW.new_zeros(b, samples, *shape)
            noisy = (x_BCHW + delta)[:, None] + sigma * noise
            codes = model(noisy.reshape(b * samples, *shape), alpha=1.0).view(b, samples, -1)
            (grad,) = torch.autograd.grad(disagreement(codes, center).sum(), delta)
            with torch.no_grad():
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(b, *([1] * len(shape)))
                delta += step * grad / norm
                scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                delta *= scale.view(b, *([1] * len(shape)))
                delta.copy_((x_BCHW + delta).clamp(0, 1) - x_BCHW)
    return (x_BCHW + delta).detach()
