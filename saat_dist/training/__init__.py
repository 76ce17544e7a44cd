"""Training: the benign step and the stepper (``training.steps``), the
optimizers (``training.optim``), and the one training loop
(``training.trainer``). The defences' steps live in ``saat_dist.defences``;
their names are re-exported here for library users (imported on first use:
the defences build on this package's steps)."""

import importlib

from saat_dist.training.steps import TorchStepper, benign_step

_FROM_DEFENCES = {
    "ATRDHConfig": "atrdh", "ATRDHSettings": "atrdh", "atrdh_step": "atrdh", "pairwise_to_bank": "atrdh",
    "CgATConfig": "cgat", "cgat_step": "cgat",
    "PGDATConfig": "pgd_at", "PGDATSettings": "pgd_at", "pgd_at_step": "pgd_at",
    "SAATConfig": "saat", "SAATSettings": "saat", "saat_step": "saat",
}


def __getattr__(name: str):
    if name in _FROM_DEFENCES:
        return getattr(importlib.import_module(f"saat_dist.defences.{_FROM_DEFENCES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TorchStepper", "benign_step", *_FROM_DEFENCES]
