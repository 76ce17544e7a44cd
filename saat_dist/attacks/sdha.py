"""SDHA (Lu et al., "A smart adversarial attack on deep hashing based image
retrieval", ICMR 2021): push the code away from the codes of the training
items relevant to the query, the nearest ones most.

With q = F(x + delta; alpha), r_j the sign codes of the relevant training
items (the query's own clean sign code when it has none), p_k = q_k r_jk:

    dis_j = 0.5 sum_k |q_k - r_jk| sigmoid(sigma p_k) + sum_k (1 - sigmoid(sigma p_k))
    w_j   = (Hamming(sign q, r_j) + 1e-8)^(-z)          (no gradient)
    L     = mse(x + delta, x) - (weight / K) mean_i mean_j w_j dis_j

minimised by Adam (lr 0.01) on the image, projected onto the eps-ball and
[0, 1] after each step; alpha follows the 10-phase schedule. The reference
averages both terms over its batches of 128 queries; here each image's terms
are divided by that batch size (``REFERENCE_BATCH``), so every image gets the
gradient it would get there and results do not depend on the batch it is in. The surrogate's
gradient is accumulated over chunks of the training codes against a detached
copy of q and then pushed through the model once, so memory stays bounded
whatever the number of relevant items.
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
class SDHAConfig:
    """SDHA (Lu et al.): away from relevant training codes."""

    iters: Annotated[int, Field(ge=1, description="iterations (SDHA paper's default)")] = 1500
    lr: Annotated[float, Field(gt=0, description="Adam learning rate on the image")] = 0.01
    weight: Annotated[float, Field(description=(
        "weight of the surrogate term (divided by K), beside the MSE to the clean image"))] = 25.0
    sigma: Annotated[float, Field(description="sigmoid sharpness of the soft Hamming distance")] = 5.0
    z: Annotated[float, Field(description="relevant items weighted by (Hamming distance + 1e-8)^-z")] = 0.5


REFERENCE_BATCH = 128  # the reference's attack batch (attack.py --batch_size)
CHUNK_VALUES = 1 << 22  # B x chunk x K values per surrogate chunk


def sdha_surrogate(q_BK: torch.Tensor, relevant_BN: torch.Tensor, pool_NK: torch.Tensor, own_BK: torch.Tensor,
                   sigma: float = 5.0, z: float = 0.5) -> torch.Tensor:
    """Per query (B,): mean over its relevant pool codes of w_j dis_j (see the
    module docstring); a query without relevant items uses its own code
    ``own_BK``. ``pool_NK`` holds +-1 codes."""
    b, k = q_BK.shape
    total = q_BK.new_zeros(b)
    count = relevant_BN.sum(1).to(q_BK.dtype)
    chunk = max(1, CHUNK_VALUES // max(1, b * k))
    for s in range(0, pool_NK.shape[0], chunk):
        r = pool_NK[s : s + chunk].to(q_BK.dtype)
        total = total + (_weighted_dis(q_BK, r, sigma, z) * relevant_BN[:, s : s + chunk].to(q_BK.dtype)).sum(1)
    own = _weighted_dis(q_BK.unsqueeze(1), own_BK.unsqueeze(1).to(q_BK.dtype), sigma, z, paired=True).squeeze(1)
    return torch.where(count > 0, total / count.clamp_min(1), own)


def _weighted_dis(q, r, sigma, z, paired: bool = False):
    """w * dis for every (query, code) pair: B x C (``paired``: q B x 1 x K against r B x 1 x K)."""
    prod = q * r if paired else q.unsqueeze(1) * r.unsqueeze(0)  # B x C x K
    sig = torch.sigmoid(sigma * prod)
    diff = (q - r).abs() if paired else (q.unsqueeze(1) - r.unsqueeze(0)).abs()
    dis = 0.5 * (diff * sig).sum(-1) + (1 - sig).sum(-1)
    k = q.shape[-1]
    with torch.no_grad():
        sq = torch.sign(q)
        agree = (sq * r).sum(-1) if paired else sq @ r.T
        w = (0.5 * (k - agree) + 1e-8).pow(-z)
    return dis * w


def sdha_attack(model: nn.Module, x_BCHW: torch.Tensor, y_BC: torch.Tensor, pool_codes: torch.Tensor,
                pool_labels: torch.Tensor, *, eps: float, iters: int = 1500, lr: float = 0.01, weight: float = 25.0,
                sigma: float = 5.0, z: float = 0.5, alpha_schedule: tuple[float, ...] | None = ALPHA_SCHEDULE,
                mode: str = "eval") -> torch.Tensor:
    """Adversarial images against the relevant items of ``pool_codes``
    (+-1, N x K; the training set's codes in the reference) with labels
    ``pool_labels`` (N x C). Starts at x."""
    model = as_hash_model(model)
    device = x_BCHW.device
    pool = torch.sign(pool_codes).to(device)
    relevant = (y_BC.to(device, torch.float32) @ pool_labels.to(device, torch.float32).T) > 0
    k = pool.shape[1]
    with model_mode(model, mode):
        with torch.no_grad():
            own = torch.sign(model(x_BCHW, alpha=1.0))
        x_adv = x_BCHW.clone().requires_grad_(True)
        opt = optimizers.Adam([x_adv], lr=lr, betas=(0.9, 0.999))
        for it in range(iters):
            q = model(x_adv, alpha=alpha_at(it, iters, alpha_schedule))
            qd = q.detach().requires_grad_(True)
            # per image, as in a reference batch of REFERENCE_BATCH: no term couples the images
            sur = -(weight / k) * sdha_surrogate(qd, relevant, pool, own, sigma, z).sum() / REFERENCE_BATCH
            (grad_q,) = torch.autograd.grad(sur, qd)
            mse = (x_adv - x_BCHW).pow(2).flatten(1).mean(1).sum() / REFERENCE_BATCH
            (x_adv.grad,) = torch.autograd.grad([mse, q], x_adv, grad_outputs=[None, grad_q])
            opt.step()
            with torch.no_grad():
                x_adv.copy_(project(x_BCHW, x_adv, eps))
    return x_adv.detach()


def _run(ctx: AttackContext, x, labels, index) -> AttackOutput:
    s = ctx.settings.sdha
    adv = sdha_attack(ctx.model, x, labels, ctx.tr_codes, ctx.tr_lab, eps=ctx.settings.eps, iters=s.iters, lr=s.lr,
                      weight=s.weight, sigma=s.sigma, z=s.z)
    return AttackOutput(adv, [x])


ATTACKS = (Attack("sdha", "SDHA", "untargeted", lambda a: (a.eps, a.sdha.iters, 1), _run, order=20),)
