"""Binary codes of images."""

from __future__ import annotations

import torch
from torch import nn

from saat_dist.attacks.mainstay_pgd import eval_mode
from saat_dist.models.adapter import as_hash_model


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """+-1 codes (CPU float) of images N x 3 x S x S, uint8 or float in [0, 1].

    Test-time model (eval mode, alpha = 1); a zero output maps to +1.
    """
    out, model = [], as_hash_model(model)  # a plain forward(x) module too
    with eval_mode(model):
        for s in range(0, len(images), batch_size):
            x = images[s : s + batch_size].to(device)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            out.append(torch.where(model(x, alpha=1.0) >= 0, 1.0, -1.0).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_batches(model: nn.Module, batches, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, +-1 codes on ``device``) of streamed (uint8 images, labels, index)
    batches: only one batch of images is in memory at a time."""
    index, codes = [], []
    for images, _, idx in batches:
        codes.append(encode(model, images, device, len(images)).to(device))
        index.append(idx.to(device))
    if not index:
        return torch.zeros(0, dtype=torch.int64, device=device), torch.zeros(0, 0, device=device)
    return torch.cat(index), torch.cat(codes)
