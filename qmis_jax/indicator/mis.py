"""Asymptotic MIS approximation ``MIS ~ 1 - sum_k p_k f_k`` (theory.md section 5).

With ``c_k = delta_k / sigma_k`` (loss-minimising PTQ) or ``c_k = m_k / s_k`` (round-to-nearest):

- ``method="gaussian"``: ``p_k = Phi(-sqrt(n) c_k)``, ``f_k = 4 Phi(c_k / 2) - 2``;
- ``method="cramer"``: Bahadur-Rao ``p_k = exp(-n I_k) / (t_k* tau_k sqrt(2 pi n))`` and
  ``f_k = E |w_k(Z) - 1|`` with the tilted weights ``w_k(z) = exp(-t_k* D_k(z)) / E exp(-t_k* D_k(Z))``,
  both from the empirical law of the loss differences ``D_k``.

``p_k`` is the probability that the release moves through competitor ``k``; ``f_k`` (twice the total variation
between the law of ``D_k`` and its tilt) how much one member moves that chance. With one dominant competitor
``sum_k p_k f_k`` is asymptotically exact; with several it is, at leading order, an upper bound on ``Delta``.

The predicted flip probability is the chance that ANY competitor event happens. ``sum_k p_k`` is only a union bound
(it reached 4.35 in a study), and competitors are strongly correlated: the moves of one coordinate down and up are
nearly exclusive events, moves of two coordinates with correlated features nearly the same event. The means
``mean_i D_k(Z_i)`` are jointly about Gaussian, ``N(delta, C / n)`` with ``C = Cov(D_j, D_k)`` (section 5), and
:func:`union_probability` estimates ``P(any k: mean_i D_k(Z_i) < 0)`` from it by importance sampling over the
union (:attr:`MisApprox.flip_probability`); ``min(1, sum_k p_k)`` is kept apart as
:attr:`MisApprox.flip_union_bound`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp, ndtr, ndtri

from .rates import _cramer_rate

Array = jax.Array

__all__ = ["MIS_METHODS", "MisApprox", "mis_asymptotic", "union_probability"]

MIS_METHODS = ("gaussian", "cramer")
FLIP_SAMPLES = 4096  # importance samples of union_probability
FLIP_TOP = 64  # competitors (largest p_k) whose correlations enter union_probability; the rest by union bound


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MisApprox:
    """Asymptotic MIS approximation at one release (theory.md section 5).

    A frozen dataclass registered as a pytree (``method`` is static metadata), so it can be returned from
    ``jit``/``vmap``-ed functions.

    Attributes:
      mis: scalar ``1 - sum_k p_k f_k`` clipped at 0; NaN where ``applicable`` is False.
      p: ``(K,)`` ``p_k``, the approximate probability that the release moves through ``k`` (0 where invalid).
      f: ``(K,)`` ``f_k`` in ``[0, 2]`` (0 where invalid).
      applicable: scalar bool. False when the release has continuous coordinates or a valid competitor has
        ``c_k <= 0`` (a tie, a coordinate on a threshold, a release that is not a strict local minimiser): then
        ``r = 0``, there is no exponential regime (section 4) and ``mis`` is NaN rather than a misleading number.
      flip_probability: scalar in ``[0, 1]``, the predicted probability that the release changes: ``P(any
        competitor event)`` under the joint Gaussian law of the competitors' mean loss differences
        (:func:`union_probability`; independent events when no samples ``D`` were given). 1 for a continuous
        release. Compare it with the Monte Carlo flip rate.
      flip_union_bound: scalar ``min(1, sum_k p_k)``, the union bound (1 for a continuous release).
      sqrt_n_c_min: scalar ``min_k sqrt(n) c_k`` over valid competitors (``+inf`` without any, NaN for a continuous
        release), the input of :func:`~qmis_jax.indicator.asymptotic_regime`.
      method: ``"gaussian"`` or ``"cramer"``, the formulas used for ``p_k`` and ``f_k``.
    """

    mis: Array
    p: Array
    f: Array
    applicable: Array
    flip_probability: Array
    flip_union_bound: Array
    sqrt_n_c_min: Array
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


def union_probability(
    key: Array | None,
    p: Array,
    valid: Array,
    *,
    D: Array | None = None,
    weights: Array | None = None,
    samples: int = FLIP_SAMPLES,
    top: int = FLIP_TOP,
) -> Array:
    """``P(any competitor event)`` under a Gaussian copula of the competitors' mean differences (theory.md s. 5).

    Competitor ``k`` moves the release when ``mean_i D_k(Z_i) < 0``. By the central limit theorem the means are
    jointly about Gaussian with covariance ``C / n``, ``C_jk = Cov(D_j(Z), D_k(Z))``, so with standardised
    ``Y_k ~ N(0, rho)`` (``rho`` the correlation matrix of the rows of ``D``) the events are ``Y_k < t_k`` with
    ``t_k = Phi^-1(p_k)`` (``= -sqrt(n) c_k`` for the Gaussian ``p_k``; other marginals, e.g. Bahadur-Rao, enter
    through the same copula). The union probability ``P = P(any k: Y_k < t_k)`` is estimated by importance sampling
    over the union (Owen, Maximov & Chertkov 2019): draw ``k`` with probability ``p_k / sum p``, then ``Y`` from its
    law given ``Y_k < t_k``, and use ``P = (sum_k p_k) E[1 / N(Y)]`` with ``N(Y) >= 1`` the number of events that
    happen. ``1 / N`` lies in ``[1/L, 1]``, so the standard error is at most ``sum_k p_k / (2 sqrt(samples))``
    (a fraction of ``P`` at most ``L / (2 sqrt(samples))``, and much less in practice); the estimate is kept in
    ``[max_k p_k, sum_k p_k]``, where ``P`` lies. Events
    that are the same event (correlation 1) count once; exclusive ones (one coordinate down and up) add up.

    Only the ``top`` competitors with the largest ``p_k`` enter the correlated computation; the others are added by
    the union bound (conservative, and negligible when their ``p_k`` are). Without ``D`` the events are taken
    as independent, ``rho = I`` (then ``P ~ 1 - prod_k (1 - p_k)``).

    Args:
      key: PRNG key of the importance sampling (``None``: a fixed key).
      p: ``(K,)`` marginal probabilities ``p_k`` in ``[0, 1]``.
      valid: ``(K,)`` bool, competitors that exist.
      D: optional ``(K, m)`` per-sample loss differences (or RTN contributions from
        :func:`~qmis_jax.indicator.rtn_differences`) whose row correlations are ``rho``.
      weights: optional ``(m,)`` column weights of ``D``.
      samples: importance samples. top: competitors whose correlations are used.

    Returns:
      Scalar in ``[0, min(1, sum_k p_k)]``.

    >>> import jax.numpy as jnp
    >>> row = jnp.array([[1.0, -1.0, 2.0, 0.5]])
    >>> p, valid = jnp.array([0.1, 0.1]), jnp.array([True, True])
    >>> round(float(union_probability(None, p, valid, D=jnp.concatenate([row, row]))), 6)  # the same event twice
    0.1
    >>> round(float(union_probability(None, p, valid, D=jnp.concatenate([row, -row]))), 6)  # exclusive events
    0.2
    """
    p = jnp.asarray(p)
    valid = jnp.asarray(valid)
    if p.ndim != 1 or valid.shape != p.shape:
        raise ValueError(f"p and valid must share one shape (K,), got {p.shape} and {valid.shape}")
    for name, v in (("samples", samples), ("top", top)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
    if D is not None:
        if jnp.ndim(D) != 2 or jnp.shape(D)[0] != p.shape[0]:
            raise ValueError(f"D must have shape ({p.shape[0]}, m), got D.shape={jnp.shape(D)}")
        if weights is not None and jnp.shape(weights) != (jnp.shape(D)[1],):
            raise ValueError(f"weights must have shape ({jnp.shape(D)[1]},), got weights.shape={jnp.shape(weights)}")
    key = jax.random.key(0) if key is None else key
    return _union_core(key, p, valid, D, weights, samples=samples, top=top)


@functools.partial(jax.jit, static_argnames=("samples", "top"))
def _union_core(key, p, valid, D, weights, *, samples, top):
    dtype = jnp.result_type(p, jnp.float32)
    pm = jnp.where(valid, jnp.clip(p.astype(dtype), 0.0, 1.0), 0.0)
    size = min(top, pm.shape[0])
    top_p, idx = jax.lax.top_k(pm, size)
    rest = jnp.sum(pm) - jnp.sum(top_p)
    live = top_p > 0
    t = jnp.clip(ndtri(jnp.clip(top_p, 0.0, 1.0)), -30.0, 30.0)
    eye = jnp.eye(size, dtype=dtype)
    if D is None:
        rho = eye
    else:
        rows = D[idx].astype(dtype)
        w = jnp.ones(rows.shape[1], dtype) if weights is None else weights.astype(dtype)
        w = w / jnp.sum(w)
        centred = rows - (rows @ w)[:, None]
        cov = (centred * w[None, :]) @ centred.T
        sd = jnp.sqrt(jnp.maximum(jnp.diag(cov), 0.0))
        ok = live & (sd > 0)
        safe = jnp.where(ok, sd, 1.0)
        rho = jnp.clip(cov / (safe[:, None] * safe[None, :]), -1.0, 1.0)
        rho = jnp.where(ok[:, None] & ok[None, :], rho, eye)
        rho = jnp.where(eye > 0, 1.0, rho)
    lam, vec = jnp.linalg.eigh(rho)
    root = vec * jnp.sqrt(jnp.maximum(lam, 0.0))[None, :]
    total = jnp.sum(top_p)
    k_pick, k_tail, k_rest = jax.random.split(key, 3)
    logits = jnp.where(live, jnp.log(jnp.where(live, top_p, 1.0)), -jnp.inf)
    picks = jax.random.categorical(k_pick, logits, shape=(samples,))
    tk = t[picks]
    u = jax.random.uniform(k_tail, (samples,), dtype, minval=jnp.finfo(dtype).tiny, maxval=1.0)
    yk = jnp.clip(ndtri(u * ndtr(tk)), tk - 10.0, tk)
    z = jax.random.normal(k_rest, (samples, size), dtype) @ root.T
    zk = jnp.take_along_axis(z, picks[:, None], axis=1)[:, 0]
    y = z + rho[:, picks].T * (yk - zk)[:, None]
    hits = (y < t[None, :]) & live[None, :]
    hits = hits | (jnp.arange(size)[None, :] == picks[:, None])
    est = total * jnp.mean(1.0 / jnp.sum(hits, axis=1))
    # P(union) lies in [max_k p_k, sum_k p_k]: clipping the estimate there only removes Monte Carlo error
    est = jnp.maximum(jnp.where(total > 0, est, 0.0) + rest, jnp.max(pm))
    return jnp.clip(est, 0.0, 1.0)


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
    key: Array | None = None,
) -> MisApprox:
    """Asymptotic MIS ``1 - sum_k p_k f_k`` of a quantized release trained on ``n`` examples (theory.md s. 5).

    ``method="gaussian"``: ``c_k = delta_k / sigma_k``, ``p_k = Phi(-sqrt(n) c_k)``,
    ``f_k = 4 Phi(c_k / 2) - 2``. Pass round-to-nearest margins ``(m_k, s_k)`` from
    :func:`qmis_jax.indicator.rtn_margins` as ``(delta, sigma)`` for the RTN variant ``c_k = m_k / s_k``.

    ``method="cramer"`` (needs the samples ``D``): with ``I_k``, ``t_k*``, ``tau_k`` from
    :func:`qmis_jax.indicator.cramer_rate`, ``p_k = exp(-n I_k) / (t_k* tau_k sqrt(2 pi n))`` (Bahadur-Rao,
    clipped at 1) and ``f_k = mean_i |w_k(Z_i) - 1|`` with ``w_k = exp(-t_k* D_k) / mean exp(-t_k* D_k)``.
    Where no sample has ``D_k < 0`` (``t_k* = inf``, section 8) ``p_k = exp(-n I_k)`` with the capped rate and
    ``f_k = 2 (1 - P_m(D_k = min D_k))``, the limit of the tilt; ``delta``/``sigma`` are then only used to
    report ``p_k`` of competitors that are not rare.

    ``mis`` is NaN and ``applicable`` False when ``continuous`` or when a valid ``c_k <= 0`` (section 4: ``r = 0``,
    no exponential security, so no exponential approximation either).

    The predicted flip probability ``flip_probability`` is ``P(any competitor event)`` (:func:`union_probability`)
    with the marginals ``p_k`` and the correlations of the rows of ``D`` (pass ``D`` with either method: loss
    differences for loss PTQ, :func:`~qmis_jax.indicator.rtn_differences` for RTN; without it the events are
    taken as independent); ``flip_union_bound = min(1, sum_k p_k)``. ``sqrt_n_c_min = min_k sqrt(n) c_k`` feeds
    :func:`~qmis_jax.indicator.asymptotic_regime`.

    Args:
      n: training-set size (int or scalar array).
      delta: ``(K,)`` gaps ``delta_k`` (or margins ``m_k``). sigma: ``(K,)`` ``sigma_k`` (or ``s_k``).
      valid: ``(K,)`` bool, competitors that exist.
      method: ``"gaussian"`` or ``"cramer"``.
      D: ``(K, m)`` loss differences, required by ``"cramer"``; with ``"gaussian"`` only their correlations are
        used (for ``flip_probability``).
      weights: optional ``(m,)`` weights of the columns of ``D``.
      continuous: the release has continuous coordinates.
      cap: rate cap passed to :func:`~qmis_jax.indicator.cramer_rate`.
      key: PRNG key of :func:`union_probability` (``None``: a fixed key).

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
    if method == "cramer" and D is None:
        raise ValueError("D (the (K, m) loss differences) is required for method='cramer', got D=None")
    if D is not None:
        if jnp.ndim(D) != 2 or jnp.shape(D)[0] != delta.shape[0]:
            raise ValueError(f"D must have shape ({delta.shape[0]}, m), got D.shape={jnp.shape(D)}")
        if weights is not None and jnp.shape(weights) != (jnp.shape(D)[1],):
            raise ValueError(f"weights must have shape ({jnp.shape(D)[1]},), got weights.shape={jnp.shape(weights)}")
        weights = jnp.ones((jnp.shape(D)[1],)) if weights is None else jnp.asarray(weights)
    if method == "cramer" and cap is not None and not isinstance(cap, jax.core.Tracer):
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ValueError(f"cap must be a positive number or None, got cap={cap!r}")
    cap = jnp.asarray(jnp.nan if cap is None else cap)
    key = jax.random.key(0) if key is None else key
    mis, p, f, applicable, flip, union, xmin = _mis_core(
        jnp.asarray(n), delta, sigma, valid, D, weights, jnp.asarray(continuous), cap, key, method=method
    )
    return MisApprox(
        mis=mis,
        p=p,
        f=f,
        applicable=applicable,
        flip_probability=flip,
        flip_union_bound=union,
        sqrt_n_c_min=xmin,
        method=method,
    )


@functools.partial(jax.jit, static_argnames=("method",))
def _mis_core(n, delta, sigma, valid, D, weights, continuous, cap, key, *, method):
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
    flip = _union_core(key, p, valid, D, weights, samples=FLIP_SAMPLES, top=FLIP_TOP)
    flip = jnp.where(continuous, 1.0, flip)
    union = jnp.where(continuous, 1.0, jnp.minimum(jnp.sum(p), 1.0))
    xmin = jnp.min(jnp.where(valid, jnp.sqrt(n) * c, jnp.inf))
    xmin = jnp.where(continuous, jnp.nan, xmin)
    return mis, p, f, applicable, flip, union, xmin
