"""Target labels for the targeted attack."""

from __future__ import annotations

import torch


def choose_targets(query_labels: torch.Tensor, db_label_sets: torch.Tensor, generator: torch.Generator | None = None):
    """For each query, a label set present in the database sharing no label with it.

    Returns ``(target_labels B x C, valid B)``; ``valid`` is False for a query
    that overlaps every database label set (its target row is all zero).
    """
    q = query_labels.float().cpu()
    sets = db_label_sets.float().cpu()
    sets = sets[sets.sum(1) > 0]
    disjoint = (q @ sets.T) == 0  # B x L
    valid = disjoint.any(1)
    # Uniform choice among the disjoint sets: random scores, masked argmax.
    scores = torch.rand(disjoint.shape, generator=generator)
    scores[~disjoint] = -1
    pick = scores.argmax(1)
    targets = sets[pick]
    targets[~valid] = 0
    return targets.to(query_labels.device), valid.to(query_labels.device)
