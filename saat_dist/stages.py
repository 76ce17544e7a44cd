"""The protocol's stages as values: one record per stage, read by the
pipeline, the Ray driver and the workers alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # CLI / Ray run key
    out: str  # folder under the run directory with model.pt / train.json / eval.json
    section: str | None  # config section with epochs, batch_size, optim (None: evaluation)
    seed_offset: int  # added to cfg.seed for this stage's data order and attacks
    needs: str | None  # folder whose model.pt must exist first (None: nothing)


TRAIN = Stage("train", "benign", "train", 0, None)
SAAT = Stage("saat", "saat", "saat", 1, "benign")
TRAINING = {s.name: s for s in (TRAIN, SAAT)}


def evaluate_key(which: str) -> str:
    """Run key and metrics label of the evaluation of ``which``."""
    return f"evaluate_{which}"
