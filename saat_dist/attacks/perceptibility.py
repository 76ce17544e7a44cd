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


def perceptibility_sums(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Sums behind ``perceptibility`` for one batch, to add over batches and
    processes: [sum of per-image L-inf, sum of per-image L2, sum of squares,
    images, pixel values] (float64)."""
    d = (x_adv - x).flatten(1).double()
    return torch.stack([d.abs().amax(1).sum(), d.norm(dim=1).sum(), d.pow(2).sum(),
                        torch.tensor(float(len(d)), dtype=torch.float64, device=d.device),
                        torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device)]).cpu()


def perceptibility_from_sums(sums: torch.Tensor) -> dict[str, float]:
    linf, l2, sq, images, values = sums.tolist()
    images, values = max(images, 1.0), max(values, 1.0)
    return {"linf": linf / images, "l2": l2 / images, "mse": sq / values}


def reference_perceptibility_sums(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Sums behind the reference code's perceptibility (``cal_perceptibility``):
    matrix norms of each image channel's H x W perturbation, the induced
    L-inf norm (largest row sum of |delta|) and the spectral norm (largest
    singular value), averaged over images and channels. Returns [sum of L-inf
    matrix norms, sum of spectral norms, channel matrices] (float64, CPU)."""
    d = (x_adv - x).double()
    linf = torch.linalg.matrix_norm(d, ord=float("inf"))
    spectral = torch.linalg.matrix_norm(d, ord=2)
    return torch.stack([linf.sum(), spectral.sum(), torch.tensor(float(linf.numel()), dtype=torch.float64,
                                                                device=d.device)]).cpu()


def reference_perceptibility_from_sums(sums: torch.Tensor) -> dict[str, float]:
    linf, spectral, matrices = sums.tolist()
    matrices = max(matrices, 1.0)
    return {"linf_matrix_norm": linf / matrices, "spectral_norm": spectral / matrices}
