"""The mainstay-code attack: PGD in pixel space against a guide code.

Untargeted: push F(x + delta) away from b*(y) (minimise mean(F * b*)).
Targeted: pull F(x + delta) toward b*(y_t) (minimise -mean(F * b*(y_t))).
PGD: uniform random start in [-eps, eps], signed-gradient steps, projection
onto the eps-ball and [0, 1]; the model's tanh temperature alpha follows a
schedule over the iterations (10 equal phases). ``restarts`` > 1 runs
independent random starts and keeps, per example, the strongest one.

Random starts come from ``keys`` (``saat_dist.keyed_random.ItemKeys``: each
example's start depends only on the stream and its own global index, so a
result does not depend on the batch or the worker it ran in; restart r uses
``keys.child("restart", r)``) or, without keys, from ``generator`` (then the
start of an example depends on its place in the batch).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.keyed_random import ItemKeys
from saat_dist.models.adapter import as_hash_model

ALPHA_SCHEDULE = (0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def attack_loss(codes_BK: torch.Tensor, guide_BK: torch.Tensor, targeted: bool, kind: str = "plain") -> torch.Tensor:
    """Per-example loss (B,) that the attack minimises.

    ``plain``: mean(F * b) (negated when targeted). ``sharp`` (the reference
    generators' loss): with s = F * b, untargeted keeps the bits with
    s > -0.5 and minimises sum(w (s + 2) s) / sum(w); targeted keeps bits
    with s < 0.5 and maximises the same form.
    """
    s = codes_BK * guide_BK
    if kind == "plain":
        out = s.mean(1)
        return -out if targeted else out
    if kind != "sharp":
        raise ValueError(f"attack loss {kind!r} is not one of ['plain', 'sharp']")
    w = (s < 0.5).float() if targeted else (s > -0.5).float()
    form = (w * (s + 2) * s).sum(1) / w.sum(1).clamp_min(1)
    return -form if targeted else form


def alpha_at(it: int, iters: int, schedule: tuple[float, ...] | None) -> float | None:
    if not schedule:
        return None
    return schedule[min(len(schedule) - 1, it * len(schedule) // iters)]


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str = "eval"):
    """The model in ``mode`` for the duration, then as it was. ``eval``: as at
    test time (BatchNorm running statistics, no dropout). ``train``: as the
    reference code attacks during adversarial training (batch statistics,
    dropout on; the attack's forward passes also update BatchNorm's running
    statistics)."""
    if mode not in ("eval", "train"):
        raise ValueError(f"model mode {mode!r} is not one of ['eval', 'train']")
    was = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was)


def eval_mode(model: nn.Module):
    """Attacks see the model as at test time (BatchNorm running stats)."""
    return model_mode(model, "eval")


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    """x_adv moved into the eps-ball around x (L-inf) and into [0, 1]."""
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)


def random_start_delta(x: torch.Tensor, eps: float, keys: ItemKeys | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform start in [-eps, eps] per pixel: keyed by item when ``keys`` is given."""
    if keys is not None:
        return (keys.uniform(tuple(x.shape[1:]), x.device).to(x.dtype) * 2 - 1) * eps
    return torch.empty_like(x).uniform_(-eps, eps, generator=generator)


def start_point(x: torch.Tensor, eps: float, random_start: bool, keys: ItemKeys | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Where PGD starts: x, or x plus a random start, clipped to [0, 1]."""
    if not random_start:
        return x.detach().clone()
    return (x + random_start_delta(x, eps, keys, generator)).clamp(0, 1).detach()


def pgd(model, x, objective, *, eps: float, step_size: float, iters: int, random_start: bool = True,
        alpha_schedule: tuple[float, ...] | None = None, generator: torch.Generator | None = None,
        keys: ItemKeys | None = None) -> torch.Tensor:
    """Signed-gradient descent on ``objective(codes_BK) -> (B,)`` (one value per
    example) over x + delta, ||delta||_inf <= eps, values in [0, 1]; uniform
    random start in [-eps, eps] when ``random_start`` (keyed by item with
    ``keys``). The model is called as is (set its mode outside); a plain
    logits module goes through ``as_hash_model``."""
    model = as_hash_model(model)
    delta = (start_point(x, eps, random_start, keys, generator) - x).requires_grad_(True)
    for it in range(iters):
        codes = model(x + delta, alpha=alpha_at(it, iters, alpha_schedule))
        obj = objective(codes).sum()  # per-example gradients stay independent
        (grad,) = torch.autograd.grad(obj, delta)
        with torch.no_grad():
            delta -= step_size * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()


def pgd_attack(
    model: nn.Module,
    x_BCHW: torch.Tensor,
    guide_BK: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    iters: int,
    targeted: bool = False,
    random_start: bool = True,
    alpha_schedule: tuple[float, ...] | None = ALPHA_SCHEDULE,
    loss: str = "sharp",
    restarts: int = 1,
    generator: torch.Generator | None = None,
    mode: str = "eval",
    keys: ItemKeys | None = None,
) -> torch.Tensor:
    """Adversarial images x + delta with ||delta||_inf <= eps and values in [0, 1].

    ``guide_BK`` is b*(y) (untargeted) or b*(y_t) (targeted). With restarts,
    the kept run per example is the one with the lowest plain attack loss at
    alpha = 1. Only the input gets gradients; model parameters are untouched.
    ``mode``: the model's mode during the attack (``model_mode``). ``keys``:
    random starts keyed by item (see the module docstring).
    """
    return pgd_restarts(model, x_BCHW, guide_BK, eps=eps, step_size=step_size, iters=iters, targeted=targeted,
                        random_start=random_start, alpha_schedule=alpha_schedule, loss=loss, restarts=restarts,
                        generator=generator, mode=mode, keys=keys)[0]


def pgd_restarts(model: nn.Module, x_BCHW: torch.Tensor, guide_BK: torch.Tensor, *, eps: float, step_size: float,
                 iters: int, targeted: bool = False, random_start: bool = True,
                 alpha_schedule: tuple[float, ...] | None = ALPHA_SCHEDULE, loss: str = "sharp", restarts: int = 1,
                 generator: torch.Generator | None = None, mode: str = "eval", keys: ItemKeys | None = None,
                 keep_first: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``pgd_attack``'s work: (the strongest run per example, the first run)
    (the first only with ``keep_first``, else None). The first run is a
    one-restart attack on its own: with ``keys`` it equals
    ``pgd_attack(..., restarts=1, keys=keys)``."""
    if iters < 1 or eps < 0 or step_size <= 0:
        raise ValueError("pgd_attack: need iters >= 1, eps >= 0, step_size > 0")
    model = as_hash_model(model)
    guide = guide_BK.to(x_BCHW.device, x_BCHW.dtype)

    def objective(codes):
        return attack_loss(codes, guide, targeted, loss)

    best, best_score, first = None, None, None
    with model_mode(model, mode):
        for r in range(max(1, restarts)):
            x_adv = pgd(model, x_BCHW, objective, eps=eps, step_size=step_size, iters=iters,
                        random_start=random_start, alpha_schedule=alpha_schedule, generator=generator,
                        keys=None if keys is None else keys.child("restart", r))
            if r == 0 and keep_first:
                first = x_adv.clone()
            if restarts <= 1:
                return x_adv, first
            with torch.no_grad():
                score = attack_loss(model(x_adv, alpha=1.0), guide, targeted, "plain")
            if best is None:
                best, best_score = x_adv, score
            else:
                better = score < best_score
                best[better], best_score[better] = x_adv[better], score[better]
    return best, first


def pgd_starts(x_BCHW: torch.Tensor, eps: float, restarts: int, keys: ItemKeys, random_start: bool = True
               ) -> list[torch.Tensor]:
    """The starting points of every restart of a keyed PGD attack (for the
    check that an attack moved its examples away from where it started)."""
    return [start_point(x_BCHW, eps, random_start, keys.child("restart", r)) for r in range(max(1, restarts))]


# ---------------------------------------------------------------- registry entries
def _mainstay(ctx: AttackContext, x, labels, index) -> AttackOutput:
    a = ctx.settings
    keys = ctx.keys(index, "mainstay")
    best, first = pgd_restarts(ctx.model, x, ctx.guide_of(labels).to(ctx.device), eps=a.eps, step_size=a.step_size,
                               iters=a.iters, loss=a.loss, restarts=a.restarts, keys=keys, keep_first=True)
    return AttackOutput(best, [x, *pgd_starts(x, a.eps, a.restarts, keys)], first)


def _mainstay_targeted(ctx: AttackContext, x, targets, index) -> AttackOutput:
    a = ctx.settings
    keys = ctx.keys(index, "mainstay_targeted")
    adv = pgd_restarts(ctx.model, x, ctx.guide_of(targets).to(ctx.device), eps=a.eps, step_size=a.step_size,
                       iters=a.iters, targeted=True, loss=a.loss, keys=keys)[0]
    return AttackOutput(adv, [x, *pgd_starts(x, a.eps, 1, keys)])


def _mainstay_strong(ctx: AttackContext, x, labels, index) -> AttackOutput:
    """The strong check: strong_factor x iters, strong_restarts random starts,
    the strongest per query (on the first ``attack.strong_queries`` queries)."""
    a = ctx.settings
    keys = ctx.keys(index, "mainstay_strong")
    adv = pgd_restarts(ctx.model, x, ctx.guide_of(labels).to(ctx.device), eps=a.eps, step_size=a.step_size,
                       iters=a.iters * a.strong_factor, loss=a.loss, restarts=a.strong_restarts, keys=keys)[0]
    return AttackOutput(adv, [x, *pgd_starts(x, a.eps, a.strong_restarts, keys)])


ATTACKS = (
    Attack("mainstay", "mainstay (ours)", "untargeted", lambda a: (a.eps, a.iters, a.restarts), _mainstay, order=0),
    Attack("mainstay_strong", "mainstay, strong check", "untargeted",
           lambda a: (a.eps, a.iters * a.strong_factor, a.strong_restarts), _mainstay_strong, order=5,
           queries=lambda a, n: min(a.strong_queries or n, n), default=False),
    Attack("mainstay_targeted", "mainstay, targeted (ours)", "targeted", lambda a: (a.eps, a.iters, 1),
           _mainstay_targeted, order=90),
)
