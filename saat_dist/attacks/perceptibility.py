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


def perceptibility_rows(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per image (float64 B x 7, CPU): the terms behind both perceptibility
    reports, [L-inf, L2, sum of squares, pixel values, sum over channels of
    the L-inf matrix norm, of the spectral norm, channels]. Summed in query
    order they give the same figures whichever process attacked which query."""
    d = (x_adv - x).double()
    flat = d.flatten(1)
    linf_m = torch.linalg.matrix_norm(d, ord=float("inf")).sum(1)
    spec = torch.linalg.matrix_norm(d, ord=2).sum(1)
    n = torch.full((len(d),), float(flat.shape[1]), dtype=torch.float64, device=d.device)
    ch = torch.full((len(d),), float(d.shape[1]), dtype=torch.float64, device=d.device)
    return torch.stack([flat.abs().amax(1), flat.norm(dim=1), flat.pow(2).sum(1), n, linf_m, spec, ch], 1).cpu()


def perceptibility_from_rows(rows: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """(``perceptibility`` figures, the reference's figures) of the rows of ``perceptibility_rows``."""
    s = rows.to(torch.float64).sum(0) if len(rows) else torch.zeros(7, dtype=torch.float64)
    images = float(len(rows))
    own = perceptibility_from_sums(torch.stack([s[0], s[1], s[2], torch.tensor(images, dtype=torch.float64), s[3]]))
    ref = reference_perceptibility_from_sums(torch.stack([s[4], s[5], s[6]]))
    return own, ref
