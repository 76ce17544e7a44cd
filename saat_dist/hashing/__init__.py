"""Benign deep-hashing losses (docs/method.md §2)."""

from saat_dist.hashing.losses import (
    LOSSES,
    CSQLoss,
    DPHLoss,
    DPNLoss,
    DPSHLoss,
    HashNetLoss,
    HSWDLoss,
    OrthoLoss,
    build_hash_loss,
)

__all__ = ["LOSSES", "CSQLoss", "DPHLoss", "DPNLoss", "DPSHLoss", "HSWDLoss", "HashNetLoss", "OrthoLoss",
           "build_hash_loss"]
