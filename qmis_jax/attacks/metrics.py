"""Metrics of a membership-inference attack from its scores: advantage, intervals, AUC, ROC.

An attack outputs one real score per (release, candidate point); a higher score means "more likely a member".
Everything here works on the two pooled score vectors (members, non-members) with NumPy/SciPy in float64: these
are post-processing steps on at most a few million numbers, not the batched core of the package.

The advantage of an attack is ``max_t |TPR(t) - FPR(t)|`` over thresholds (theory.md section 7). By section 1, a
section-1 attack's advantage lower-bounds ``Delta`` and ``1 - advantage`` upper-bounds the MIS, but only through an
interval that is honest about how the threshold was chosen, and about which pairs share a release: pairs from one
replicate share its release, so the held-out advantage that bounds anything is split by replicate (theory.md
sections 7 and 10; :func:`attack_metrics_by_replicate`, :func:`attack_metrics_embedded`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy import stats as _sps

from qmis_jax._random import numpy_rng
from qmis_jax.stats.intervals import check_level, clopper_pearson

from ._errors import AttackNotRun
from ._scores import as_scores, best_threshold, roc_counts, rule_counts
from .heldout import heldout_advantage, heldout_advantage_embedded

__all__ = [
    "AttackMetrics",
    "attack_metrics",
    "attack_metrics_by_replicate",
    "attack_metrics_embedded",
    "not_run_dict",
    "roc_curve",
]


def roc_curve(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full empirical ROC curve of the rule "member iff score >= t" over all distinct thresholds.

    Args:
      member_scores: scores of members, any shape (flattened).
      nonmember_scores: scores of non-members, any shape (flattened).

    Returns:
      ``(fpr, tpr, thresholds)`` float64 arrays, from ``(0, 0)`` at ``t = +inf`` to ``(1, 1)``; ties in the scores
      share one point (same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).
    """
    m = as_scores(member_scores, "member_scores")
    nm = as_scores(nonmember_scores, "nonmember_scores")
    thr, tp, fp = roc_counts(m, nm)
    return fp / nm.size, tp / m.size, thr


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


class AttackMetrics(NamedTuple):
    """Metrics of one attack (theory.md section 7); higher score = "more likely a member".

    Attributes:
      advantage: ``max_t |TPR(t) - FPR(t)|`` over all thresholds, chosen on the same data (optimistic).
      advantage_ci: ``(lo, hi)`` at the chosen threshold: Clopper-Pearson intervals on TPR and FPR, each at level
        ``1 - (1 - level) / 2`` (Bonferroni), combined as ``[max(0, tpr_lo - fpr_hi), tpr_hi - fpr_lo]``. The
        threshold was selected on the same scores, so this interval inherits the selection's optimism.
      advantage_heldout: the held-out advantage, in ``[-1, 1]``: unbiased for the held-out rule's ``TPR - FPR``, so
        it may be negative by chance (clip at 0 for a statement about ``Delta``). By replicate (``heldout_design`` is
        ``"replicate"`` or ``"replicate+target"``): the rule (threshold and direction) is chosen on half of the
        replicates (and, embedded-target design, half of the targets) and this is the mean of ``TPR_i - FPR_i`` over
        the other replicates (:func:`~qmis_jax.attacks.heldout_advantage`). By pair (``"pair"``, when no
        replicate structure is given): the rule is chosen on a random half of the member and non-member scores and
        evaluated on the rest; pairs of one replicate share its release, so this one is descriptive only.
      advantage_heldout_ci: ``(lo, hi)`` two-sided interval at ``level`` for the held-out rule's advantage, clipped
        to ``[0, 1]`` (an interval for ``max(0, TPR - FPR)``, which lower-bounds ``Delta``). By replicate: one-sided
        limits at ``1 - (1 - level) / 2`` each from the per-replicate values (better of Hoeffding and empirical
        Bernstein, :func:`~qmis_jax.stats.mean_lower_limit`). By pair:
        Bonferroni-combined Clopper-Pearson intervals over the evaluation pairs (too narrow when pairs share
        releases).
      advantage_bound: one-sided lower confidence limit at ``bound_level`` on the held-out rule's advantage, clipped
        to ``[0, 1]``: with a by-replicate design and a section-1 attack, a lower bound on ``Delta`` and the input
        of :func:`~qmis_jax.stats.mis_bracket` (pass ``bound_level = bracket_levels(J)[1]``).
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
      bound_level: one-sided level of ``advantage_bound``.
      heldout_design: ``"replicate"``, ``"replicate+target"`` or ``"pair"``.
      heldout_replicates: number of evaluation replicates (0 for ``"pair"``).
    """

    advantage: float
    advantage_ci: tuple[float, float]
    advantage_heldout: float
    advantage_heldout_ci: tuple[float, float]
    advantage_bound: float
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
    bound_level: float = 0.95
    heldout_design: str = "pair"
    heldout_replicates: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict: floats, ints and lists (infinite thresholds become ``None``). Its
        ``advantage_heldout`` is clipped to ``[0, 1]`` (``advantage_heldout_mean`` keeps the signed estimate)."""

        def finite(v):
            return float(v) if np.isfinite(v) else None

        return {
            "advantage": float(self.advantage),
            "advantage_ci": [float(v) for v in self.advantage_ci],
            # an advantage in a report lies in [0, 1]: the signed, unbiased mean is kept beside it
            "advantage_heldout": _clip01(self.advantage_heldout),
            "advantage_heldout_mean": float(self.advantage_heldout),
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
            "advantage_bound": float(self.advantage_bound),
            "bound_level": float(self.bound_level),
            "heldout_design": str(self.heldout_design),
            "heldout_replicates": int(self.heldout_replicates),
        }


NOT_RUN_FIELDS = (
    "advantage",
    "advantage_ci",
    "advantage_heldout",
    "advantage_heldout_mean",
    "advantage_heldout_ci",
    "auc",
    "tpr_at_1pct_fpr",
    "tpr_at_01pct_fpr",
    "threshold",
    "direction",
    "heldout_threshold",
    "heldout_direction",
    "n_members",
    "n_nonmembers",
    "level",
    "advantage_bound",
    "bound_level",
    "heldout_design",
    "heldout_replicates",
)


def not_run_dict(reason: str, extra_fields=()) -> dict[str, Any]:
    """The report entry of an attack that did not run (theory.md section 10: it enters no bracket limit).

    ``{"ran": False, "reason": reason}`` with every field of :meth:`AttackMetrics.to_dict` but the ROC curve set to
    None (JSON null), and the ``extra_fields`` too: a reader finds the same keys as for an attack that ran.

    Args:
      reason: why the attack could not run at this size (an :class:`AttackNotRun` message).
      extra_fields: further keys the caller's entries carry (set to None as well).

    Returns:
      a JSON-serialisable dict.

    >>> d = not_run_dict("targets: too few")
    >>> d["ran"], d["reason"], d["advantage_bound"]
    (False, 'targets: too few', None)
    """
    return {"ran": False, "reason": str(reason), **dict.fromkeys((*NOT_RUN_FIELDS, *extra_fields))}


def _clip01(x: float) -> float:
    return float(min(max(x, 0.0), 1.0))


def _in_sample(m: np.ndarray, nm: np.ndarray, level: float, max_roc_points: int) -> dict[str, Any]:
    """In-sample (descriptive) metrics of the pooled scores: advantage with its interval, AUC, TPRs, ROC."""
    n_m, n_n = m.size, nm.size
    thr, tp, fp = roc_counts(m, nm)
    tpr, fpr = tp / n_m, fp / n_n
    diff = tpr - fpr
    i = int(np.argmax(np.abs(diff)))
    direction = -1 if diff[i] < 0 else 1
    k_m, k_n = (int(tp[i]), int(fp[i])) if direction > 0 else (n_m - int(tp[i]), n_n - int(fp[i]))
    # AUC: Mann-Whitney U with average ranks for ties.
    ranks = _sps.rankdata(np.concatenate([m, nm]))
    return {
        "advantage": _clip01(abs(diff[i])),
        "advantage_ci": _advantage_interval(k_m, n_m, k_n, n_n, level),
        "auc": float((ranks[:n_m].sum() - n_m * (n_m + 1) / 2.0) / (n_m * n_n)),
        "tpr_at_1pct_fpr": _tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_01pct_fpr": _tpr_at_fpr(fpr, tpr, 0.001),
        "roc": _downsample(fpr, tpr, n_n, int(max_roc_points)),
        "threshold": float(thr[i]),
        "direction": direction,
        "n_members": n_m,
        "n_nonmembers": n_n,
    }


def _check_common(level, bound_level, max_roc_points) -> tuple[float, float]:
    level = check_level(level)
    bound_level = level if bound_level is None else check_level(bound_level)
    if int(max_roc_points) < 2:
        raise ValueError(f"max_roc_points must be >= 2, got max_roc_points={max_roc_points!r}")
    return level, bound_level


def _by_replicate(ins: dict, ho, design: str, level: float, bound_level: float, again) -> AttackMetrics:
    """AttackMetrics from the in-sample part and a by-replicate held-out result (``again`` recomputes it at a level,
    with the same key, hence the same split and rule)."""
    side = 1.0 - (1.0 - level) / 2.0
    two = ho if ho.level == side else again(side)
    bound = ho if ho.level == bound_level else again(bound_level)
    return AttackMetrics(
        advantage_heldout=float(min(max(ho.mean, -1.0), 1.0)),
        advantage_heldout_ci=(_clip01(two.lower), _clip01(two.upper)),
        advantage_bound=_clip01(bound.lower),
        heldout_threshold=ho.threshold,
        heldout_direction=ho.direction,
        level=level,
        bound_level=bound_level,
        heldout_design=design,
        heldout_replicates=int(ho.eval_replicates.size),
        **ins,
    )


def attack_metrics(
    key,
    member_scores,
    nonmember_scores,
    *,
    level: float = 0.95,
    max_roc_points: int = 200,
    bound_level: float | None = None,
) -> AttackMetrics:
    """Advantage with intervals, AUC, low-FPR TPRs and the ROC of one attack on pooled pairs (theory.md section 7).

    Advantage ``= max_t |TPR(t) - FPR(t)|`` where ``TPR(t)`` (``FPR(t)``) is the fraction of member (non-member)
    scores ``>= t``; the absolute value lets the attack flip its rule (the game is symmetric, section 1). For a
    section-1 game every fixed rule's advantage is at most ``Delta``; the in-sample maximum over ``t``
    (``advantage``, descriptive) is biased upwards by the selection, by ``O(1/sqrt(n))``. The held-out version
    removes that bias: choose ``t`` and the direction on one half, evaluate on the other.

    Here the scores are pooled pairs and the split is by pair, which is descriptive only (pairs of one replicate
    share its release; section 7). For the fresh-data design split by replicate use
    :func:`attack_metrics_by_replicate`, for the embedded-target design :func:`attack_metrics_embedded`.

    Args:
      key: JAX PRNG key of the held-out split.
      member_scores: scores of member (candidate, release) pairs, any shape (flattened).
      nonmember_scores: scores of non-member pairs, any shape (flattened).
      level: confidence level of the intervals.
      max_roc_points: at most this many ROC points are kept in ``roc``.
      bound_level: one-sided level of ``advantage_bound`` (default ``level``).

    Returns:
      :class:`AttackMetrics` with ``heldout_design="pair"``.

    Raises:
      AttackNotRun: fewer than 2 member or 2 non-member scores (no split into halves).

    >>> import jax
    >>> m = attack_metrics(jax.random.key(0), [3.0, 2.0, 1.5], [1.0, 0.0, 2.5])
    >>> round(m.advantage, 4), round(m.auc, 4)
    (0.6667, 0.7778)
    """
    level, bound_level = _check_common(level, bound_level, max_roc_points)
    m = as_scores(member_scores, "member_scores")
    nm = as_scores(nonmember_scores, "nonmember_scores")
    if m.size < 2 or nm.size < 2:
        raise AttackNotRun(
            f"need at least 2 member and 2 non-member scores for the held-out split, got "
            f"{m.size} members and {nm.size} non-members"
        )
    ins = _in_sample(m, nm, level, max_roc_points)

    # Held-out by pair: choose the rule on one half of each class, evaluate on the other half (descriptive).
    rng = numpy_rng(key)
    n_m, n_n = m.size, nm.size
    pm = rng.permutation(n_m)
    pn = rng.permutation(n_n)
    sel_m, ev_m = m[pm[: n_m // 2]], m[pm[n_m // 2 :]]
    sel_n, ev_n = nm[pn[: n_n // 2]], nm[pn[n_n // 2 :]]
    t_sel, d_sel, _ = best_threshold(sel_m, sel_n)
    h_m, h_n = rule_counts(ev_m, ev_n, t_sel, d_sel)
    adv_ho = h_m / ev_m.size - h_n / ev_n.size
    ci_ho = _advantage_interval(h_m, ev_m.size, h_n, ev_n.size, level)
    bound = _advantage_interval(h_m, ev_m.size, h_n, ev_n.size, 1.0 - 2.0 * (1.0 - bound_level))[0]
    return AttackMetrics(
        advantage_heldout=float(adv_ho),
        advantage_heldout_ci=(_clip01(ci_ho[0]), _clip01(ci_ho[1])),
        advantage_bound=_clip01(bound),
        heldout_threshold=t_sel,
        heldout_direction=d_sel,
        level=level,
        bound_level=bound_level,
        heldout_design="pair",
        heldout_replicates=0,
        **ins,
    )


def attack_metrics_by_replicate(
    key,
    member_scores,
    nonmember_scores,
    *,
    level: float = 0.95,
    max_roc_points: int = 200,
    bound_level: float | None = None,
) -> AttackMetrics:
    """:func:`attack_metrics` for the fresh-data design, held out by replicate (theory.md sections 7 and 10).

    Row ``i`` holds replicate ``i``'s members and fresh non-members. The in-sample (descriptive) metrics pool every
    pair; the halves of the held-out split are halves of the replicates and the interval comes from the independent
    per-replicate ``TPR_i - FPR_i`` (:func:`~qmis_jax.attacks.heldout_advantage`): this is the one that bounds
    ``Delta``.

    Args:
      key: JAX PRNG key of the held-out split.
      member_scores: ``(R, m)`` scores of each replicate's members.
      nonmember_scores: ``(R, m')`` scores of each replicate's non-members.
      level, max_roc_points: as in :func:`attack_metrics`.
      bound_level: one-sided level of ``advantage_bound`` (default ``level``); for the bracket of section 10 with
        ``J`` attacks, ``bracket_levels(J)[1]``.

    Returns:
      :class:`AttackMetrics` with ``heldout_design="replicate"``.

    Raises:
      AttackNotRun: fewer than 4 replicates (:func:`~qmis_jax.attacks.heldout_advantage`).
    """
    level, bound_level = _check_common(level, bound_level, max_roc_points)
    mm = np.asarray(member_scores, dtype=np.float64)
    nn = np.asarray(nonmember_scores, dtype=np.float64)
    if mm.ndim != 2 or nn.ndim != 2:
        raise ValueError(
            f"attack_metrics_by_replicate needs member_scores (R, m) and nonmember_scores (R, m'), got shapes "
            f"{mm.shape} and {nn.shape}"
        )

    def again(lv):
        return heldout_advantage(key, mm, nn, level=lv)

    ho = again(bound_level)
    ins = _in_sample(as_scores(mm, "member_scores"), as_scores(nn, "nonmember_scores"), level, max_roc_points)
    return _by_replicate(ins, ho, "replicate", level, bound_level, again)


def attack_metrics_embedded(
    key,
    scores,
    membership,
    *,
    level: float = 0.95,
    max_roc_points: int = 200,
    bound_level: float | None = None,
    split_targets: bool = True,
) -> AttackMetrics:
    """:func:`attack_metrics` for the embedded-target design (LiRA; theory.md sections 7 and 10).

    The in-sample (descriptive) metrics pool every pair, members ``scores[membership]`` against non-members
    ``scores[~membership]``. The held-out advantage and its interval are by replicate and by target
    (:func:`~qmis_jax.attacks.heldout_advantage_embedded`): the rule is chosen on half of the replicates and
    half of the targets, and each other replicate gets its ``TPR_i - FPR_i`` over the other targets.

    Args:
      key: JAX PRNG key of the splits.
      scores: ``(R, T)`` attack scores of the evaluated replicates (for LiRA, the likelihood ratios of the
        non-shadow replicates: ``lira_scores(scores, fit)[~shadow]``).
      membership: ``(R, T)`` bool, the matching membership rows.
      level: confidence level of the intervals.
      max_roc_points: ROC points kept.
      bound_level: one-sided level of ``advantage_bound`` (default ``level``).
      split_targets: split the targets too (default; needed for the bound with per-target scores).

    Returns:
      :class:`AttackMetrics` with ``heldout_design="replicate+target"`` (``"replicate"`` without
      ``split_targets``).

    Raises:
      AttackNotRun: the design is too small for the split (:func:`~qmis_jax.attacks.heldout_advantage_embedded`).
    """
    level, bound_level = _check_common(level, bound_level, max_roc_points)
    s = np.asarray(scores, dtype=np.float64)
    mem = np.asarray(membership)
    if s.ndim != 2 or mem.shape != s.shape:
        raise ValueError(f"scores and membership must share a shape (R, T), got {s.shape} and {mem.shape}")
    mem = mem.astype(bool)

    def again(lv):
        return heldout_advantage_embedded(key, s, mem, level=lv, split_targets=split_targets)

    ho = again(bound_level)
    ins = _in_sample(as_scores(s[mem], "member scores"), as_scores(s[~mem], "non-member scores"), level, max_roc_points)
    design = "replicate+target" if split_targets else "replicate"
    return _by_replicate(ins, ho, design, level, bound_level, again)
