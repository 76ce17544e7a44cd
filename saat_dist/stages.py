"""The protocol's training stages as values: read by the pipeline, the Ray
driver and the workers alike, and handed to a Ray worker as they are (the
worker runs the value it is given, no name is looked up again)."""

from __future__ import annotations

from dataclasses import dataclass

from saat_dist.defences import DEFENCES, Defence


@dataclass(frozen=True)
class Stage:
    name: str  # run key and metrics label
    out: str  # folder under the run directory with model.pt and train.json
    section: str  # config section with epochs, batch_size, optim
    seed_offset: int  # added to cfg.seed for this stage's data order
    needs: str | None  # folder whose model.pt must exist first (None: nothing)
    defence: Defence | None = None  # the defence it trains (None: benign training)


TRAIN = Stage("train", "benign", "train", 0, None)
DEFENCE_STAGES = {d.name: Stage(d.name, d.name, d.name, d.seed_offset, "benign", d) for d in DEFENCES.values()}
SAAT = DEFENCE_STAGES["saat"]
TRAINING = {TRAIN.name: TRAIN, **DEFENCE_STAGES}


def model_folder(defence: str) -> str:
    """Folder of a defence's model in a run directory ('none': the benign model)."""
    return TRAIN.out if defence == "none" else DEFENCE_STAGES[defence].out
