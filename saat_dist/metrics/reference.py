"""Plain per-query NumPy mAP, as research hashing code computes it.

The yardstick for tests and the benchmark; ties ranked by index (stable sort).
"""

from __future__ import annotations

import numpy as np


def map_per_query_numpy(q_codes, db_codes, q_labels, db_labels, top_k: int) -> float:
    q_codes, db_codes = np.asarray(q_codes, np.float32), np.asarray(db_codes, np.float32)
    q_labels, db_labels = np.asarray(q_labels, np.float32), np.asarray(db_labels, np.float32)
    bits = q_codes.shape[1]
    total = 0.0
    for i in range(len(q_codes)):
        relevant = (db_labels @ q_labels[i] > 0).astype(np.float64)
        hamming = 0.5 * (bits - db_codes @ q_codes[i])
        order = np.argsort(hamming, kind="stable")
        top = relevant[order][:top_k]
        found = int(top.sum())
        if found == 0:
            continue
        ranks = np.flatnonzero(top) + 1.0
        total += float(np.mean(np.arange(1, found + 1) / ranks))
    return total / len(q_codes)
