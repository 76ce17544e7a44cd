"""Adversarial attacks on hash models (SAAT.md §4)."""

from saat_dist.attacks.mainstay_pgd import ALPHA_SCHEDULE, attack_loss, pgd_attack
from saat_dist.attacks.perceptibility import perceptibility
from saat_dist.attacks.targets import choose_targets

__all__ = ["ALPHA_SCHEDULE", "attack_loss", "choose_targets", "perceptibility", "pgd_attack"]
