"""The inner attack of single-step adversarial training: one signed gradient
step of the untargeted mainstay loss from a random start (FGSM-RS, Wong et
al., ICLR 2020; N-FGSM, de Jorge et al., NeurIPS 2022). A training attack,
not an evaluation one: it registers nothing in the attack suite."""

from __future__ import annotations

import torch

from saat_dist.attacks.mainstay_pgd import attack_loss, model_mode, project
from saat_dist.keyed_random import ItemKeys
from saat_dist.models.adapter import as_hash_model


def single_step_examples(net, x: torch.Tensor, guide: torch.Tensor, *, eps: float, noise: float, step: float,
                         project_to_ball: bool, keys: ItemKeys, mode: str = "eval") -> torch.Tensor:
    """x + noise + one signed step (``step`` x eps) on the untargeted mainstay
    loss mean(F(x') * b*), in [0, 1]; projected onto the eps-ball around x
    when ``project_to_ball``. The start is keyed by item. One gradient of
    the input per example."""
    net = as_hash_model(net)
    with model_mode(net, mode):
        start = x
        if noise > 0:
            start = x + (keys.uniform(tuple(x.shape[1:]), x.device).to(x.dtype) * 2 - 1) * (noise * eps)
        start = start.clamp(0, 1).detach().requires_grad_(True)
        loss = attack_loss(net(start), guide, targeted=False, kind="plain").sum()
        (grad,) = torch.autograd.grad(loss, start)
        with torch.no_grad():
            x_adv = start - step * eps * grad.sign()
            x_adv = project(x, x_adv, eps) if project_to_ball else x_adv.clamp(0, 1)
    return x_adv.detach()
