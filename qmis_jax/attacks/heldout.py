"""Held-out advantages of an attack split by replicate (theory.md sections 7 and 10): the upper end of the MIS
bracket. Each attack's rule (threshold and direction) is chosen on one half of the replicates and its
``TPR_i - FPR_i`` is computed on each replicate ``i`` of the other half; these are independent and bounded in
``[-1, 1]``, and a one-sided lower limit ``a`` of their mean (:func:`~qmis_jax.stats.mean_lower_limit`) gives
``MIS <= 1 - a`` (:func:`heldout_advantage`, :func:`heldout_advantage_embedded`).

Host-side NumPy in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qmis_jax._random import numpy_rng
from qmis_jax.stats.intervals import check_level, mean_lower_limit

from ._errors import AttackNotRun
from ._scores import best_threshold

__all__ = ["HeldoutAdvantage", "heldout_advantage", "heldout_advantage_embedded"]


class HeldoutAdvantage(NamedTuple):
    """Held-out advantage of one attack, split by replicate (theory.md sections 7 and 10).

    Attributes:
      mean: mean over the evaluation replicates of ``TPR_i - FPR_i`` of the rule chosen on the selection half, in
        ``[-1, 1]`` (unbiased for the fixed rule's advantage; may be negative by chance).
      lower: one-sided lower confidence limit of that mean at ``level`` (:func:`mean_lower_limit`), in ``[-1, 1]``;
        ``max(0, lower)`` is a lower confidence limit on ``Delta`` in a section-1 game.
      upper: one-sided upper confidence limit at ``level``.
      hoeffding_lower, bernstein_lower: the two candidate lower limits (each at ``1 - (1 - level) / 2``).
      values: ``(N,)`` per-replicate ``TPR_i - FPR_i`` on the evaluation half.
      select_replicates, eval_replicates: disjoint index arrays into the replicate axis (replicates of the
        evaluation half without a member or a non-member among the evaluation targets are dropped from
        ``eval_replicates``: that depends on the membership design only, never on the scores).
      select_targets, eval_targets: disjoint index arrays into the target axis (embedded-target design with
        ``split_targets``), else ``None``.
      threshold: the rule's threshold. direction: +1 for "member iff score >= t", -1 for "member iff score < t".
      level: one-sided level of ``lower`` and ``upper``.
    """

    mean: float
    lower: float
    upper: float
    hoeffding_lower: float
    bernstein_lower: float
    values: np.ndarray
    select_replicates: np.ndarray
    eval_replicates: np.ndarray
    select_targets: np.ndarray | None
    eval_targets: np.ndarray | None
    threshold: float
    direction: int
    level: float


def _split(rng: np.random.Generator, size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Random halves of ``range(size)``; :class:`AttackNotRun` when ``size < 4`` (two halves of at least 2)."""
    if size < 4:
        raise AttackNotRun(f"{name}: the held-out split needs at least 4 {name} (two halves of >= 2), got {size}")
    perm = rng.permutation(size)
    return np.sort(perm[: size // 2]), np.sort(perm[size // 2 :])


def _finite_matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must have shape (R, m) with R, m >= 1, got shape {arr.shape}")
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name} contains NaN scores")
    return arr


def _flag(scores: np.ndarray, threshold: float, direction: int) -> np.ndarray:
    return scores >= threshold if direction > 0 else scores < threshold


def _result(values, level, sel, ev, sel_t, ev_t, threshold, direction) -> HeldoutAdvantage:
    values = np.clip(np.asarray(values, np.float64), -1.0, 1.0)
    if values.size < 2:
        raise AttackNotRun(
            f"replicates: the held-out limit needs at least 2 evaluation replicates with both a member and a "
            f"non-member among the evaluation targets, got {values.size}"
        )
    lower, upper, hl, bl = mean_lower_limit(values, level=level)
    return HeldoutAdvantage(
        mean=float(np.clip(values.mean(), -1.0, 1.0)),
        lower=lower,
        upper=upper,
        hoeffding_lower=hl,
        bernstein_lower=bl,
        values=values,
        select_replicates=sel,
        eval_replicates=ev,
        select_targets=sel_t,
        eval_targets=ev_t,
        threshold=float(threshold),
        direction=int(direction),
        level=level,
    )


def heldout_advantage(key, member_scores, nonmember_scores, *, level: float = 0.975) -> HeldoutAdvantage:
    """Held-out advantage by replicate in the fresh-data design (theory.md sections 7 and 10).

    Replicate ``i`` released ``R_i``, trained on its members (row ``i`` of ``member_scores``: the attack's scores of
    its training points) and scored fresh non-members (row ``i`` of ``nonmember_scores``). The replicates are split
    at random into a selection half A and an evaluation half B. On A's pooled pairs the threshold and direction
    maximising ``|TPR - FPR|`` are chosen; on each replicate ``i`` of B the fixed rule's ``TPR_i - FPR_i`` is
    computed. The values of B are independent (one release each), bounded in ``[-1, 1]``, with mean the rule's
    advantage ``<= Delta``; :func:`mean_lower_limit` gives the one-sided lower limit.

    Args:
      key: JAX PRNG key (or int seed; ``None`` = 0) for the split.
      member_scores: ``(R, m)`` scores of each replicate's members (higher = "more likely a member").
      nonmember_scores: ``(R, m')`` scores of each replicate's fresh non-members.
      level: one-sided level of the limits (e.g. ``bracket_levels(J)[1]`` for the bracket with ``J`` attacks).

    Returns:
      :class:`HeldoutAdvantage` (``select_targets`` and ``eval_targets`` are ``None``).

    Raises:
      AttackNotRun: fewer than 4 replicates (no split into two halves of >= 2).
      ValueError: malformed scores (shapes, NaN).
    """
    level = check_level(level)
    m = _finite_matrix(member_scores, "member_scores")
    nm = _finite_matrix(nonmember_scores, "nonmember_scores")
    if m.shape[0] != nm.shape[0]:
        raise ValueError(
            f"member_scores and nonmember_scores need the same replicate count, got {m.shape[0]} and {nm.shape[0]}"
        )
    sel, ev = _split(numpy_rng(key), m.shape[0], "replicates")
    t, d, _ = best_threshold(m[sel].ravel(), nm[sel].ravel())
    values = _flag(m[ev], t, d).mean(axis=1) - _flag(nm[ev], t, d).mean(axis=1)
    return _result(values, level, sel, ev, None, None, t, d)


def heldout_advantage_embedded(
    key, scores, membership, *, level: float = 0.975, split_targets: bool = True
) -> HeldoutAdvantage:
    """Held-out advantage by replicate (and target) in the embedded-target design (theory.md sections 7, 10).

    ``scores[i, t]`` is the attack's score of target ``t`` against replicate ``i``'s release (for LiRA: the
    likelihood ratios of the evaluation replicates, the per-target fits coming from other, shadow replicates),
    ``membership[i, t]`` whether ``t`` was in ``i``'s training set. Replicates are split into halves A and B and,
    with ``split_targets``, the targets into halves TA and TB: the rule is chosen on the pairs ``(A, TA)`` and each
    replicate ``i`` of B gets ``TPR_i - FPR_i`` over the targets TB (its members among TB against its non-members
    among TB). The rule then never saw a replicate or a target it is evaluated on.

    Args:
      key: JAX PRNG key (or int seed) for the splits.
      scores: ``(R, T)`` scores.
      membership: ``(R, T)`` bool.
      level: one-sided level of the limits.
      split_targets: also split the targets (the default, and what the bracket needs for LiRA).

    Returns:
      :class:`HeldoutAdvantage`.

    Raises:
      AttackNotRun: fewer than 4 replicates, or (``split_targets``) fewer than 4 targets, a selection half without
        both classes, or fewer than 2 evaluation replicates with both classes: the design is too small to hold the
        attack out. These depend on the design only, never on the scores.
      ValueError: malformed scores or membership.
    """
    level = check_level(level)
    s = _finite_matrix(scores, "scores")
    mem = np.asarray(membership)
    if mem.shape != s.shape:
        raise ValueError(f"membership must have the shape of scores {s.shape}, got {mem.shape}")
    mem = mem.astype(bool)
    rng = numpy_rng(key)
    sel, ev = _split(rng, s.shape[0], "replicates")
    if split_targets:
        sel_t, ev_t = _split(rng, s.shape[1], "targets")
    else:
        sel_t = ev_t = np.arange(s.shape[1])
    sa, ma = s[np.ix_(sel, sel_t)], mem[np.ix_(sel, sel_t)]
    if not ma.any() or ma.all():
        raise AttackNotRun("membership: the selection half of the held-out split has no member or no non-member")
    t, d, _ = best_threshold(sa[ma], sa[~ma])
    sb, mb = s[np.ix_(ev, ev_t)], mem[np.ix_(ev, ev_t)]
    flag = _flag(sb, t, d)
    n_in, n_out = mb.sum(axis=1), (~mb).sum(axis=1)
    keep = (n_in > 0) & (n_out > 0)
    tpr = (flag & mb).sum(axis=1)[keep] / n_in[keep]
    fpr = (flag & ~mb).sum(axis=1)[keep] / n_out[keep]
    return _result(
        tpr - fpr, level, sel, ev[keep], sel_t if split_targets else None, ev_t if split_targets else None, t, d
    )
