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
CGAT = Stage("cgat", "cgat", "cgat", 2, "benign")
ATRDH = Stage("atrdh", "atrdh", "atrdh", 3, "benign")
PGD_AT = Stage("pgd_at", "pgd_at", "pgd_at", 4, "benign")
TRAINING = {s.name: s for s in (TRAIN, SAAT, CGAT, ATRDH, PGD_AT)}
DEFENCE_STAGES = {s.name: s for s in (SAAT, CGAT, ATRDH, PGD_AT)}  # adversarial training from the benign model


def model_folder(defence: str) -> str:
    """Folder of a defence's model in a run directory ('none': the benign model)."""
    return TRAIN.out if defence == "none" else DEFENCE_STAGES[defence].out


def evaluate_key(which: str) -> str:
    """Run key and metrics label of the evaluation of ``which``."""
    return f"evaluate_{which}"


def stage_key(stage: str, which: str | None) -> str:
    """Run key and metrics label of a stage ('evaluate' and 'robustness' per model folder)."""
    if which is None:
        return stage
    return evaluate_key(which) if stage == "evaluate" else f"{stage}_{which}"
