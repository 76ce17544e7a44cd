"""Training steps: benign hashing and SAAT, as plain functions."""

from saat_dist.training.steps import SAATSettings, TorchStepper, benign_step, saat_step

__all__ = ["SAATSettings", "TorchStepper", "benign_step", "saat_step"]
