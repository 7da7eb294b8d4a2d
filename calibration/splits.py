"""Train / calibration / test splits by question id (a seeded hash): stable when questions are added, and every
state of one question lands in one split."""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["split_labels"]


def split_labels(ids, *, seed: int, train_fraction: float, calibration_fraction: float) -> np.ndarray:
    """``"train"`` / ``"calibration"`` / ``"test"`` per id from a seeded hash: stable under adding questions."""
    out = []
    for qid in ids:
        u = int(hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest()[:12], 16) / float(16**12)
        out.append("train" if u < train_fraction else "calibration" if u < train_fraction + calibration_fraction else "test")
    return np.asarray(out)
