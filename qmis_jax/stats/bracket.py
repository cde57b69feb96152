"""A certified MIS bracket at any n (theory.md section 10) and the regime flag of the asymptotic MIS (section 5).

- Lower end (upper bound on ``Delta``), by a swap coupling: each replicate is trained twice, on ``D`` and on ``D'``
  (``Z_1`` replaced by a fresh ``Z_0``); ``R' = Q(A(D'))`` is independent of ``Z_1`` with the law of ``R``, so
  ``Delta <= P(R != R')``. One swap per replicate gives independent Bernoulli trials and the Clopper-Pearson upper
  limit ``u`` of their rate gives ``MIS >= 1 - u`` (:func:`swap_bound`).
- Upper end (lower bound on ``Delta``), by held-out attacks: each attack's rule (threshold and direction) is chosen on
  one half of the replicates and its ``TPR_i - FPR_i`` is computed on each replicate ``i`` of the other half; these
  are independent and bounded in ``[-1, 1]``, and a one-sided lower limit ``a`` of their mean gives ``MIS <= 1 - a``
  (:func:`heldout_advantage`, :func:`heldout_advantage_embedded`).
- :func:`mis_bracket` combines them, ``[max(0, 1 - u), min(1, 1 - max(0, a))]``, jointly at 95% with 2.5% to each end
  (:func:`bracket_levels` gives the per-end and per-attack levels: Bonferroni over the attacks).
- :func:`asymptotic_regime`: whether ``mis_asymptotic`` can be read at all, from ``min_k sqrt(n) c_k``.

Host-side NumPy/SciPy in float64: post-processing of at most a few million numbers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as _sps

from .metrics import _best_threshold, _check_level, _numpy_rng

__all__ = [
    "REGIME_THRESHOLD",
    "HeldoutAdvantage",
    "MisBracket",
    "SwapBound",
    "asymptotic_regime",
    "bracket_levels",
    "bracket_report",
    "heldout_advantage",
    "heldout_advantage_embedded",
    "mean_lower_limit",
    "mis_bracket",
    "swap_bound",
]

# Derived from the exact Gaussian-mean tables: see asymptotic_regime's docstring and docs/theory.md section 5.
REGIME_THRESHOLD = 1.5


# --------------------------------------------------------------------------------------------------------------------
# Swap-coupling end
# --------------------------------------------------------------------------------------------------------------------


class SwapBound(NamedTuple):
    """Swap-coupling bound ``Delta <= P(R != R')`` (theory.md section 10).

    Attributes:
      rate: the observed fraction of replicates whose release changed under the swap.
      upper: ``u``, the one-sided Clopper-Pearson upper limit of ``P(R != R')`` at ``level``, in ``[0, 1]``.
      mis_lower: ``1 - u``, a lower confidence limit on the MIS at ``level``.
      changes: number of replicates whose release changed. trials: number of replicates.
      level: one-sided confidence level.
    """

    rate: float
    upper: float
    mis_lower: float
    changes: int
    trials: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {k: (int(v) if k in ("changes", "trials") else float(v)) for k, v in self._asdict().items()}


def swap_bound(changed, *, level: float = 0.975) -> SwapBound:
    """Swap-coupling upper bound on ``Delta``: ``MIS >= 1 - u`` (theory.md section 10).

    Replicate ``i`` trains on ``D_i`` and on ``D_i'`` (its first point replaced by a fresh one, warm-started from the
    first fit); ``changed[i] = (R_i != R_i')``, comparing every published number (codes and scale codes). By the
    coupling inequality ``Delta = TV(law(R, Z_1), law(R') x P) <= P(R != R')``, and the replicates are independent
    Bernoulli trials, so with ``k`` changes out of ``N`` the one-sided Clopper-Pearson limit
    ``u = Beta_{level}(k + 1, N - k)`` (``u = 1`` when ``k = N``) bounds ``Delta`` with probability at least
    ``level``. A continuous release changes in every replicate, giving ``u = 1`` and the lower end 0.

    Args:
      changed: ``(R,)`` bools (or 0/1 values), one trial per replicate.
      level: one-sided confidence level of ``u``; 0.975 is the swap end's share of a joint 95% bracket.

    Returns:
      :class:`SwapBound`.

    >>> b = swap_bound([False] * 99 + [True], level=0.975)
    >>> round(b.rate, 2), round(b.upper, 4)
    (0.01, 0.0545)
    """
    level = _check_level(level)
    arr = np.asarray(changed)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"changed must be a non-empty 1-D array (one trial per replicate), got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError("changed must hold booleans or 0/1 values")
        arr = arr.astype(bool)
    k, n = int(arr.sum()), int(arr.size)
    upper = 1.0 if k == n else float(_sps.beta.ppf(level, k + 1.0, n - k))
    upper = min(max(upper, 0.0), 1.0)
    return SwapBound(rate=k / n, upper=upper, mis_lower=1.0 - upper, changes=k, trials=n, level=level)


# --------------------------------------------------------------------------------------------------------------------
# Held-out attack end
# --------------------------------------------------------------------------------------------------------------------


def mean_lower_limit(values, *, level: float = 0.975) -> tuple[float, float, float, float]:
    """One-sided confidence limits for the mean of independent values in ``[-1, 1]`` (theory.md section 10).

    Two valid bounds, each at one-sided level ``1 - alpha / 2`` (``alpha = 1 - level``), so that their better one is
    valid at ``level`` by a union bound:

    - Hoeffding: ``mean -/+ sqrt(2 log(2 / alpha) / N)`` (range 2);
    - empirical Bernstein (Maurer & Pontil 2009, Theorem 4, rescaled from ``[0, 1]`` to ``[-1, 1]``):
      ``mean -/+ (sqrt(2 V log(4 / alpha) / N) + 14 log(4 / alpha) / (3 (N - 1)))`` with ``V`` the unbiased sample
      variance. It wins when the values vary little (rare membership signal), Hoeffding when they spread widely.

    Args:
      values: ``(N,)`` independent values in ``[-1, 1]``, ``N >= 2``.
      level: one-sided level of each returned limit.

    Returns:
      ``(lower, upper, hoeffding_lower, bernstein_lower)``: ``lower = max`` of the two lower limits and ``upper``
      the ``min`` of the two upper ones, clipped to ``[-1, 1]``.
    """
    level = _check_level(level)
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"values must hold at least 2 numbers, got {x.size}")
    if np.any(~np.isfinite(x)) or np.any(np.abs(x) > 1.0 + 1e-12):
        raise ValueError("values must be finite and lie in [-1, 1]")
    n = x.size
    alpha = 1.0 - level
    mean = float(x.mean())
    hoeff = math.sqrt(2.0 * math.log(2.0 / alpha) / n)
    log_term = math.log(4.0 / alpha)
    var = float(x.var(ddof=1))
    bern = math.sqrt(2.0 * var * log_term / n) + 14.0 * log_term / (3.0 * (n - 1))
    width = min(hoeff, bern)
    lower = min(max(mean - width, -1.0), 1.0)
    upper = min(max(mean + width, -1.0), 1.0)
    return lower, upper, max(mean - hoeff, -1.0), max(mean - bern, -1.0)


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
    if size < 4:
        raise ValueError(f"{name}: need at least 4 to split into two halves of >= 2, got {size}")
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
        raise ValueError(f"need at least 2 evaluation replicates with both classes present, got {values.size}")
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
    """
    level = _check_level(level)
    m = _finite_matrix(member_scores, "member_scores")
    nm = _finite_matrix(nonmember_scores, "nonmember_scores")
    if m.shape[0] != nm.shape[0]:
        raise ValueError(
            f"member_scores and nonmember_scores need the same replicate count, got {m.shape[0]} and {nm.shape[0]}"
        )
    sel, ev = _split(_numpy_rng(key), m.shape[0], "replicates")
    t, d, _ = _best_threshold(m[sel].ravel(), nm[sel].ravel())
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
    """
    level = _check_level(level)
    s = _finite_matrix(scores, "scores")
    mem = np.asarray(membership)
    if mem.shape != s.shape:
        raise ValueError(f"membership must have the shape of scores {s.shape}, got {mem.shape}")
    mem = mem.astype(bool)
    rng = _numpy_rng(key)
    sel, ev = _split(rng, s.shape[0], "replicates")
    if split_targets:
        sel_t, ev_t = _split(rng, s.shape[1], "targets")
    else:
        sel_t = ev_t = np.arange(s.shape[1])
    sa, ma = s[np.ix_(sel, sel_t)], mem[np.ix_(sel, sel_t)]
    if not ma.any() or ma.all():
        raise ValueError("membership: the selection half needs both members and non-members")
    t, d, _ = _best_threshold(sa[ma], sa[~ma])
    sb, mb = s[np.ix_(ev, ev_t)], mem[np.ix_(ev, ev_t)]
    flag = _flag(sb, t, d)
    n_in, n_out = mb.sum(axis=1), (~mb).sum(axis=1)
    keep = (n_in > 0) & (n_out > 0)
    tpr = (flag & mb).sum(axis=1)[keep] / n_in[keep]
    fpr = (flag & ~mb).sum(axis=1)[keep] / n_out[keep]
    return _result(
        tpr - fpr, level, sel, ev[keep], sel_t if split_targets else None, ev_t if split_targets else None, t, d
    )


# --------------------------------------------------------------------------------------------------------------------
# The bracket
# --------------------------------------------------------------------------------------------------------------------


def bracket_levels(num_attacks: int, *, level: float = 0.95) -> tuple[float, float]:
    """One-sided levels of the two ends of a joint ``level`` bracket (theory.md section 10).

    Half of ``1 - level`` goes to the swap end, half to the attack end, Bonferroni-split over its ``num_attacks``
    section-1 attacks: ``(1 - (1 - level) / 2, 1 - (1 - level) / (2 J))``.

    Args:
      num_attacks: ``J >= 1``, the number of section-1 attacks whose lower limits enter the upper end.
      level: joint confidence level.

    Returns:
      ``(swap_level, attack_level)``, for :func:`swap_bound` and for each attack's held-out lower limit.
    """
    level = _check_level(level)
    if isinstance(num_attacks, bool) or not isinstance(num_attacks, (int, np.integer)) or num_attacks < 1:
        raise ValueError(f"num_attacks must be a positive int, got num_attacks={num_attacks!r}")
    half = (1.0 - level) / 2.0
    return 1.0 - half, 1.0 - half / int(num_attacks)


class MisBracket(NamedTuple):
    """A certified MIS interval (theory.md section 10).

    Attributes:
      lower: ``max(0, 1 - u)`` (0 for a continuous release). upper: ``min(1, 1 - max(0, a))``.
      swap_upper: ``u``, the bound on ``Delta`` from the swap coupling.
      attack_lower: ``a``, the largest held-out lower limit over the attacks (``-inf`` without attacks).
      level: the joint confidence level.
    """

    lower: float
    upper: float
    swap_upper: float
    attack_lower: float
    level: float

    def to_list(self) -> list[float]:
        """``[lower, upper]``, the report's ``mis_bracket``."""
        return [float(self.lower), float(self.upper)]


def mis_bracket(swap_upper, heldout_lower_limits=(), *, continuous: bool = False, level: float = 0.95) -> MisBracket:
    """``mis_bracket = [max(0, 1 - u), min(1, 1 - max(0, a))]`` (theory.md section 10).

    ``u`` bounds ``Delta`` from above with probability ``1 - (1 - level) / 2`` (:func:`swap_bound` at
    ``bracket_levels(J, level=level)[0]``); ``a = max_j a_j`` over the section-1 attacks' held-out lower limits, each
    at ``bracket_levels(J, level=level)[1]`` (:func:`heldout_advantage`, :func:`heldout_advantage_embedded`), so all
    ``J`` hold together with probability ``1 - (1 - level) / 2`` (Bonferroni) and the max is a lower bound on
    ``Delta``. Jointly, ``1 - u <= MIS <= 1 - a`` with probability at least ``level``, in or out of the asymptotic
    regime. A continuous release (section 9) has lower end 0 (every swap changes it, ``u = 1``). Without attacks the
    upper end is 1. The two ends can cross only by a failure of one of the bounds (probability ``<= 1 - level``);
    they are then reported as they are.

    Args:
      swap_upper: ``u`` in ``[0, 1]`` (e.g. ``swap_bound(...).upper``).
      heldout_lower_limits: the attacks' lower limits ``a_j`` in ``[-1, 1]`` (e.g. ``HeldoutAdvantage.lower``).
      continuous: the release is continuous: lower end 0 whatever ``u``.
      level: the joint level the inputs were computed for (recorded).

    Returns:
      :class:`MisBracket`.

    >>> mis_bracket(0.02, [0.001, -0.03]).to_list()
    [0.98, 0.999]
    """
    level = _check_level(level)
    u = float(swap_upper)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"swap_upper must lie in [0, 1], got swap_upper={swap_upper!r}")
    lims = np.asarray(list(heldout_lower_limits), dtype=np.float64).ravel()
    if np.any(np.isnan(lims)) or np.any(lims > 1.0):
        raise ValueError(f"heldout_lower_limits must be numbers <= 1, got {heldout_lower_limits!r}")
    a = float(lims.max()) if lims.size else -math.inf
    lower = 0.0 if continuous else max(0.0, 1.0 - u)
    upper = min(1.0, 1.0 - max(0.0, a))
    return MisBracket(lower=round(lower, 15), upper=round(upper, 15), swap_upper=u, attack_lower=a, level=level)


def bracket_report(changed, attack_bounds=None, *, continuous: bool = False, level: float = 0.95) -> dict[str, Any]:
    """A quantizer's bracket entries for a report, in one call (theory.md section 10).

    Runs :func:`swap_bound` at the swap end's level and :func:`mis_bracket` with the attacks' lower limits. The
    lower limits must have been computed at ``bracket_levels(J, level=level)[1]`` with ``J = len(attack_bounds)``
    (``attack_metrics(..., bound_level=...)``'s ``advantage_bound``, or ``HeldoutAdvantage.lower``).

    Args:
      changed: ``(R,)`` bools, ``R_i != R_i'`` under the swap (every published number compared).
      attack_bounds: mapping attack name -> lower limit (or a sequence of them) over the section-1 attacks; ``None``
        or empty: no attack, upper end 1.
      continuous: the release is continuous (lower end 0).
      level: joint level.

    Returns:
      ``{"mis_bracket": [lower, upper], "mis_empirical_upper": upper, "mis_bracket_level": level,
      "swap": SwapBound.to_dict(), "attack_level": the per-attack level}``.
    """
    values = list((attack_bounds or {}).values()) if isinstance(attack_bounds, dict) else list(attack_bounds or [])
    swap_level, attack_level = bracket_levels(max(1, len(values)), level=level)
    swap = swap_bound(changed, level=swap_level)
    b = mis_bracket(swap.upper, values, continuous=continuous, level=level)
    return {
        "mis_bracket": b.to_list(),
        "mis_empirical_upper": float(b.upper),
        "mis_bracket_level": float(level),
        "swap": swap.to_dict(),
        "attack_level": float(attack_level),
    }


# --------------------------------------------------------------------------------------------------------------------
# Regime of the asymptotic MIS
# --------------------------------------------------------------------------------------------------------------------


def asymptotic_regime(sqrt_n_c_min, *, threshold: float = REGIME_THRESHOLD):
    """Whether the asymptotic MIS of section 5 can be read: ``min_k sqrt(n) c_k >= threshold`` (default 1.5).

    theory.md section 5. The criterion is derived from the exact Gaussian-mean values
    (:func:`~qmis_jax.stats.exact.gaussian_mean_quantized_delta` against
    :func:`~qmis_jax.stats.exact.gaussian_mean_mis_approximation`, 1-D grid of step 1, ``Z ~ N(mu, 1)``, one dominant
    competitor with ``c = 0.5 - |mu|`` and the other at ``0.5 + |mu|``)::

        sqrt(n) c_min   mu=0.2   mu=0.3   mu=0.4  mu=0.45  mu=0.48     (approximation / exact)
            0.25            --       --       --     0.26     0.26
            0.50            --       --     0.43     0.44     0.44
            0.75            --     0.57     0.56     0.56     0.56
            1.00          0.73     0.65     0.66     0.66     0.66
            1.25          0.74     0.72     0.72     0.72     0.72
            1.50          0.77     0.77     0.77     0.77     0.77
            1.75          0.81     0.81     0.81     0.81     0.81
            2.00          0.84     0.84     0.84     0.84     0.84
            2.50          0.88     0.89     0.89     0.89     0.89
            3.00          0.91     0.91     0.91     0.91       --
            4.00          0.95     0.95     0.95     0.95       --

    (entries at the ``n`` nearest the given ``sqrt(n) c``, ``n >= 10``). The ratio depends on ``sqrt(n) c_min``
    almost alone: at most 0.74 up to 1.25, at least 0.80 from 1.75 on (0.84 at 2, 0.95 at 4). The threshold 1.5
    sits in the middle of that transition (ratio 0.77): the flag is False wherever the approximation is more than
    30% under the exact value and True wherever it is within 20% of it, on this family, with room on both sides.

    With several competitors of comparable ``c_k`` the sum of section 5 over-counts and the ratio can exceed 1 in
    the regime (``mu = 0``, two equal competitors: 1.19 at ``n = 10``, 1.38 to 1.54 from ``n = 30`` on), or be
    accurate early by compensation (``mu = 0.1``, ``n = 10``: ``sqrt(n) c_min = 1.26``, ratio 0.98, flag False).
    The flag does not cover those (section 8); it says only that every event is rare enough for the Gaussian tail
    to mean something. Outside the regime the bracket of section 10 is the number to read.

    Args:
      sqrt_n_c_min: ``min_k sqrt(n) c_k`` (e.g. :attr:`~qmis_jax.stats.mis.MisApprox.sqrt_n_c_min`): a number or an
        array. NaN (no valid competitor, a continuous release) gives False.
      threshold: the criterion (keep the default unless re-deriving it).

    Returns:
      ``bool`` for a scalar input, a bool array otherwise.

    >>> asymptotic_regime(2.24), asymptotic_regime(0.45)
    (True, False)
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got threshold={threshold!r}")
    x = np.asarray(sqrt_n_c_min, dtype=np.float64)
    out = ~np.isnan(x) & (x >= threshold)
    return bool(out) if out.ndim == 0 else out
