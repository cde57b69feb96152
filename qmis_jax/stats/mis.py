"""Asymptotic MIS approximation ``MIS ~ 1 - sum_k p_k f_k`` (theory.md section 5).

With ``c_k = delta_k / sigma_k`` (loss-minimising PTQ) or ``c_k = m_k / s_k`` (round-to-nearest):

- ``method="gaussian"``: ``p_k = Phi(-sqrt(n) c_k)``, ``f_k = 4 Phi(c_k / 2) - 2``;
- ``method="cramer"``: Bahadur-Rao ``p_k = exp(-n I_k) / (t_k* tau_k sqrt(2 pi n))`` and
  ``f_k = E |w_k(Z) - 1|`` with the tilted weights ``w_k(z) = exp(-t_k* D_k(z)) / E exp(-t_k* D_k(Z))``,
  both from the empirical law of the loss differences ``D_k``.

``p_k`` is the probability that the release moves through competitor ``k``; ``f_k`` (twice the total variation
between the law of ``D_k`` and its tilt) how much one member moves that chance. With one dominant competitor
``sum_k p_k f_k`` is asymptotically exact; with several it is, at leading order, an upper bound on ``Delta``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp, ndtr

from .rates import _cramer_rate

Array = jax.Array

__all__ = ["MIS_METHODS", "MisApprox", "mis_asymptotic"]

MIS_METHODS = ("gaussian", "cramer")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MisApprox:
    """Asymptotic MIS approximation at one release (theory.md section 5).

    A frozen dataclass registered as a pytree (``method`` is static metadata), so it can be returned from
    ``jit``/``vmap``-ed functions.

    Attributes:
      mis: scalar ``1 - sum_k p_k f_k`` clipped at 0; NaN where ``applicable`` is False.
      p: ``(K,)`` ``p_k``, the approximate probability that the release moves through ``k`` (0 where invalid);
        ``sum_k p_k`` is the predicted flip rate.
      f: ``(K,)`` ``f_k`` in ``[0, 2]`` (0 where invalid).
      applicable: scalar bool. False when the release has continuous coordinates or a valid competitor has
        ``c_k <= 0`` (a tie, a coordinate on a threshold, a release that is not a strict local minimiser): then
        ``r = 0``, there is no exponential regime (section 4) and ``mis`` is NaN rather than a misleading number.
      method: ``"gaussian"`` or ``"cramer"``, the formulas used for ``p_k`` and ``f_k``.
    """

    mis: Array
    p: Array
    f: Array
    applicable: Array
    method: str = dataclasses.field(metadata={"static": True})


def _gaussian_pf(n, delta, sigma):
    safe = jnp.where(sigma > 0, sigma, 1.0)
    c = jnp.where(sigma > 0, delta / safe, jnp.where(delta > 0, jnp.inf, 0.0))
    p = ndtr(-jnp.sqrt(n) * c)
    f = 4.0 * ndtr(jnp.maximum(c, 0.0) / 2.0) - 2.0
    return c, p, f


def _tilted_f(d, lw, t):
    """``E |w - 1|`` with ``w = exp(-t d) / E exp(-t d)`` under log weights ``lw`` (finite ``t >= 0``)."""
    a = -t * d
    lz = logsumexp(a + lw)
    return jnp.sum(jnp.exp(lw) * jnp.abs(jnp.exp(a - lz) - 1.0))


def mis_asymptotic(
    n: int | Array,
    delta: Array,
    sigma: Array,
    valid: Array,
    *,
    method: str = "gaussian",
    D: Array | None = None,
    weights: Array | None = None,
    continuous: bool | Array = False,
    cap: float | None = None,
) -> MisApprox:
    """Asymptotic MIS ``1 - sum_k p_k f_k`` of a quantized release trained on ``n`` examples (theory.md s. 5).

    ``method="gaussian"``: ``c_k = delta_k / sigma_k``, ``p_k = Phi(-sqrt(n) c_k)``,
    ``f_k = 4 Phi(c_k / 2) - 2``. Pass round-to-nearest margins ``(m_k, s_k)`` from
    :func:`qmis_jax.stats.margins.rtn_margins` as ``(delta, sigma)`` for the RTN variant ``c_k = m_k / s_k``.

    ``method="cramer"`` (needs the samples ``D``): with ``I_k``, ``t_k*``, ``tau_k`` from
    :func:`qmis_jax.stats.rates.cramer_rate`, ``p_k = exp(-n I_k) / (t_k* tau_k sqrt(2 pi n))`` (Bahadur-Rao,
    clipped at 1) and ``f_k = mean_i |w_k(Z_i) - 1|`` with ``w_k = exp(-t_k* D_k) / mean exp(-t_k* D_k)``.
    Where no sample has ``D_k < 0`` (``t_k* = inf``, section 8) ``p_k = exp(-n I_k)`` with the capped rate and
    ``f_k = 2 (1 - P_m(D_k = min D_k))``, the limit of the tilt; ``delta``/``sigma`` are then only used to
    report ``p_k`` of competitors that are not rare.

    ``mis`` is NaN and ``applicable`` False when ``continuous`` or when a valid ``c_k <= 0`` (section 4: ``r = 0``,
    no exponential security, so no exponential approximation either).

    Args:
      n: training-set size (int or scalar array).
      delta: ``(K,)`` gaps ``delta_k`` (or margins ``m_k``). sigma: ``(K,)`` ``sigma_k`` (or ``s_k``).
      valid: ``(K,)`` bool, competitors that exist.
      method: ``"gaussian"`` or ``"cramer"``.
      D: ``(K, m)`` loss differences, required by ``"cramer"``.
      weights: optional ``(m,)`` weights of the columns of ``D``.
      continuous: the release has continuous coordinates.
      cap: rate cap passed to :func:`~qmis_jax.stats.rates.cramer_rate`.

    Returns:
      :class:`MisApprox`.

    >>> import jax.numpy as jnp
    >>> out = mis_asymptotic(100, jnp.array([0.2, 0.8]), jnp.array([1.0, 1.0]), jnp.array([True, True]))
    >>> round(float(out.mis), 5)  # 1 - Phi(-2) (4 Phi(0.1) - 2) - Phi(-8) (4 Phi(0.4) - 2)
    0.99638
    """
    if method not in MIS_METHODS:
        raise ValueError(f"method must be one of {MIS_METHODS}, got method={method!r}")
    delta = jnp.asarray(delta)
    sigma = jnp.asarray(sigma)
    valid = jnp.asarray(valid)
    if delta.ndim != 1 or sigma.shape != delta.shape or valid.shape != delta.shape:
        raise ValueError(
            f"delta, sigma and valid must share one shape (K,), got {delta.shape}, {sigma.shape}, {valid.shape}"
        )
    if method == "cramer":
        if D is None:
            raise ValueError("D (the (K, m) loss differences) is required for method='cramer', got D=None")
        if jnp.ndim(D) != 2 or jnp.shape(D)[0] != delta.shape[0]:
            raise ValueError(f"D must have shape ({delta.shape[0]}, m), got D.shape={jnp.shape(D)}")
        if weights is not None and jnp.shape(weights) != (jnp.shape(D)[1],):
            raise ValueError(f"weights must have shape ({jnp.shape(D)[1]},), got weights.shape={jnp.shape(weights)}")
        if cap is not None and not isinstance(cap, jax.core.Tracer):
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
                raise ValueError(f"cap must be a positive number or None, got cap={cap!r}")
        weights = jnp.ones((jnp.shape(D)[1],)) if weights is None else jnp.asarray(weights)
    else:
        D, weights = None, None
    cap = jnp.asarray(jnp.nan if cap is None else cap)
    mis, p, f, applicable = _mis_core(
        jnp.asarray(n), delta, sigma, valid, D, weights, jnp.asarray(continuous), cap, method=method
    )
    return MisApprox(mis=mis, p=p, f=f, applicable=applicable, method=method)


@functools.partial(jax.jit, static_argnames=("method",))
def _mis_core(n, delta, sigma, valid, D, weights, continuous, cap, *, method):
    dtype = jnp.result_type(delta, sigma, jnp.float32)
    delta = delta.astype(dtype)
    sigma = sigma.astype(dtype)
    n = n.astype(dtype)
    c, p, f = _gaussian_pf(n, delta, sigma)
    rare = c > 0
    if method == "cramer":
        D = D.astype(dtype)
        cr = _cramer_rate(D, valid, weights.astype(dtype), cap.astype(dtype))
        w = weights.astype(dtype) / jnp.sum(weights)
        support = w > 0
        lw = jnp.where(support, jnp.log(jnp.where(support, w, 1.0)), -jnp.inf)
        t = jnp.where(valid, cr.t_star, 0.0)
        finite_t = jnp.isfinite(t) & (t > 0)
        inf_t = valid & jnp.isinf(t)
        rows = jnp.where(valid[:, None], D, 0.0)
        f_tilt = jax.vmap(_tilted_f, in_axes=(0, None, 0))(rows, lw, jnp.where(finite_t, t, 0.0))
        dmin = jnp.min(jnp.where(support[None, :], rows, jnp.inf), axis=1)
        mass_min = jnp.sum(jnp.where(support[None, :] & (rows <= dmin[:, None]), w[None, :], 0.0), axis=1)
        rate = jnp.where(valid, cr.rate, 0.0)
        tau = jnp.where(finite_t, cr.tau, 1.0)
        br = jnp.exp(-n * rate) / (jnp.where(finite_t, t, 1.0) * tau * jnp.sqrt(2.0 * math.pi * n))
        p = jnp.where(finite_t, jnp.minimum(br, 1.0), jnp.where(inf_t, jnp.exp(-n * rate), p))
        f = jnp.where(finite_t, f_tilt, jnp.where(inf_t, 2.0 * (1.0 - mass_min), f))
        rare = valid & (rate > 0)
    p = jnp.where(valid, p, 0.0)
    f = jnp.where(valid, f, 0.0)
    finite_inputs = jnp.all(jnp.where(valid, jnp.isfinite(p) & jnp.isfinite(f), True))
    applicable = ~continuous & jnp.all(jnp.where(valid, rare, True)) & finite_inputs
    mis = jnp.clip(1.0 - jnp.sum(p * f), 0.0, 1.0)
    mis = jnp.where(applicable, mis, jnp.nan)
    return mis, p, f, applicable
