"""Retrieval metrics: mAP@k, t-mAP, precision-recall curve, precision@N."""

from saat_dist.metrics.retrieval import (
    average_precision,
    mean_average_precision,
    precision_at_n,
    precision_recall_curve,
    precision_recall_reference,
    rank_database,
)

__all__ = [
    "average_precision",
    "mean_average_precision",
    "precision_at_n",
    "precision_recall_curve",
    "precision_recall_reference",
    "rank_database",
]
