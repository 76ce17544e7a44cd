"""Checks that the numbers of an evaluation can be trusted, run on every
evaluation and written into its results as true (triggered: a warning in the
log and a section in the reports), false (passed) or null (not run, with the
reason):

- ``zero_perturbation``: an attack returned some query where it started (the
  query itself, or its own random start), with eps > 0;
- ``nonfinite_codes``: a clean or adversarial output was NaN or infinite,
  looked at before the tanh (``model.logits`` when the model has it), which
  would turn an infinite logit into a plausible +-1;
- ``zero_input_gradient``: the mainstay loss has an all-zero (or non-finite)
  input gradient at some clean query: gradient masking or a dead model;
- ``blackbox_beats_whitebox``: the gradient-free attack got a lower mAP than
  every white-box untargeted attack (by more than
  ``experiment.checks.blackbox_margin``): gradients are not guiding the
  white-box attacks;
- ``map_not_falling_with_eps``: over ``experiment.eps_sweep`` (the mainstay
  attack, one run of ``attack.iters`` at every budget), while mAP is still
  more than ``experiment.checks.floor_margin`` above both the theory bound
  and the random-code floor, a larger budget raised mAP, or lowered it by
  less than ``experiment.checks.min_drop`` after an earlier step lowered it
  by more, or the whole sweep lowered it by less: a curve that stops falling
  before it has anywhere left to fall is the usual sign of masked gradients
  (a robust model's curve starts flat and falls faster as eps grows).
"""

from __future__ import annotations

import torch

from saat_dist.attacks import Attack
from saat_dist.config import RunConfig

CHECKS = ("zero_perturbation", "nonfinite_codes", "zero_input_gradient", "blackbox_beats_whitebox",
          "map_not_falling_with_eps")


def run_checks(cfg: RunConfig, attacks: list[Attack], res: dict, finite: dict, unmoved: dict,
               zero_grad: torch.Tensor) -> tuple[dict, dict]:
    """Each check: True (triggered), False (passed) or None (not run); and
    a detail per check ('none' when it passed, 'not run: <why>' when not run)."""
    details = {
        "zero_perturbation": _zero_perturbation(cfg, attacks, unmoved),
        "nonfinite_codes": _nonfinite(finite),
        "zero_input_gradient": (f"{int(zero_grad.sum())} of {len(zero_grad)} queries have an all-zero or "
                                "non-finite input gradient of the mainstay loss" if int(zero_grad.sum()) else "none"),
        "blackbox_beats_whitebox": _blackbox(cfg, attacks, res),
        "map_not_falling_with_eps": _plateau(cfg, res.get("eps_sweep")),
    }
    checks = {name: None if details[name].startswith("not run") else details[name] != "none" for name in CHECKS}
    return checks, details


def _zero_perturbation(cfg: RunConfig, attacks: list[Attack], unmoved: dict) -> str:
    if not any(a.budget(cfg.attack)[0] > 0 for a in attacks):
        return "not run: no attack with a budget above 0"
    zeros = {name: int(z.sum()) for name, z in unmoved.items() if int(z.sum())}
    return f"queries returned where the attack started (the query or its own random start): {zeros}" if zeros else "none"


def _nonfinite(finite: dict) -> str:
    bad = {name: int((~f).sum()) for name, f in finite.items() if int((~f).sum())}
    return f"queries with non-finite outputs (before the tanh): {bad}" if bad else "none"


def _blackbox(cfg: RunConfig, attacks: list[Attack], res: dict) -> str:
    white = {a.name: res["attacks"][a.name]["map"] for a in attacks if a.kind == "untargeted" and a.whitebox}
    black = {a.name: res["attacks"][a.name]["map"] for a in attacks if not a.whitebox}
    if not black:
        return "not run: no black-box attack in the evaluation"
    if not white:
        return "not run: no white-box untargeted attack in the evaluation"
    beats = {b: v for b, v in black.items() if v < min(white.values()) - cfg.experiment.checks.blackbox_margin}
    return f"{beats} below every white-box untargeted attack (best {min(white.values()):.4f})" if beats else "none"


def _plateau(cfg: RunConfig, sweep: dict | None) -> str:
    """Steps of the sweep where mAP stops falling while it is still above
    both floors (theory bound and random codes) by more than
    ``checks.floor_margin``: a step to a larger budget that raises mAP, a
    step that lowers it by less than ``checks.min_drop`` after an earlier
    step lowered it by more (the curve flattened after it began to fall), or
    a whole sweep that lowers it by less than ``checks.min_drop``. A robust
    model is flat at small budgets and falls faster as the budget grows
    (measured: SAAT 0.7752, 0.7703, 0.7655, 0.7493, 0.6797 at 0, 2, 4, 8,
    16/255); masking flattens the curve after it falls, or everywhere."""
    c = cfg.experiment.checks
    if sweep is None:
        return "not run: this evaluation runs no eps sweep"
    eps, maps = sweep["eps"], sweep["map"]
    if len(eps) < 2:
        return "not run: experiment.eps_sweep has fewer than two budgets"
    floor = max(sweep["theory_map"], sweep["random_map"]) + c.floor_margin
    whole_flat = maps[0] - maps[-1] < c.min_drop
    flat, fell = [], False
    for e0, e1, m0, m1 in zip(eps, eps[1:], maps, maps[1:]):
        if m0 > floor and (m1 > m0 or (m0 - m1 < c.min_drop and (fell or whole_flat))):
            flat.append((e0, e1, m0, m1))
        fell = fell or m0 - m1 >= c.min_drop
    return ("; ".join(f"eps {e0 * 255:.1f}/255 -> {e1 * 255:.1f}/255: mAP {m0:.4f} -> {m1:.4f} "
                      f"({'rises' if m1 > m0 else f'falls by less than {c.min_drop}'} while above {floor:.4f})"
                      for e0, e1, m0, m1 in flat)
            if flat else "none")