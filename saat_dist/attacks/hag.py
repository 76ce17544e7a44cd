"""HAG (Yang et al., "Adversarial examples for Hamming space search", IEEE
TCYB 2020): push the code of x + delta away from x's own clean code.

Loss per image, with u = F(x + delta; alpha) and h = F(x) the clean code:
a bit counts while it has not yet moved past the opposite side,
m_k = 1[|u_k - sign(h_k)| < 1 + t]; then

    (sum_k m_k u_k h_k / (sum_k m_k + 1e-8) + 1)^2 + beta (mean_k m_k u_k)^2,

minimised by SGD with momentum 0.9 on the image itself (lr 100), each step
followed by projection onto the eps-ball and [0, 1]; alpha follows the
10-phase schedule. The reference (xandery-geek/SAAT ``attack.py``) attacks in
batches of 128 and averages the loss over the batch; here every image gets
the gradient it would get in such a batch (``REFERENCE_BATCH``), so its step
is the reference's and results do not depend on the batch size.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from saat_dist import optimizers
from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.attacks.mainstay_pgd import ALPHA_SCHEDULE, alpha_at, model_mode, project
from saat_dist.config_fields import section
from saat_dist.models.adapter import as_hash_model


@section
class HAGConfig:
    """HAG (Yang et al.): away from the clean code."""

    iters: Annotated[int, Field(ge=1, description="iterations (HAG paper's default)")] = 2000
    lr: Annotated[float, Field(gt=0, description=(
        "SGD learning rate on the image (momentum 0.9), as the reference"))] = 100.0
    threshold: Annotated[float, Field(description=(
        "a bit stops counting once |F(x_adv) - sign(F(x))| exceeds 1 + threshold"))] = 0.5
    beta: Annotated[float, Field(description="weight of the code-balance term")] = 1.0


REFERENCE_BATCH = 128  # attack.py's --batch_size default


def hag_loss(u_BK: torch.Tensor, clean_BK: torch.Tensor, threshold: float = 0.5, beta: float = 1.0) -> torch.Tensor:
    """HAG's loss per image (B,)."""
    mask = ((1 + threshold) - (u_BK - torch.sign(clean_BK)).abs() > 0).to(u_BK.dtype)
    u, h = mask * u_BK, mask * clean_BK
    agreement = (u * h).sum(1) / (mask.sum(1) + 1e-8)
    return (agreement + 1).pow(2) + beta * u.mean(1).pow(2)


def hag_attack(model: nn.Module, x_BCHW: torch.Tensor, *, eps: float, iters: int = 2000, lr: float = 100.0,
               momentum: float = 0.9, threshold: float = 0.5, beta: float = 1.0,
               alpha_schedule: tuple[float, ...] | None = ALPHA_SCHEDULE, mode: str = "eval") -> torch.Tensor:
    """Adversarial images (||delta||_inf <= eps, values in [0, 1]); starts at x."""
    model = as_hash_model(model)
    with model_mode(model, mode):
        with torch.no_grad():
            clean = model(x_BCHW, alpha=1.0)
        x_adv = x_BCHW.clone().requires_grad_(True)
        opt = optimizers.SGD([x_adv], lr=lr, momentum=momentum)
        for it in range(iters):
            u = model(x_adv, alpha=alpha_at(it, iters, alpha_schedule))
            # gradients for the image only: the model's parameters get none
            (x_adv.grad,) = torch.autograd.grad(hag_loss(u, clean, threshold, beta).sum() / REFERENCE_BATCH, x_adv)
            opt.step()
            with torch.no_grad():
                x_adv.copy_(project(x_BCHW, x_adv, eps))
    return x_adv.detach()


def _run(ctx: AttackContext, x, labels, index) -> AttackOutput:
    h = ctx.settings.hag
    return AttackOutput(hag_attack(ctx.model, x, eps=ctx.settings.eps, iters=h.iters, lr=h.lr, threshold=h.threshold,
                                   beta=h.beta), [x])


ATTACKS = (Attack("hag", "HAG", "untargeted", lambda a: (a.eps, a.hag.iters, 1), _run, order=10),)
