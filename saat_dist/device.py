"""The one place where the compute device is chosen."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Place:
    """Where a process works: its device, and its rank of ``world`` processes
    (rank 0 of 1 in-process)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to run on.

    ``auto`` takes the first CUDA device when one is visible, else the CPU;
    ``cpu`` and ``cuda`` force a choice (``cuda`` fails loudly without a GPU).
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is visible")
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"device: {preference!r} is not one of 'auto', 'cpu', 'cuda'")
    return torch.device(preference)
