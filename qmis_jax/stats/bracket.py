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
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as _sps

from .intervals import check_level

__all__ = ["MisBracket", "SwapBound", "bracket_levels", "bracket_report", "mis_bracket", "swap_bound"]


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
    level = check_level(level)
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
# The bracket
# --------------------------------------------------------------------------------------------------------------------


def bracket_levels(num_attacks: int, *, level: float = 0.95) -> tuple[float, float]:
    """One-sided levels of the two ends of a joint ``level`` bracket (theory.md section 10).

    Half of ``1 - level`` goes to the swap end, half to the attack end, Bonferroni-split over its ``num_attacks``
    section-1 attacks: ``(1 - (1 - level) / 2, 1 - (1 - level) / (2 J))``.

    ``J`` counts the attacks whose limits enter the bracket, i.e. those that ran: an attack that cannot be held out
    at the audit's sizes (too few replicates, targets or shadows) contributes no limit and takes no share. Which
    attacks run depends on the sizes and the membership design only, never on the scores, so the count is fixed
    before the data are seen and the Bonferroni split over it stays valid.

    Args:
      num_attacks: ``J >= 1``, the number of section-1 attacks whose lower limits enter the upper end.
      level: joint confidence level.

    Returns:
      ``(swap_level, attack_level)``, for :func:`swap_bound` and for each attack's held-out lower limit.
    """
    level = check_level(level)
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
      heldout_lower_limits: the attacks' lower limits ``a_j`` in ``[-1, 1]`` (e.g. ``HeldoutAdvantage.lower``);
        ``None`` entries (attacks that did not run) are left out, and ``J`` counts the others.
      continuous: the release is continuous: lower end 0 whatever ``u``.
      level: the joint level the inputs were computed for (recorded).

    Returns:
      :class:`MisBracket`.

    >>> mis_bracket(0.02, [0.001, -0.03]).to_list()
    [0.98, 0.999]
    >>> mis_bracket(0.02, [0.001, None]).to_list()
    [0.98, 0.999]
    """
    level = check_level(level)
    u = float(swap_upper)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"swap_upper must lie in [0, 1], got swap_upper={swap_upper!r}")
    lims = np.asarray([v for v in heldout_lower_limits if v is not None], dtype=np.float64).ravel()
    if np.any(np.isnan(lims)) or np.any(lims > 1.0):
        raise ValueError(f"heldout_lower_limits must be numbers <= 1, got {heldout_lower_limits!r}")
    a = float(lims.max()) if lims.size else -math.inf
    lower = 0.0 if continuous else max(0.0, 1.0 - u)
    upper = min(1.0, 1.0 - max(0.0, a))
    return MisBracket(lower=round(lower, 15), upper=round(upper, 15), swap_upper=u, attack_lower=a, level=level)


def bracket_report(changed, attack_bounds=None, *, continuous: bool = False, level: float = 0.95) -> dict[str, Any]:
    """A quantizer's bracket entries for a report, in one call (theory.md section 10).

    Runs :func:`swap_bound` at the swap end's level and :func:`mis_bracket` with the attacks' lower limits. Only the
    attacks that ran count: an attack given as ``None`` (it could not be held out at this size) enters no limit and
    no Bonferroni share. The lower limits must have been computed at ``bracket_levels(J, level=level)[1]`` with
    ``J`` the number of attacks that ran (``attack_metrics(..., bound_level=...)``'s ``advantage_bound``, or
    ``HeldoutAdvantage.lower``).

    Args:
      changed: ``(R,)`` bools, ``R_i != R_i'`` under the swap (every published number compared).
      attack_bounds: mapping attack name -> lower limit, or ``None`` for an attack that did not run (or a sequence
        of limits and ``None``) over the section-1 attacks; ``None`` or empty: no attack, upper end 1.
      continuous: the release is continuous (lower end 0).
      level: joint level.

    Returns:
      ``{"mis_bracket": [lower, upper], "mis_empirical_upper": upper, "mis_bracket_level": level,
      "swap": SwapBound.to_dict(), "attack_level": the per-attack level, "attack_count": J,
      "attacks_in_bracket": the names of the attacks that entered (a mapping given; else None)}``.

    >>> d = bracket_report([False] * 99 + [True], {"loss": 0.01, "lira": None})
    >>> d["attack_count"], d["attacks_in_bracket"], d["attack_level"] == bracket_levels(1)[1]
    (1, ['loss'], True)
    """
    if isinstance(attack_bounds, Mapping):
        names = [k for k, v in attack_bounds.items() if v is not None]
        values = [attack_bounds[k] for k in names]
    else:
        names = None
        values = [v for v in (attack_bounds or []) if v is not None]
    swap_level, attack_level = bracket_levels(max(1, len(values)), level=level)
    swap = swap_bound(changed, level=swap_level)
    b = mis_bracket(swap.upper, values, continuous=continuous, level=level)
    return {
        "mis_bracket": b.to_list(),
        "mis_empirical_upper": float(b.upper),
        "mis_bracket_level": float(level),
        "swap": swap.to_dict(),
        "attack_level": float(attack_level),
        "attack_count": len(values),
        "attacks_in_bracket": names,
    }
