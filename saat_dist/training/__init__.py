"""Training steps: benign hashing and the defences (SAAT, CgAT, ATRDH, PGD-AT), as plain functions."""

from saat_dist.training.steps import (
    ATRDHSettings,
    PGDATSettings,
    SAATSettings,
    TorchStepper,
    atrdh_step,
    benign_step,
    cgat_step,
    pgd_at_step,
    saat_step,
)

__all__ = ["ATRDHSettings", "PGDATSettings", "SAATSettings", "TorchStepper", "atrdh_step", "benign_step",
           "cgat_step", "pgd_at_step", "saat_step"]
