"""Benign deep-hashing losses (SAAT.md §2)."""

from saat_dist.hashing.losses import LOSSES, CSQLoss, DPHLoss, DPSHLoss, HashNetLoss, build_hash_loss

__all__ = ["LOSSES", "CSQLoss", "DPHLoss", "DPSHLoss", "HashNetLoss", "build_hash_loss"]
