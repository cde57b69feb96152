"""Metrics of a membership-inference attack from its scores: advantage, intervals, AUC, ROC.

An attack outputs one real score per (release, candidate point); a higher score means "more likely a member".
Everything here works on the two pooled score vectors (members, non-members) with NumPy/SciPy in float64: these
are post-processing steps on at most a few million numbers, not the batched core of the package.

The advantage of an attack is ``max_t |TPR(t) - FPR(t)|`` over thresholds (theory.md section 7). By section 1, a
section-1 attack's advantage lower-bounds ``Delta`` and ``1 - advantage`` upper-bounds the MIS, but only through an
interval that is honest about how the threshold was chosen; see :func:`attack_metrics`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as _sps

__all__ = ["AttackMetrics", "attack_metrics", "clopper_pearson", "roc_curve"]


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got level={level!r}")
    return level


def clopper_pearson(k, n, level: float = 0.95) -> tuple[Any, Any]:
    """Exact (Clopper-Pearson) two-sided confidence interval for a binomial proportion.

    With ``alpha = 1 - level``, the interval for ``k`` successes out of ``n`` is
    ``[Beta_{alpha/2}(k, n - k + 1), Beta_{1 - alpha/2}(k + 1, n - k)]`` (Beta quantiles), with the lower end 0 when
    ``k = 0`` and the upper end 1 when ``k = n``. It covers the true proportion with probability at least
    ``level`` (used for TPR and FPR, theory.md section 7). Same as statsmodels'
    ``proportion_confint(k, n, alpha, method="beta")``.

    Args:
      k: number of successes, an int or integer array (any shape), ``0 <= k <= n``.
      n: number of trials, an int or integer array broadcastable with ``k``, ``n >= 1``.
      level: confidence level in (0, 1).

    Returns:
      ``(lo, hi)``: floats (scalar inputs) or float64 arrays of the broadcast shape.

    >>> lo, hi = clopper_pearson(0, 10, 0.95)
    >>> float(lo), round(float(hi), 4)
    (0.0, 0.3085)
    """
    level = _check_level(level)
    k_arr = np.asarray(k)
    n_arr = np.asarray(n)
    for name, arr in (("k", k_arr), ("n", n_arr)):
        if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must hold integers, got {name}={arr!r}")
    k_arr, n_arr = np.broadcast_arrays(k_arr.astype(np.int64), n_arr.astype(np.int64))
    if np.any(n_arr < 1):
        raise ValueError(f"n must be >= 1, got n={n!r}")
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError(f"k must satisfy 0 <= k <= n, got k={k!r}, n={n!r}")
    alpha = 1.0 - level
    kf = k_arr.astype(np.float64)
    nf = n_arr.astype(np.float64)
    lo = np.where(k_arr == 0, 0.0, _sps.beta.ppf(alpha / 2, np.maximum(kf, 1.0), nf - kf + 1.0))
    hi = np.where(k_arr == n_arr, 1.0, _sps.beta.ppf(1 - alpha / 2, kf + 1.0, np.maximum(nf - kf, 1.0)))
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def _as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one score, got an empty array")
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name} contains NaN scores ({int(np.isnan(arr).sum())} of {arr.size})")
    return arr


def _roc_counts(member: np.ndarray, nonmember: np.ndarray):
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


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full empirical ROC curve of the rule "member iff score >= t" over all distinct thresholds.

    Args:
      member_scores: scores of members, any shape (flattened).
      nonmember_scores: scores of non-members, any shape (flattened).

    Returns:
      ``(fpr, tpr, thresholds)`` float64 arrays, from ``(0, 0)`` at ``t = +inf`` to ``(1, 1)``; ties in the scores
      share one point (same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).
    """
    m = _as_scores(member_scores, "member_scores")
    nm = _as_scores(nonmember_scores, "nonmember_scores")
    thr, tp, fp = _roc_counts(m, nm)
    return fp / nm.size, tp / m.size, thr


def _best_threshold(member: np.ndarray, nonmember: np.ndarray) -> tuple[float, int, float]:
    """(threshold, direction, advantage) maximising |TPR - FPR|; direction -1 means "member iff score < t"."""
    thr, tp, fp = _roc_counts(member, nonmember)
    diff = tp / member.size - fp / nonmember.size
    i = int(np.argmax(np.abs(diff)))
    direction = -1 if diff[i] < 0 else 1
    return float(thr[i]), direction, float(abs(diff[i]))


def _rule_counts(member: np.ndarray, nonmember: np.ndarray, threshold: float, direction: int):
    """(true positives, false positives) of the rule given by (threshold, direction)."""
    if direction > 0:
        return int(np.sum(member >= threshold)), int(np.sum(nonmember >= threshold))
    return int(np.sum(member < threshold)), int(np.sum(nonmember < threshold))


def _advantage_interval(tp: int, n_m: int, fp: int, n_n: int, level: float) -> tuple[float, float]:
    """Conservative interval for TPR - FPR from Bonferroni-combined Clopper-Pearson intervals."""
    joint = 1.0 - (1.0 - level) / 2.0
    tpr_lo, tpr_hi = clopper_pearson(tp, n_m, joint)
    fpr_lo, fpr_hi = clopper_pearson(fp, n_n, joint)
    return max(0.0, tpr_lo - fpr_hi), tpr_hi - fpr_lo


def _tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, alpha: float) -> float:
    ok = fpr <= alpha + 1e-12
    return float(np.max(tpr[ok]))


def _downsample(fpr: np.ndarray, tpr: np.ndarray, n_nonmembers: int, max_points: int):
    m = fpr.size
    if m <= max_points:
        return fpr, tpr
    n_log = max_points // 4
    n_lin = max_points - n_log
    lin = np.round(np.linspace(0, m - 1, n_lin)).astype(np.int64)
    grid = np.geomspace(1.0 / n_nonmembers, 1.0, n_log)
    logi = np.searchsorted(fpr, grid, side="right") - 1
    idx = np.unique(np.r_[lin, np.clip(logi, 0, m - 1)])
    return fpr[idx], tpr[idx]


@jax.jit
def _seed_words(key):
    return jax.random.bits(key, (4,), dtype=jnp.uint32)


def _numpy_rng(key) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (or an int seed; ``None`` = 0), for host-side permutations."""
    if key is None:
        key = 0
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key) or jnp.asarray(key).dtype == jnp.uint32:
        return np.random.default_rng(np.asarray(_seed_words(key)).tolist())
    raise ValueError(f"key must be a JAX PRNG key, an int seed or None, got key={key!r}")


class AttackMetrics(NamedTuple):
    """Metrics of one attack (theory.md section 7); higher score = "more likely a member".

    Attributes:
      advantage: ``max_t |TPR(t) - FPR(t)|`` over all thresholds, chosen on the same data (optimistic).
      advantage_ci: ``(lo, hi)`` at the chosen threshold: Clopper-Pearson intervals on TPR and FPR, each at level
        ``1 - (1 - level) / 2`` (Bonferroni), combined as ``[max(0, tpr_lo - fpr_hi), tpr_hi - fpr_lo]``. The
        threshold was selected on the same scores, so this interval inherits the selection's optimism.
      advantage_heldout: the threshold and direction are chosen on a random half of the members and of the
        non-members; this is ``TPR - FPR`` of that fixed rule on the other halves (unbiased for the rule's true
        advantage; may be negative by chance).
      advantage_heldout_ci: the same Bonferroni-combined Clopper-Pearson interval on the evaluation halves; it is
        exact for a rule fixed in advance, so its lower end is a valid lower confidence bound on ``Delta`` (for a
        section-1 game) and ``1 - lo`` an upper bound on the MIS. Use this one for "bounds" statements.
      auc: area under the ROC curve, the Mann-Whitney statistic ``P(S_m > S_n) + P(S_m = S_n) / 2``.
      tpr_at_1pct_fpr: largest TPR among thresholds with FPR <= 1% (rule "member iff score >= t").
      tpr_at_01pct_fpr: the same at FPR <= 0.1%.
      roc: ``(fpr, tpr)`` float64 arrays, downsampled to at most ``max_roc_points`` points for plots, end points kept.
      threshold: the in-sample maximising threshold ``t``.
      direction: +1 for the rule "member iff score >= t", -1 for "member iff score < t".
      heldout_threshold: the threshold chosen on the selection half (the held-out rule).
      heldout_direction: its direction.
      n_members: number of member scores.
      n_nonmembers: number of non-member scores.
      level: confidence level of the intervals.
    """

    advantage: float
    advantage_ci: tuple[float, float]
    advantage_heldout: float
    advantage_heldout_ci: tuple[float, float]
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    roc: tuple[np.ndarray, np.ndarray]
    threshold: float
    direction: int
    heldout_threshold: float
    heldout_direction: int
    n_members: int
    n_nonmembers: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: floats, ints and lists (infinite thresholds become ``None``)."""

        def finite(v):
            return float(v) if np.isfinite(v) else None

        return {
            "advantage": float(self.advantage),
            "advantage_ci": [float(v) for v in self.advantage_ci],
            "advantage_heldout": float(self.advantage_heldout),
            "advantage_heldout_ci": [float(v) for v in self.advantage_heldout_ci],
            "auc": float(self.auc),
            "tpr_at_1pct_fpr": float(self.tpr_at_1pct_fpr),
            "tpr_at_01pct_fpr": float(self.tpr_at_01pct_fpr),
            "roc": {"fpr": [float(v) for v in self.roc[0]], "tpr": [float(v) for v in self.roc[1]]},
            "threshold": finite(self.threshold),
            "direction": int(self.direction),
            "heldout_threshold": finite(self.heldout_threshold),
            "heldout_direction": int(self.heldout_direction),
            "n_members": int(self.n_members),
            "n_nonmembers": int(self.n_nonmembers),
            "level": float(self.level),
        }


def attack_metrics(
    member_scores,
    nonmember_scores,
    *,
    level: float = 0.95,
    key=None,
    max_roc_points: int = 200,
) -> AttackMetrics:
    """Advantage with intervals, AUC, low-FPR TPRs and the ROC of one attack (theory.md section 7).

    Advantage ``= max_t |TPR(t) - FPR(t)|`` where ``TPR(t)`` (``FPR(t)``) is the fraction of member (non-member)
    scores ``>= t``; the absolute value lets the attack flip its rule (the game is symmetric, section 1). For a
    section-1 game every fixed rule's advantage is at most ``Delta``; the in-sample maximum over ``t`` is biased
    upwards by the selection, by ``O(1/sqrt(n))``. The held-out version removes that bias: choose ``t`` and the
    direction on a random half, evaluate on the other half.

    Args:
      member_scores: scores of member (candidate, release) pairs, any shape, flattened; e.g. ``(R, n)`` pooled
        over replicates.
      nonmember_scores: scores of non-member pairs, any shape, flattened.
      level: confidence level of the intervals.
      key: JAX PRNG key (or int seed) for the held-out split; ``None`` uses a fixed key (reproducible).
      max_roc_points: at most this many ROC points are kept in ``roc``.

    Returns:
      :class:`AttackMetrics`.

    >>> m = attack_metrics([3.0, 2.0, 1.5], [1.0, 0.0, 2.5])
    >>> round(m.advantage, 4), round(m.auc, 4)
    (0.6667, 0.7778)
    """
    level = _check_level(level)
    if int(max_roc_points) < 2:
        raise ValueError(f"max_roc_points must be >= 2, got max_roc_points={max_roc_points!r}")
    m = _as_scores(member_scores, "member_scores")
    nm = _as_scores(nonmember_scores, "nonmember_scores")
    if m.size < 2 or nm.size < 2:
        raise ValueError(
            f"need at least 2 member and 2 non-member scores for the held-out split, got "
            f"{m.size} members and {nm.size} non-members"
        )
    n_m, n_n = m.size, nm.size

    thr, tp, fp = _roc_counts(m, nm)
    tpr, fpr = tp / n_m, fp / n_n
    diff = tpr - fpr
    i = int(np.argmax(np.abs(diff)))
    direction = -1 if diff[i] < 0 else 1
    advantage = float(abs(diff[i]))
    k_m, k_n = (int(tp[i]), int(fp[i])) if direction > 0 else (n_m - int(tp[i]), n_n - int(fp[i]))
    ci = _advantage_interval(k_m, n_m, k_n, n_n, level)

    # AUC: Mann-Whitney U with average ranks for ties.
    ranks = _sps.rankdata(np.concatenate([m, nm]))
    auc = float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0) / (n_m * n_n))

    # Held-out: choose the rule on one half of each class, evaluate on the other half.
    rng = _numpy_rng(key)
    pm = rng.permutation(n_m)
    pn = rng.permutation(n_n)
    sel_m, ev_m = m[pm[: n_m // 2]], m[pm[n_m // 2 :]]
    sel_n, ev_n = nm[pn[: n_n // 2]], nm[pn[n_n // 2 :]]
    t_sel, d_sel, _ = _best_threshold(sel_m, sel_n)
    h_m, h_n = _rule_counts(ev_m, ev_n, t_sel, d_sel)
    adv_ho = h_m / ev_m.size - h_n / ev_n.size
    ci_ho = _advantage_interval(h_m, ev_m.size, h_n, ev_n.size, level)

    roc = _downsample(fpr, tpr, n_n, int(max_roc_points))
    return AttackMetrics(
        advantage=advantage,
        advantage_ci=ci,
        advantage_heldout=float(adv_ho),
        advantage_heldout_ci=ci_ho,
        auc=auc,
        tpr_at_1pct_fpr=_tpr_at_fpr(fpr, tpr, 0.01),
        tpr_at_01pct_fpr=_tpr_at_fpr(fpr, tpr, 0.001),
        roc=roc,
        threshold=float(thr[i]),
        direction=direction,
        heldout_threshold=t_sel,
        heldout_direction=d_sel,
        n_members=n_m,
        n_nonmembers=n_n,
        level=level,
    )
