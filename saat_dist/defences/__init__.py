"""The defences: each an adversarial-training mode of the one trainer, each
one file of this package with its config section, its step function and a
module-level ``DEFENCE`` entry (``defences.base.Defence``). ``DEFENCES`` is
the registry, found by scanning the package (ordered by each entry's
``order``): a new defence is a new file here plus its section in
``RunConfig``."""

import importlib
import pkgutil

from saat_dist.defences.base import AdvTrainConfig, Defence, ExtrasContext, StepContext


def _discover() -> dict[str, Defence]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            entry = getattr(importlib.import_module(f"{__name__}.{info.name}"), "DEFENCE", None)
            if isinstance(entry, Defence):
                found.append(entry)
    offsets = [d.seed_offset for d in found]
    if len(set(offsets)) != len(offsets) or 0 in offsets:  # 0 is the benign stage's
        raise ValueError(f"saat_dist.defences: seed offsets must be distinct and non-zero, got "
                         f"{ {d.name: d.seed_offset for d in found} }")
    return {d.name: d for d in sorted(found, key=lambda d: d.order)}


DEFENCES: dict[str, Defence] = _discover()

__all__ = ["DEFENCES", "AdvTrainConfig", "Defence", "ExtrasContext", "StepContext"]
