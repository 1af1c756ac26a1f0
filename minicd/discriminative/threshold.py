"""The global decision threshold of Edin et al. (2023): tuned on validation for micro-F1."""

from __future__ import annotations

import numpy as np

GRID = np.linspace(0.0, 1.0, 101)  # candidate thresholds 0.00, 0.01, ..., 1.00


def micro_f1_at(probs: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """Micro F1 = TP / (TP + 0.5 (FP + FN)) of ``probs >= threshold``; 0 when the denominator is 0.

    ``probs``, ``targets``: [N, L] (targets 0/1)."""
    pred = probs >= threshold                                   # [N, L]
    gold = targets.astype(bool)
    tp = float(np.sum(pred & gold))
    fp = float(np.sum(pred & ~gold))
    fn = float(np.sum(~pred & gold))
    denom = tp + 0.5 * (fp + fn)
    return tp / denom if denom > 0 else 0.0


def tune_threshold(probs, targets) -> float:
    """The threshold of ``numpy.linspace(0, 1, 101)`` with the best micro-F1 (the lowest on ties).

    A code is predicted when its probability is >= the threshold. ``probs`` [N, L] in [0, 1],
    ``targets`` [N, L] 0/1 (numpy arrays or torch tensors)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"tune_threshold: probs {p.shape} and targets {y.shape} must both be [N, L]")
    scores = [micro_f1_at(p, y, float(t)) for t in GRID]
    return float(GRID[int(np.argmax(scores))])  # argmax returns the first (lowest) best
