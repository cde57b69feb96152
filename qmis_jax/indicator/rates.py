"""Large-deviation rates of release changes and the indicator ``r_Q^n = min_k I_k`` (theory.md section 4).

For each competitor (or threshold event) ``k`` a rate ``I_k`` with ``P(release changes through k) =
exp(-n I_k (1 + o(1)))``:

- :func:`gaussian_rate`: ``I_k = delta_k^2 / (2 sigma_k^2)`` (or ``m_k^2 / (2 s_k^2)`` for round-to-nearest);
- :func:`cramer_rate`: the Chernoff rate ``I_k = -min_{t >= 0} log E exp(-t D_k)`` of the empirical law of the
  loss differences, a batched 1-D convex minimisation solved by safeguarded Newton steps in ``lax`` loops, in
  log-sum-exp form;
- :func:`indicator`: the minimum over valid competitors, 0 for continuous releases and ties.

Conventions: every rate is 0 when the event is not rare (``delta_k <= 0``, a zero margin), ``+inf`` when it cannot
happen (``sigma_k = 0 < delta_k``), and NaN for invalid competitors (no adjacent level); consumers mask with
``valid``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

Array = jax.Array

__all__ = ["CramerRate", "cramer_rate", "gaussian_rate", "indicator"]

_MAX_ITER = 400


class CramerRate(NamedTuple):
    """Empirical Chernoff rates of ``K`` loss-difference samples (theory.md sections 4, 5 and 8).

    Attributes:
      rate: ``(K,)`` ``I_k = -min_{t >= 0} log mean_i w_i exp(-t D_ki)``, capped at ``cap``; NaN where invalid.
      t_star: ``(K,)`` the minimiser ``t_k*`` (0 when ``mean D_k <= 0``; ``+inf`` when no sample has
        ``D_k < 0``, the minimum then being approached only as ``t -> inf``).
      tau: ``(K,)`` standard deviation of ``D_k`` under the tilted law ``w_i exp(-t* D_ki) / E exp(-t* D_k)``
        (``tau_k`` of Bahadur-Rao, section 5); 0 when ``t_star`` is infinite.
      capped: ``(K,)`` bool, True where the uncapped rate exceeded ``cap`` (section 8: no sample has
        ``D_k <= 0``, so the sample cannot certify a rate beyond about ``log(m)``).
    """

    rate: Array
    t_star: Array
    tau: Array
    capped: Array


@jax.jit
def gaussian_rate(delta: Array, sigma: Array) -> Array:
    """Gaussian rate ``I = delta^2 / (2 sigma^2)`` of a release change (theory.md section 4).

    The probability that the mean of ``n`` loss differences with mean ``delta`` and standard deviation ``sigma``
    falls below 0 is ``Phi(-sqrt(n) delta / sigma) = exp(-n I (1 + o(1)))``. For round-to-nearest pass the
    margin ``m_k`` and its asymptotic standard deviation ``s_k``. ``I = 0`` when ``delta <= 0`` (the change is
    not rare), ``+inf`` when ``sigma = 0 < delta``, NaN where an input is NaN or ``sigma < 0`` (not a standard
    deviation; jitted, so it cannot raise).

    Args:
      delta: gaps (or margins), any shape.
      sigma: standard deviations, broadcastable with ``delta``.

    Returns:
      Rates with the broadcast shape.

    >>> round(float(gaussian_rate(0.2, 1.0)), 6)
    0.02
    """
    delta = jnp.asarray(delta)
    sigma = jnp.asarray(sigma)
    dtype = jnp.result_type(delta, sigma, jnp.float32)
    delta = delta.astype(dtype)
    sigma = sigma.astype(dtype)
    safe = jnp.where(sigma > 0, sigma, 1.0)
    rate = jnp.where(sigma > 0, 0.5 * (delta / safe) ** 2, jnp.inf)
    rate = jnp.where(delta > 0, rate, 0.0)
    return jnp.where(jnp.isnan(delta) | jnp.isnan(sigma) | (sigma < 0), jnp.nan, rate)


def _tilt_moments(u, x, lw):
    """Mean and variance of ``x`` under weights proportional to ``exp(lw - u x)``, and ``log E exp(-u x)``."""
    a = lw - u * x
    lse = logsumexp(a)
    pi = jnp.exp(a - lse)
    mean = jnp.sum(pi * x)
    var = jnp.sum(pi * (x - mean) ** 2)
    return mean, var, lse


def _cramer_one(d, lw, support):
    """Chernoff rate of one weighted sample ``d`` (log weights ``lw``, ``support = weight > 0``)."""
    dtype = d.dtype
    eps = jnp.finfo(dtype).eps
    pi0 = jnp.exp(lw)
    mean0 = jnp.sum(pi0 * d)
    var0 = jnp.sum(pi0 * (d - mean0) ** 2)
    dmin = jnp.min(jnp.where(support, d, jnp.inf))
    scale = jnp.max(jnp.where(support, jnp.abs(d), 0.0))
    scale = jnp.where(scale > 0, scale, 1.0)
    x = jnp.where(support, d / scale, 0.0)
    solve = (mean0 > 0) & (dmin < 0)

    # one safeguarded Newton loop on psi'(u) = -E_u[x], psi''(u) = Var_u[x] (E_u the tilted mean, decreasing in
    # u): keep a bracket lo < u* <= hi (hi = inf until a step overshoots), take the Newton step when it stays
    # inside, else bisect (or double while no upper end is known); the tilted moments of the current u are
    # carried in the state so each iteration evaluates them once
    def cond(s):
        lo, hi, u, mean, var, lse, step, i = s
        return solve & (i < _MAX_ITER) & (jnp.abs(step) > 4 * eps * jnp.maximum(u, 1.0))

    def body(s):
        lo, hi, u, mean, var, _, _, i = s
        lo = jnp.where(mean > 0, u, lo)
        hi = jnp.where(mean > 0, hi, u)
        cand = u + mean / jnp.where(var > 0, var, jnp.inf)
        inside = (cand > lo) & (cand < hi) & (var > 0)
        new = jnp.where(inside, cand, jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * u + 1.0))
        mean, var, lse = _tilt_moments(new, x, lw)
        return lo, hi, new, mean, var, lse, new - u, i + 1

    zero = jnp.zeros((), dtype)
    init = (zero, zero + jnp.inf, zero, mean0 / scale, var0 / scale**2, zero, zero + jnp.inf, 0)
    _, _, u, _, var_u, lse, _, _ = jax.lax.while_loop(cond, body, init)
    rate_solved = jnp.maximum(-lse, 0.0)

    # no sample below 0: the infimum is log P(D <= 0) as t -> inf (+inf when no sample sits at 0)
    mass0 = jnp.sum(jnp.where(support & (d <= 0), pi0, 0.0))
    rate_edge = jnp.where(mass0 > 0, -jnp.log(jnp.where(mass0 > 0, mass0, 1.0)), jnp.inf)
    edge = (mean0 > 0) & (dmin >= 0)

    rate = jnp.where(solve, rate_solved, jnp.where(edge, rate_edge, 0.0))
    t_star = jnp.where(solve, u / scale, jnp.where(edge, jnp.inf, 0.0))
    tau = jnp.where(solve, scale * jnp.sqrt(var_u), jnp.where(edge, 0.0, jnp.sqrt(var0)))
    return rate, t_star, tau


def cramer_rate(
    D: Array,
    valid: Array,
    *,
    weights: Array | None = None,
    cap: float | None = None,
) -> CramerRate:
    """Empirical Chernoff (Cramer) rates ``I_k = -min_{t >= 0} log mean_i exp(-t D_ki)`` (theory.md section 4).

    ``psi_k(t) = log sum_i w_i exp(-t D_ki)`` is convex with ``psi_k(0) = 0`` and ``psi_k'(0) = -mean D_k``:

    - ``mean D_k <= 0``: the minimum over ``t >= 0`` is at ``t = 0`` and ``I_k = 0``;
    - some ``D_ki < 0``: the root ``t*`` of the tilted mean is found by safeguarded Newton steps from ``t = 0``
      (bisection when a step leaves the bracket, doubling until the root is bracketed), in log-sum-exp form on
      ``D / max|D|``;
    - no ``D_ki < 0`` (section 8): the infimum is ``log P_m(D_k <= 0)``, approached as ``t -> inf``
      (``+inf`` when no sample has ``D_k <= 0``). A sample of effective size ``m`` cannot certify a rate beyond
      about ``log(m)``: the rate is capped at ``cap`` (default ``log(m_eff)``, ``m_eff = 1 / sum w_i^2``) and
      ``capped`` flags it.

    For Gaussian ``D_k`` it tends to ``delta_k^2 / (2 sigma_k^2)`` (the Gaussian rate). Batched over ``k`` with
    ``vmap``; jit-able.

    Args:
      D: ``(K, m)`` loss differences (one row per competitor, one column per example).
      valid: ``(K,)`` bool, competitors that exist; rows that are not valid get NaN.
      weights: optional ``(m,)`` non-negative example weights (default uniform).
      cap: largest rate reported (default ``log(m_eff)``).

    Returns:
      :class:`CramerRate` with ``(K,)`` fields.

    >>> import jax.numpy as jnp
    >>> out = cramer_rate(jnp.array([[-1.0, 1.0, 2.0]]), jnp.array([True]))
    >>> round(float(out.rate[0]), 4)  # -min_t log((e^t + e^-t + e^-2t) / 3)
    0.139
    """
    D = jnp.asarray(D)
    if D.ndim != 2:
        raise ValueError(f"D must have shape (K, m), got D.shape={D.shape}")
    k, m = D.shape
    valid = jnp.asarray(valid)
    if valid.shape != (k,):
        raise ValueError(f"valid must have shape ({k},), got valid.shape={valid.shape}")
    if m < 1:
        raise ValueError(f"D must hold at least one example per competitor, got D.shape={D.shape}")
    if weights is not None and jnp.shape(weights) != (m,):
        raise ValueError(f"weights must have shape ({m},), got weights.shape={jnp.shape(weights)}")
    if cap is not None and not isinstance(cap, jax.core.Tracer):
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ValueError(f"cap must be a positive number or None, got cap={cap!r}")
    dtype = jnp.result_type(D, jnp.float32)
    w = jnp.ones((m,), dtype) if weights is None else jnp.asarray(weights, dtype)
    cap_arr = jnp.asarray(jnp.nan if cap is None else cap, dtype)
    return _cramer_rate(D.astype(dtype), valid, w, cap_arr)


@jax.jit
def _cramer_rate(D, valid, w, cap):
    dtype = D.dtype
    w = w / jnp.sum(w)
    support = w > 0
    lw = jnp.where(support, jnp.log(jnp.where(support, w, 1.0)), -jnp.inf)
    cap_v = jnp.where(jnp.isnan(cap), jnp.log(1.0 / jnp.sum(w**2)), cap)
    rows = jnp.where(valid[:, None], D, 1.0)  # invalid rows: a harmless sample, masked below
    rate, t_star, tau = jax.vmap(_cramer_one, in_axes=(0, None, None))(rows, lw, support)
    capped = valid & (rate > cap_v)
    rate = jnp.minimum(rate, cap_v)
    nan = jnp.asarray(jnp.nan, dtype)
    return CramerRate(
        rate=jnp.where(valid, rate, nan),
        t_star=jnp.where(valid, t_star, nan),
        tau=jnp.where(valid, tau, nan),
        capped=capped,
    )


def indicator(rates: Array, valid: Array, *, continuous: bool | Array = False) -> Array:
    """The MIS indicator ``r_Q^n = min_k I_k`` over valid competitors (theory.md section 4).

    ``r = 0`` when the release has continuous coordinates (``continuous``: fp32, pruning without
    quantization), and whenever a valid competitor has ``delta_k <= 0`` or a coordinate sits on a threshold
    (those rates are 0 by construction of :func:`gaussian_rate` and :func:`cramer_rate`). ``r = +inf`` when no
    competitor is valid (the release cannot change by one move); NaN when a valid rate is NaN.

    Args:
      rates: ``(..., K)`` per-competitor rates.
      valid: ``(..., K)`` bool.
      continuous: bool (or bool array broadcastable to the leading shape), the release keeps continuous
        coordinates.

    Returns:
      ``(...)`` indicator values.

    >>> import jax.numpy as jnp
    >>> round(float(indicator(jnp.array([0.02, 0.32, 0.01]), jnp.array([True, True, False]))), 6)
    0.02
    """
    rates = jnp.asarray(rates)
    valid = jnp.asarray(valid)
    if rates.shape != valid.shape:
        raise ValueError(f"rates and valid must have the same shape, got {rates.shape} and {valid.shape}")
    return _indicator(rates, valid, jnp.asarray(continuous))


@jax.jit
def _indicator(rates, valid, continuous):
    r = jnp.min(jnp.where(valid, rates, jnp.inf), axis=-1)
    return jnp.where(continuous, jnp.zeros_like(r), r)
