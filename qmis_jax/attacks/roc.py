"""ROC quantities for auditing: the convex-hull AUC, TPR at a fixed FPR (0% included), epsilon lower bounds.

Convention: higher score = "more likely a member" (the rule "member iff score >= t"), as in
:mod:`qmis_jax.attacks.metrics` and in ``jax_privacy.auditing.CanaryScoreAuditor``. NumPy/SciPy in float64.

* The **convex hull** of the empirical ROC is what an attacker achieves by randomising between two thresholds;
  ``CanaryScoreAuditor(member, nonmember).attack_auroc()`` is the area under it (its ``_pareto_frontier`` keeps the
  points of the ROC not below a chord of two others), so :func:`auc_convex_hull` is the same number. It is at
  least the plain (Mann-Whitney) AUC and at least 1/2.
* **Pairs from one replicate share its release.** Every (target, release) pair scored on one replicate's model sees
  the same randomness of that release, so pairs are not independent trials: binomial (Clopper-Pearson) limits on
  TPR/FPR counted over pairs are over-confident when a replicate contributes many pairs. Count one decision per
  replicate (one member and one non-member pair of each held-out replicate), or pass counts of replicates, to make
  :func:`epsilon_lower_bound` a valid confidence bound (theory.md section 7).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from qmis_jax.stats.intervals import clopper_pearson

from ._scores import as_scores, roc_counts

__all__ = ["EpsilonBound", "auc_convex_hull", "epsilon_lower_bound", "roc_convex_hull", "tpr_at_fpr"]


def roc_convex_hull(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper convex hull of the empirical ROC of "member iff score >= t".

    The hull runs from ``(0, 0)`` to ``(1, 1)`` and is concave; a point on it between two vertices is achieved by
    randomising between their two thresholds. Points on a chord are dropped (they do not change any area or
    interpolated TPR).

    Args:
      member_scores: scores of member pairs, any shape (flattened).
      nonmember_scores: scores of non-member pairs, any shape (flattened).

    Returns:
      ``(fpr, tpr)``: float64 arrays of the hull's vertices, increasing in ``fpr``.
    """
    m = as_scores(member_scores, "member_scores")
    nm = as_scores(nonmember_scores, "nonmember_scores")
    _, tp, fp = roc_counts(m, nm)
    # work on the integer counts (exact orientation tests), then scale
    hull: list[tuple[int, int]] = []
    for x, y in zip(fp.tolist(), tp.tolist()):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point unless it lies strictly above the chord (x1, y1) -> (x, y)
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append((x, y))
    pts = np.asarray(hull, dtype=np.float64)
    return pts[:, 0] / nm.size, pts[:, 1] / m.size


def auc_convex_hull(member_scores, nonmember_scores) -> float:
    """Area under the convex hull of the empirical ROC (the AUROC of randomised threshold rules).

    Equal to ``jax_privacy.auditing.CanaryScoreAuditor(member, nonmember).attack_auroc()``. It is ``>=`` the
    plain AUC of :func:`~qmis_jax.attacks.attack_metrics` (the Mann-Whitney statistic, the area under the
    step ROC with ties as diagonal segments) and ``>= 1/2``: the rule "higher = member" is fixed, and a ROC below the
    diagonal has the diagonal as its hull.

    Args:
      member_scores: scores of member pairs, any shape (flattened).
      nonmember_scores: scores of non-member pairs, any shape (flattened).

    Returns:
      The area, a float in ``[1/2, 1]``.

    >>> auc_convex_hull([3.0, 2.0, 1.5], [1.0, 0.0, 2.5])  # plain AUC 7/9
    0.888888888888889
    """
    fpr, tpr = roc_convex_hull(member_scores, nonmember_scores)
    return float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))


def tpr_at_fpr(member_scores, nonmember_scores, *, fpr=0.0, randomized: bool = False):
    """Largest TPR of the rule "member iff score >= t" whose FPR is at most ``fpr`` (0% FPR included).

    * ``randomized=False``: over deterministic thresholds only (the step ROC, as ``tpr_at_1pct_fpr`` of
      :func:`~qmis_jax.attacks.attack_metrics`). At ``fpr=0`` it is the fraction of member scores above every
      non-member score.
    * ``randomized=True``: the convex hull at ``fpr`` (randomising between two thresholds), as
      ``CanaryScoreAuditor.tpr_at_given_fpr``. At ``fpr=0`` both coincide.

    Args:
      member_scores: scores of member pairs, any shape (flattened).
      nonmember_scores: scores of non-member pairs, any shape (flattened).
      fpr: false-positive rate(s) in ``[0, 1]``, a float or an array.
      randomized: allow randomised rules (the hull) or not.

    Returns:
      A float (scalar ``fpr``) or a float64 array of the shape of ``fpr``.

    >>> tpr_at_fpr([3.0, 2.0, 1.5], [1.0, 0.0, 2.5])
    0.3333333333333333
    """
    alpha = np.asarray(fpr, dtype=np.float64)
    if alpha.size == 0 or np.any(~np.isfinite(alpha)) or np.any((alpha < 0) | (alpha > 1)):
        raise ValueError(f"fpr must lie in [0, 1], got fpr={fpr!r}")
    if randomized:
        hf, ht = roc_convex_hull(member_scores, nonmember_scores)
        # the hull is concave and starts at fpr = 0; several vertices may share fpr = 0: take the highest
        hf0 = np.r_[0.0, hf[hf > 0]]
        ht0 = np.r_[ht[hf == 0].max(), ht[hf > 0]]
        out = np.interp(alpha, hf0, ht0)
    else:
        m = as_scores(member_scores, "member_scores")
        nm = as_scores(nonmember_scores, "nonmember_scores")
        _, tp, fp = roc_counts(m, nm)
        # fp is non-decreasing and tp increasing along the thresholds: the last point with fp <= alpha n is the best
        idx = np.searchsorted(fp, np.floor(alpha * nm.size + 1e-9), side="right") - 1
        out = tp[idx] / m.size
    return float(out) if out.ndim == 0 else out


class EpsilonBound(NamedTuple):
    """An epsilon lower bound from TPR/FPR counts (:func:`epsilon_lower_bound`).

    Attributes:
      epsilon: the lower confidence bound on epsilon (``>= 0``; 0 when the counts show nothing).
      tpr_lo: one-sided Clopper-Pearson lower limit of the TPR.
      fpr_hi: one-sided Clopper-Pearson upper limit of the FPR.
      epsilon_point: the same bound at the point estimates (no interval; optimistic, for reading only).
      level: joint confidence level.
    """

    epsilon: float
    tpr_lo: float
    fpr_hi: float
    epsilon_point: float
    level: float


def _log_ratio(num: float, den: float) -> float:
    if num <= 0.0:
        return 0.0
    if den <= 0.0:
        return math.inf
    return max(0.0, math.log(num / den))


def _count(rate, n, name: str) -> int:
    n = int(n)
    k = float(rate) * n
    if not 0.0 <= float(rate) <= 1.0 or abs(k - round(k)) > 1e-6 * max(1, n):
        raise ValueError(
            f"{name} must be a count / n_{'members' if name == 'tpr' else 'nonmembers'} in [0, 1], got "
            f"{name}={rate!r} with n={n}"
        )
    return int(round(k))


def epsilon_lower_bound(
    tpr, fpr, *, n_members: int, n_nonmembers: int, delta: float = 0.0, level: float = 0.95
) -> EpsilonBound:
    """Lower confidence bound on the epsilon of (epsilon, delta)-DP from a fixed rule's held-out TPR and FPR.

    An (epsilon, delta)-DP release makes every test satisfy ``TPR <= e^eps FPR + delta`` and, for the complementary
    rule, ``1 - FPR <= e^eps (1 - TPR) + delta`` (Kairouz et al. 2015; Jagielski et al. 2020). With one-sided
    Clopper-Pearson limits ``TPR_lo`` and ``FPR_hi``, each at ``(1 - level) / 2``, jointly valid at ``level``::

        eps >= max(log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo)))

    (both use the same two limits, so no further correction is needed; a bound at 0 means "nothing shown").
    The rule (threshold and direction) must be fixed before these counts are taken: choose it on other data, as
    ``advantage_heldout`` of :func:`~qmis_jax.attacks.attack_metrics` does.

    Trials must be independent: **pairs from one replicate share its release**, so count one member and one
    non-member decision per replicate (``n_members`` = ``n_nonmembers`` = the number of held-out replicates) or
    the interval is over-confident. Do not use jax-privacy 2.0.0's ``epsilon_from_gdp``, which reports about 3.5
    on null scores.

    Args:
      tpr: observed TPR = ``tp / n_members`` of the fixed rule.
      fpr: observed FPR = ``fp / n_nonmembers``.
      n_members: number of member trials (independent).
      n_nonmembers: number of non-member trials (independent).
      delta: the DP delta in ``[0, 1)``.
      level: joint confidence level in (0, 1).

    Returns:
      :class:`EpsilonBound`.

    >>> round(epsilon_lower_bound(0.5, 0.01, n_members=1000, n_nonmembers=1000).epsilon, 3)
    3.242
    """
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got level={level!r}")
    delta = float(delta)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got delta={delta!r}")
    for name, n in (("n_members", n_members), ("n_nonmembers", n_nonmembers)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={n!r}")
    tp = _count(tpr, n_members, "tpr")
    fp = _count(fpr, n_nonmembers, "fpr")
    tpr_lo, _ = clopper_pearson(tp, int(n_members), level)  # two-sided at `level`: each tail (1 - level) / 2
    _, fpr_hi = clopper_pearson(fp, int(n_nonmembers), level)
    eps = max(_log_ratio(tpr_lo - delta, fpr_hi), _log_ratio(1.0 - fpr_hi - delta, 1.0 - tpr_lo))
    t_hat, f_hat = tp / int(n_members), fp / int(n_nonmembers)
    eps_point = max(_log_ratio(t_hat - delta, f_hat), _log_ratio(1.0 - f_hat - delta, 1.0 - t_hat))
    return EpsilonBound(float(eps), float(tpr_lo), float(fpr_hi), float(eps_point), level)
