"""Adversarial attacks on hash models (docs/method.md §4), all in pixel space
(||delta||_inf <= eps, values in [0, 1]) and batched on any device.

Mainstay-code PGD (untargeted/targeted) and the baselines: HAG, SDHA
(untargeted), DHTA, P2P, THA (targeted; ``anchor_codes`` and the
PrototypeNet), the black-box ``square_attack``, and the transfer generators
BIM, DI-, NI-, SI-NI- and VMI-FGSM on the mainstay loss. Each file also
declares its config section and its entries of the evaluation suite
(``ATTACKS``); ``ATTACK_REGISTRY`` holds them all, in report order.
"""

import importlib
import pkgutil

from saat_dist.attacks.anchor import anchor_codes, target_code_attack
from saat_dist.attacks.base import Attack, AttackContext, AttackOutput
from saat_dist.attacks.hag import hag_attack, hag_loss
from saat_dist.attacks.mainstay_pgd import ALPHA_SCHEDULE, attack_loss, model_mode, pgd, pgd_attack
from saat_dist.attacks.perceptibility import perceptibility
from saat_dist.attacks.prototype import PrototypeNet, PrototypeTrainer, prototype_loss
from saat_dist.attacks.sdha import sdha_attack, sdha_surrogate
from saat_dist.attacks.square import square_attack
from saat_dist.attacks.targets import choose_targets
from saat_dist.attacks.transfer import GENERATORS, transfer_attack, transfer_codes


def _discover() -> dict[str, Attack]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        found += getattr(importlib.import_module(f"{__name__}.{info.name}"), "ATTACKS", ())
    return {a.name: a for a in sorted(found, key=lambda a: a.order)}


ATTACK_REGISTRY: dict[str, Attack] = _discover()

__all__ = ["ALPHA_SCHEDULE", "ATTACK_REGISTRY", "GENERATORS", "Attack", "AttackContext", "AttackOutput",
           "PrototypeNet", "PrototypeTrainer", "anchor_codes", "attack_loss", "choose_targets", "hag_attack",
           "hag_loss", "model_mode", "perceptibility", "pgd", "pgd_attack", "prototype_loss", "sdha_attack",
           "sdha_surrogate", "square_attack", "target_code_attack", "transfer_attack", "transfer_codes"]
