"""Confidence limits of the generic kind (theory.md sections 7 and 10): Clopper-Pearson intervals for a binomial
proportion, Hoeffding and empirical-Bernstein limits for a bounded mean.

Host-side NumPy/SciPy in float64: post-processing of at most a few million numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as _sps

__all__ = ["check_level", "clopper_pearson", "mean_lower_limit"]


def check_level(level: float) -> float:
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
    level = check_level(level)
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
    level = check_level(level)
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
