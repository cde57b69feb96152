"""Counting primitives on two score vectors (members, non-members), shared by the metrics and the held-out limits
(their random splits draw from :func:`qmis_jax._random.numpy_rng`)."""

from __future__ import annotations

import numpy as np


def as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one score, got an empty array")
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name} contains NaN scores ({int(np.isnan(arr).sum())} of {arr.size})")
    return arr


def roc_counts(member: np.ndarray, nonmember: np.ndarray):
    """Counts of the rule "member iff score >= t" at every distinct threshold, from t = +inf down.

    Returns (thresholds, tp, fp) with thresholds[0] = +inf (nothing predicted member) and the last entry the
    smallest score (everything predicted member).
    """
    scores = np.concatenate([member, nonmember])
    labels = np.concatenate([np.ones(member.size, np.int64), np.zeros(nonmember.size, np.int64)])
    order = np.argsort(-scores, kind="mergesort")
    s = scores[order]
    lab = labels[order]
    tp = np.cumsum(lab)
    fp = np.cumsum(1 - lab)
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    thresholds = np.r_[np.inf, s[last]]
    return thresholds, np.r_[0, tp[last]], np.r_[0, fp[last]]


def best_threshold(member: np.ndarray, nonmember: np.ndarray) -> tuple[float, int, float]:
    """(threshold, direction, advantage) maximising |TPR - FPR|; direction -1 means "member iff score < t"."""
    thr, tp, fp = roc_counts(member, nonmember)
    diff = tp / member.size - fp / nonmember.size
    i = int(np.argmax(np.abs(diff)))
    direction = -1 if diff[i] < 0 else 1
    return float(thr[i]), direction, float(abs(diff[i]))


def rule_counts(member: np.ndarray, nonmember: np.ndarray, threshold: float, direction: int):
    """(true positives, false positives) of the rule given by (threshold, direction)."""
    if direction > 0:
        return int(np.sum(member >= threshold)), int(np.sum(nonmember >= threshold))
    return int(np.sum(member < threshold)), int(np.sum(nonmember < threshold))
