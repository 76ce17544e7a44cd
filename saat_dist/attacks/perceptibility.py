"""How visible a perturbation is."""

from __future__ import annotations

import torch


def perceptibility(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, float]:
    """Mean over images of the L-inf and L2 norms of delta, and the per-pixel MSE."""
    d = (x_adv - x).flatten(1).double()
    return {
        "linf": float(d.abs().amax(1).mean()),
        "l2": float(d.norm(dim=1).mean()),
        "mse": float(d.pow(2).mean()),
    }
