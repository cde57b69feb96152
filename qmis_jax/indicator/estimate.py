"""Estimating the indicator ``r_Q^n``: single-model audit and population study (theory.md section 6).

- :func:`single_model_indicator`: what a practitioner has, one trained model and its training set. Plug-in
  ``delta_k``, ``sigma_k`` from the per-example loss differences on the training set (``ptq="loss"``) or the
  margins ``m_k`` and ``Sigma_hat`` (``ptq="rtn"``), giving ``r_hat`` with an interval from the sampling error of
  ``delta_hat_k``. Pure JAX: ``vmap`` it over replicates, or call :func:`single_model_indicator_batched`.
- :func:`population_indicator`: ``theta*`` estimated elsewhere (replicate mean, or known) and a large fresh
  sample; gives ``r_pop`` and the asymptotic MIS approximation of section 5 for training sets of size ``n``.

Continuous releases have ``r = 0`` (sections 4 and 9), decided by the one rule
:func:`qmis_jax.quantizers.is_continuous`: continuous values (fp32, pruning), a scale published in float32 (every
absmax / absmean family with ``scale_format="f32"``), a leaf left unquantized by ``skip``, and stochastic
round-to-nearest releases (``ptq="rtn"`` with a stochastic quantizer: the law of the release is then a smooth
function of ``theta_hat``, each coordinate rounding up with probability ``frac(theta_hat_j / s)``, so a member shifts
it by ``O(1/n)``). With ``ptq="loss"`` only the starting point of the descent is random and the release is a local
minimiser like any other. The codes-only rate is kept as ``r_codes`` (labelled as such, never the indicator).

With a discrete scale format (``bf16``, ``f16``, ``e8m0``) the scale code is one more coordinate of the release:
its events (section 9, :func:`~qmis_jax.indicator.margins.scale_margins`, with the sandwich ``Sigma`` at the
parameters) join the others. Under loss PTQ the events are those of the path that reached the release
(:mod:`~qmis_jax.indicator.events`, section 3(a)): its competitors, every other comparison of the descent, the
starts one threshold away that lead elsewhere and those that come back (paired with their new path's comparisons);
``r`` is the minimum over all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from qmis_jax._checks import positive_int
from qmis_jax.quantizers import get as _get_quantizer
from qmis_jax.quantizers import is_continuous, tree_codes, tree_published

from . import _population
from .events import KIND, EventSet, single_loss_events
from .events import count_events as _count_events
from .margins import (
    rtn_differences,
    rtn_margins,
)
from .mis import mis_asymptotic
from .options import PTQ_METHODS, IndicatorOptions
from .ptq import (
    DescentPath,
    _check_sweeps,
    descent_path,
    descent_path_batched,
    ptq_loss,
    ptq_loss_batched,
    ptq_rtn,
)
from .rates import cramer_rate, gaussian_rate, indicator
from .rates import indicator as indicator_fn
from .sandwich import check_chunk, check_data, sandwich_covariance_flagged

Array = jax.Array
PyTree = Any

__all__ = [
    "PTQ_METHODS",
    "PopulationAudit",
    "SingleAudit",
    "no_exponential_security",
    "population_indicator",
    "single_model_indicator",
    "single_model_indicator_batched",
]


class SingleAudit(NamedTuple):
    """Single-model audit of one release (theory.md section 6); every field gains a leading axis under ``vmap``.

    Attributes:
      r_hat: scalar plug-in indicator ``min_k I_k``.
      r_interval: ``(2,)`` interval for ``r``: each ``delta_hat_k`` (or ``m_hat_k``) moved by
        ``-/+ z sigma_hat_k / sqrt(n)`` and the rates recomputed (the rates are monotone in the gap, the minimum
        is monotone in each rate). It reflects the sampling error of the gaps only, pointwise per competitor.
      release: the released pytree.
      delta: ``(K,)`` gaps ``delta_hat_k`` (``ptq="loss"``) or margins ``m_hat_k`` (``ptq="rtn"``); NaN invalid.
      sigma: ``(K,)`` ``sigma_hat_k`` or ``s_hat_k`` (asymptotic scale, ``Sigma_hat`` not divided by ``n``).
      valid: ``(K,)`` bool, the competitor / threshold exists.
      rates: ``(K,)`` per-competitor rates ``I_k``.
      capped: ``(K,)`` bool, Cramer rate capped at ``log(n)`` (section 8); False for the Gaussian method.
      n_moves: int, descent moves accepted by ``ptq="loss"`` (0 for ``"rtn"``).
      ok: bool, False when a statistic was not finite or (``"rtn"``) ``H_hat`` was singular: ``r_hat`` is then
        not meaningful.
      r_codes: scalar, the codes' own rate ``min_k I_k`` even when the release is continuous (section 9): a label
        for reports, never the indicator (``r_hat`` is 0 for a continuous release).
      kind: ``(K,)`` int32, each event's kind (:data:`~qmis_jax.indicator.events.EVENT_KINDS`).
      settled: bool, the loss-PTQ descent stopped because a sweep moved nothing (False: ``max_sweeps``, ``r = 0``).
    """

    r_hat: Array
    r_interval: Array
    release: PyTree
    delta: Array
    sigma: Array
    valid: Array
    rates: Array
    capped: Array
    n_moves: Array
    ok: Array
    r_codes: Array = None
    kind: Array = None
    settled: Array = None


class PopulationAudit(NamedTuple):
    """Population indicator and asymptotic MIS of one quantizer (theory.md sections 4-6).

    Attributes:
      r: scalar ``r_pop = min_k I_k`` at the population release.
      release: the population release ``theta_0`` (pytree).
      codes: its int32 codes in ``theta*``'s codebook (pytree).
      delta, sigma: ``(K,)`` population gaps and spreads (or RTN margins ``m_k`` and ``s_k``).
      valid: ``(K,)`` bool.
      rates: ``(K,)`` ``I_k``.
      capped: ``(K,)`` bool, Cramer rates capped at ``log(m)`` (section 8).
      mis_asymptotic: scalar ``1 - sum_k p_k f_k`` for training sets of size ``n`` (NaN where not applicable).
      p: ``(K,)`` ``p_k``. f: ``(K,)`` ``f_k``.
      flip_rate_predicted: ``P(any competitor event)`` under the joint Gaussian of the competitors' mean loss
        differences (a probability, theory.md section 5), to compare with the Monte Carlo flip rate.
      flip_union_bound: ``min(1, sum_k p_k)``, the union bound (not a probability unclipped).
      sqrt_n_c_min: ``min_k sqrt(n) c_k``, the criterion of the asymptotic regime.
      applicable: bool, the exponential approximation applies (not continuous, every valid ``c_k > 0``).
      n_moves: descent moves of the population PTQ (0 for ``"rtn"``).
      n: the training-set size the approximation is for.
      ptq: ``"loss"`` or ``"rtn"``. method: ``"gaussian"`` or ``"cramer"``.
      r_codes: the codes' own rate (section 9), equal to ``r`` for a discrete release; never the indicator.
      continuous: whether the release is continuous (:func:`qmis_jax.quantizers.is_continuous`): ``r = 0``.
      r_se, flip_se: standard errors of ``r`` and of ``flip_rate_predicted`` from the gap sample's size.
      events: ``{kind: count}`` of the events behind ``r`` (:data:`~qmis_jax.indicator.events.EVENT_KINDS`).
      r_zero_reason: when ``r = 0``, why (a continuous part, the event or leaf responsible, a descent that did not
        settle, a population path not determined); else None.
      sample_size: points of the gap sample the statistics used.
      kind, coord: ``(K,)`` each event's kind and the coordinate it concerns.
      settled: the population descent stopped because a sweep moved nothing.
      determined: every decision of the population path has the same sign on the gap sample as on ``select``.
      published: what it publishes in ``theta*``'s codebook (:func:`~qmis_jax.quantizers.tree_published`), the
        Monte Carlo flip's reference (theory.md sections 9-10).
    """

    r: Array
    release: PyTree
    codes: PyTree
    delta: Array
    sigma: Array
    valid: Array
    rates: Array
    capped: Array
    mis_asymptotic: Array
    p: Array
    f: Array
    flip_rate_predicted: Array
    applicable: Array
    n_moves: Array
    n: int
    ptq: str
    method: str
    r_codes: Array = None
    continuous: bool = False
    flip_union_bound: Array = None
    sqrt_n_c_min: Array = None
    r_se: float = None
    flip_se: float = None
    events: dict = None
    r_zero_reason: str | None = None
    sample_size: int = None
    kind: Any = None
    coord: Any = None
    settled: bool = True
    determined: bool = True
    published: PyTree = None


def no_exponential_security(q, ptq: str, params=None, skip=None) -> bool:
    """Whether a release of ``q`` under ``ptq`` has only polynomial security (``r = 0``, theory.md sections 4 and
    9): the one rule of :func:`qmis_jax.quantizers.is_continuous` (continuous values, a float32 scale, a skipped
    leaf, stochastic round-to-nearest)."""
    return is_continuous(q, params, skip=skip, ptq=ptq)


def _codes_only(q, ptq: str) -> bool:
    """The rule before section 9, for the codes' own rate ``r_codes``: continuous values or stochastic RTN."""
    return bool(q.continuous or (ptq == "rtn" and q.stochastic))


def _glm(problem, differences: str) -> dict[str, Any]:
    """The GLM structure of ``problem`` (design, margin loss, ridge penalty) for the exact fast paths, or Nones."""
    if differences == "exact" and problem.design is not None and problem.margin_loss is not None:
        return {"design": problem.design, "margin_loss": problem.margin_loss, "penalty": problem.penalty}
    return {"design": None, "margin_loss": None, "penalty": None}


def _release(q, problem, params, x, y, weights, key, opts: IndicatorOptions):
    """The release and its loss-PTQ move count (0 for RTN); pure, ``vmap``-safe."""
    if opts.ptq == "rtn":
        return ptq_rtn(q, params, key=key, skip=opts.skip), jnp.int32(0)
    glm = _glm(problem, opts.differences)
    return ptq_loss(
        q, problem.loss, params, x, y, key=key, skip=opts.skip, weights=weights, max_sweeps=opts.max_sweeps, **glm
    )


def ptq_release_batched(q, problem, params: PyTree, x: Array, y: Array, *, keys=None, options: IndicatorOptions):
    """:func:`ptq_release` of ``R`` models on their own data sets at once, with the move counts: loss PTQ by
    :func:`~qmis_jax.indicator.ptq_loss_batched` (settled models leave the batch), RTN by ``vmap``.

    Args:
      q, problem: as in :func:`single_model_indicator`. params: ``R`` stacked models. x: ``(R, n, ...)``.
      y: ``(R, n)``. keys: ``(R,)`` keys of a stochastic quantizer. options: :class:`IndicatorOptions`.

    Returns:
      ``(releases, n_moves)``, to pass one replicate at a time as ``released`` of :func:`single_model_indicator`.
    """
    q = _get_quantizer(q)
    if options.ptq == "rtn":  # nothing to wait for: the one-model release, vmapped
        return jax.vmap(lambda p, xx, yy, k: _release(q, problem, p, xx, yy, None, k, options))(params, x, y, keys)
    glm = _glm(problem, options.differences)
    return ptq_loss_batched(
        q, problem.loss, params, x, y, keys=keys, skip=options.skip, max_sweeps=options.max_sweeps, **glm
    )


def ptq_paths_batched(q, problem, params: PyTree, x: Array, y: Array, *, keys=None, options: IndicatorOptions):
    """The loss-PTQ descents of ``R`` models on their own data sets, with every comparison they made
    (:func:`~qmis_jax.indicator.descent_path_batched`; settled models leave the batch).

    Args:
      q, problem, params, x, y, keys, options: as in :func:`ptq_release_batched`; ``options.ptq`` must be
        ``"loss"``.

    Returns:
      :class:`~qmis_jax.indicator.DescentPath` with a leading axis ``R``, to pass one replicate at a time as
      ``released`` of :func:`single_model_indicator`.
    """
    if options.ptq != "loss":
        raise ValueError(f"options.ptq must be 'loss' for descent paths, got {options.ptq!r}")
    glm = _glm(problem, options.differences)
    return descent_path_batched(
        _get_quantizer(q), problem.loss, params, x, y, keys=keys, skip=options.skip, max_sweeps=options.max_sweeps,
        **glm,
    )  # fmt: skip


def ptq_release(q, problem, params, x, y, *, key=None, weights=None, options=None, **indicator) -> PyTree:
    """The release :func:`single_model_indicator` audits, alone: loss PTQ on ``(x, y)`` (with ``weights``) or
    round-to-nearest, as ``options.ptq`` says, without the indicator's statistics.

    Args:
      q, problem, params, x, y, key, weights, options, **indicator: as in :func:`single_model_indicator`.

    Returns:
      the release, a pytree like ``params``; ``vmap`` it over replicates like :func:`single_model_indicator`.

    >>> import jax
    >>> from qmis_jax.problems import gaussian_mean
    >>> from qmis_jax.quantizers import uniform
    >>> problem = gaussian_mean(mu=[0.3])
    >>> x, y = problem.sample(jax.random.key(0), 500)
    >>> params = problem.solve(x, y, y + 1)
    >>> release = ptq_release(uniform(step=1.0), problem, params, x, y)
    >>> bool(jax.numpy.all(release == single_model_indicator(uniform(step=1.0), problem, params, x, y).release))
    True
    """
    opts = _indicator_options(options, indicator)
    q = _get_quantizer(q)
    check_data(x, y, weights)
    return _release(q, problem, params, x, y, weights, key, opts)[0]


def _statistics(q, problem, params, x, y, weights, key, opts: IndicatorOptions, released=None):
    """Release, its :class:`~qmis_jax.indicator.events.EventSet` on ``(x, y)`` and the loss-PTQ move count.

    Loss PTQ: every event of the descent that chose the release on this data (:func:`single_loss_events`).
    RTN: the thresholds and scale codes of section 3(b) and 9, with the sandwich at ``params``.
    ``released``: the release's :class:`~qmis_jax.indicator.ptq.DescentPath` (loss PTQ) or ``(release, n_moves)``
    (RTN) already computed on this data with these options, used instead of running the PTQ again.
    """
    skip, chunk_size = opts.skip, opts.chunk_size
    if opts.ptq == "loss":
        glm = _glm(problem, opts.differences)
        path = released
        if not isinstance(path, DescentPath):
            path = descent_path(q, problem.loss, params, x, y, key=key, skip=skip, weights=weights,
                                max_sweeps=opts.max_sweeps, **glm)  # fmt: skip
        theta, unravel = ravel_pytree(params)
        release = unravel(path.release.astype(theta.dtype))
        events = single_loss_events(q, problem, params, path, x, y, weights, opts, glm,
                                    start_descents=opts.start_descents)  # fmt: skip
        n_moves = path.moves
    else:
        release, n_moves = _release(q, problem, params, x, y, weights, key, opts) if released is None else released
        cov, ok = sandwich_covariance_flagged(problem.loss, params, x, y, weights=weights)
        delta, sigma, valid = rtn_margins(q, params, cov, skip=skip, chunk_size=chunk_size)
        p = int(ravel_pytree(params)[0].shape[0])
        kind = jnp.where(jnp.arange(valid.shape[0]) < 2 * p, KIND["threshold"], KIND["scale"]).astype(jnp.int32)
        coord = jnp.where(jnp.arange(valid.shape[0]) < 2 * p, jnp.arange(valid.shape[0]) // 2, -1).astype(jnp.int32)
        D = None
        if opts.method == "cramer":
            D, _ = rtn_differences(q, problem.loss, params, x, y, skip=skip, weights=weights, chunk_size=chunk_size)
        finite = jnp.all(jnp.where(valid, jnp.isfinite(delta) & jnp.isfinite(sigma), True))
        events = EventSet(delta, sigma, valid, kind, coord, D, ok & finite, jnp.asarray(True))
    ok = events.ok & jnp.all(jnp.isfinite(ravel_pytree(params)[0]))  # NaN parameters have no neighbours at all
    return release, events._replace(ok=ok), n_moves


def _indicator_options(options: IndicatorOptions | None, indicator: dict[str, Any]) -> IndicatorOptions:
    """``options``, or the record built from the keyword fields (``ptq=``, ``method=``...), not both."""
    if options is None:
        return IndicatorOptions(**indicator)
    if not isinstance(options, IndicatorOptions):
        raise ValueError(f"options must be an IndicatorOptions, got {type(options).__name__}")
    if indicator:
        raise ValueError(f"pass either options or its fields, not both (got options and {sorted(indicator)})")
    return options


def _effective_n(weights, n: int, dtype):
    if weights is None:
        return jnp.asarray(n, dtype)
    w = jnp.asarray(weights, dtype)
    return jnp.sum(w) ** 2 / jnp.sum(w**2)


def single_model_indicator(
    q,
    problem,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    key: Array | None = None,
    weights: Array | None = None,
    options: IndicatorOptions | None = None,
    released: tuple[PyTree, Array] | None = None,
    **indicator,
) -> SingleAudit:
    """Single-model audit: plug-in ``r_hat`` and an interval from one trained model and its training set.

    theory.md section 6. ``ptq="loss"``: the release is :func:`~qmis_jax.indicator.ptq_loss` on the training set,
    its competitors' loss differences ``D_k(Z_i)`` on the training set give ``delta_hat_k``, ``sigma_hat_k``
    (section 3(a)) and the rates ``I_k`` (``"gaussian"``: ``delta^2 / (2 sigma^2)``; ``"cramer"``: the empirical
    Chernoff rate, capped at ``log(n)``). ``ptq="rtn"``: round-to-nearest release, margins ``m_hat_k`` with
    ``s_hat_k`` from ``Sigma_hat`` (HC0 at ``params``) by the delta method (section 3(b)); ``"cramer"`` uses the
    linearised contributions of :func:`~qmis_jax.indicator.rtn_differences`. ``r_hat = min_k I_k`` (section 4).

    Interval: ``delta_hat_k -/+ z sigma_hat_k / sqrt(n)`` (Gaussian: rates at the shifted gaps; Cramer: rates of
    ``D_k -/+ z sigma_hat_k / sqrt(n)``), propagated through the monotone minimum. It is pointwise per
    competitor, not simultaneous, and ignores the error of ``sigma_hat_k`` and of the release itself.

    Pure JAX (no Python branching on data): ``jax.vmap`` it over replicates (params, data or weights), or use
    :func:`single_model_indicator_batched`.

    Args:
      q: the quantizer (or a preset name).
      problem: a :class:`~qmis_jax.problems.Problem` (its ``loss``, and ``design``/``margin_loss`` when present).
      params: the trained model ``theta_hat`` (it fixes the codebook).
      x: ``(n, ...)`` training inputs. y: ``(n,)`` targets.
      key: PRNG key for stochastic quantizers.
      weights: optional ``(n,)`` membership weights of a shared pool (statistics are weighted; ``n`` is the
        effective size ``(sum w)^2 / sum w^2``, the member count for 0/1 weights).
      options: the indicator's settings (:class:`~qmis_jax.indicator.IndicatorOptions`: ``ptq``, ``method``, ``z``,
        ``skip``, ``max_sweeps``, ``chunk_size``, ``cap`` (Cramer cap, default ``log(n)``), ``differences``
        (``"exact"``, or the ``"taylor"`` form for large models, section 6 "Cost")).
      released: this model's release already computed on this data with these options, used instead of running
        the PTQ again: its :class:`~qmis_jax.indicator.DescentPath` (loss PTQ, :func:`ptq_paths_batched`) or
        ``(release, n_moves)`` (RTN, :func:`ptq_release_batched`).
      **indicator: or those fields as keywords (``ptq="rtn"``...), not both.

    Returns:
      :class:`SingleAudit`.

    >>> import jax
    >>> from qmis_jax.problems import gaussian_mean
    >>> from qmis_jax.quantizers import uniform
    >>> problem = gaussian_mean(mu=[0.3])
    >>> x, y = problem.sample(jax.random.key(0), 500)
    >>> audit = single_model_indicator(uniform(step=1.0), problem, problem.solve(x, y, y + 1), x, y)
    >>> from qmis_jax.indicator.events import count_events
    >>> count_events(audit.kind, audit.valid), bool(audit.r_interval[0] <= audit.r_hat <= audit.r_interval[1])
    ({'release': 2, 'start_return': 2}, True)
    """
    opts = _indicator_options(options, indicator)
    q = _get_quantizer(q)
    check_data(x, y, weights)
    return _single_core(q, problem, params, x, y, weights, key, opts, released)


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _single_core(q, problem, params, x, y, weights, key, opts: IndicatorOptions, released=None):
    n, z, method, cap = x.shape[0], opts.z, opts.method, opts.cap
    release, ev, n_moves = _statistics(q, problem, params, x, y, weights, key, opts, released=released)
    delta, sigma, valid, D = ev.delta, ev.sigma, ev.valid, ev.D
    dtype = delta.dtype
    n_eff = _effective_n(weights, n, dtype)
    half = jnp.where(valid, z * sigma / jnp.sqrt(n_eff), 0.0)
    capped = jnp.zeros(valid.shape, bool)
    rates = gaussian_rate(delta, sigma)
    lo_rates = gaussian_rate(delta - half, sigma)
    hi_rates = gaussian_rate(delta + half, sigma)
    if method == "cramer" and D is not None:  # the events with rows: empirical Chernoff rates (section 4)
        k = D.shape[0]
        h = half[:k, None]
        stacked = jnp.concatenate([D, D - h, D + h])  # one batched solve for all three
        cr = cramer_rate(stacked, jnp.tile(valid[:k], 3), weights=weights, cap=cap)
        rates, capped = rates.at[:k].set(cr.rate[:k]), capped.at[:k].set(cr.capped[:k])
        lo_rates, hi_rates = lo_rates.at[:k].set(cr.rate[k : 2 * k]), hi_rates.at[:k].set(cr.rate[2 * k :])
    flat = no_exponential_security(q, opts.ptq, params, opts.skip)
    # a statistic that is not finite (NaN parameters, NaN losses) gives NaN, never a spurious +inf or 0; a descent
    # stopped at max_sweeps is not known to be a local minimiser: r = 0 (section 4)
    bad = ~ev.ok
    unsettled = ~ev.settled

    def r_of(rt, continuous):
        return jnp.where(bad, jnp.nan, jnp.where(unsettled, 0.0, indicator(rt, valid, continuous=continuous)))

    r_hat = r_of(rates, flat)
    r_codes = r_of(rates, _codes_only(q, opts.ptq))
    r_interval = jnp.stack([r_of(lo_rates, flat), r_of(hi_rates, flat)])
    return SingleAudit(
        r_hat=r_hat,
        r_interval=r_interval,
        release=release,
        delta=delta,
        sigma=sigma,
        valid=valid,
        rates=rates,
        capped=capped,
        n_moves=n_moves,
        ok=ev.ok,
        r_codes=r_codes,
        kind=ev.kind,
        settled=ev.settled,
    )


def single_model_indicator_batched(
    q,
    problem,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    weights: Array | None = None,
    key: Array | None = None,
    batch_size: int | None = None,
    **options,
) -> SingleAudit:
    """:func:`single_model_indicator` for ``R`` replicates: ``vmap`` in chunks of ``batch_size`` (``lax.map``).

    Data are one shared pool ``x (N, ...)``, ``y (N,)`` with ``(R, N)`` membership ``weights``, or one training set
    per replicate ``x (R, n, ...)``, ``y (R, n)`` (shared when ``y`` is 1-D). Replicate ``i`` uses the key
    ``fold_in(key, i)``, so results do not depend on ``batch_size``.

    Args:
      q, problem: as in :func:`single_model_indicator`.
      params: pytree with a leading replicate axis ``R``.
      x, y: shared pool or per-replicate data (see above).
      weights: ``(R, N)`` membership weights for a shared pool (or ``(R, n)``), optional.
      key: PRNG key (stochastic quantizers).
      batch_size: replicates evaluated at once (default: all).
      **options: keyword options of :func:`single_model_indicator` (``ptq``, ``method``, ``z``, ``skip``...).

    Returns:
      :class:`SingleAudit` whose fields have a leading axis ``R``.
    """
    check_chunk(batch_size, "batch_size")
    q = _get_quantizer(q)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one array")
    r = int(jnp.shape(leaves[0])[0])
    shared = jnp.ndim(y) == 1
    if not shared and (jnp.shape(y)[0] != r or jnp.shape(x)[0] != r):
        raise ValueError(f"per-replicate x, y need a leading axis R = {r}, got {jnp.shape(x)}, {jnp.shape(y)}")
    if weights is not None and jnp.shape(weights)[0] != r:
        raise ValueError(f"weights need a leading axis R = {r}, got weights.shape={jnp.shape(weights)}")
    keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(r))

    def one(args):
        prm, xx, yy, ww, kk = args
        if shared:
            xx, yy = x, y
        return single_model_indicator(q, problem, prm, xx, yy, weights=ww, key=kk, **options)

    xs = (params, None if shared else x, None if shared else y, weights, keys)
    if batch_size is None or batch_size >= r:
        return jax.vmap(one)(xs)
    return jax.lax.map(one, xs, batch_size=batch_size)


def population_indicator(
    q,
    problem,
    theta_star: PyTree,
    x_big: Array,
    y_big: Array,
    *,
    n: int,
    key: Array | None = None,
    select: tuple[Array, Array] | None = None,
    flip_key: Array | None = None,
    options: IndicatorOptions | None = None,
    more: Callable[[int], tuple[Array, Array]] | None = None,
    max_size: int | None = None,
    exact_star: bool = False,
    **indicator,
) -> PopulationAudit:
    """Population indicator ``r_pop`` and asymptotic MIS at ``theta*`` from large fresh samples (section 6).

    ``ptq="loss"``: the population release is the loss-minimising PTQ of ``theta*`` with the population loss
    replaced by the mean loss on ``select`` (or on ``(x_big, y_big)``), codebook fixed by ``theta*``. Its events
    (section 3(a), :mod:`~qmis_jax.indicator.events`) are every comparison of that descent, the start events that
    lead elsewhere and the scale code's events; their gaps ``delta_k``, ``sigma_k`` are estimated on
    ``(x_big, y_big)`` and, when ``more`` is given, on further fresh chunks ``more(1), more(2), ...`` until the
    predicted flip probability's relative standard error is at most 10% wherever ``sqrt(n) c_min <= 3.5`` (or
    ``max_size`` points are used). A path decision whose sign on that independent sample differs from the one
    taken on ``select`` gives ``r = 0`` ("population path not determined at this precision"); a descent that
    stops at ``max_sweeps`` gives ``r = 0`` too. ``ptq="rtn"``: the release is ``Q(theta*)``, its events the
    thresholds and scale codes with the sandwich ``Sigma`` at ``theta*`` (section 3(b)). Then ``r = min_k I_k``
    (section 4), ``mis_asymptotic = 1 - sum_k p_k f_k`` and the joint flip probability for training sets of size
    ``n`` (section 5), each event with its per-example influence row. ``r`` and the predicted flip carry standard
    errors from the sample size (delta method, ``se(c_k) = sqrt((1 + c_k^2 / 2) / m)``; the flip's is the sum of
    ``|dP / dc_k| se(c_k)``, conservative). Never average ``exp(-n r_hat)`` over replicates instead (section 6).

    Args:
      q: the quantizer (or a preset name).
      problem: the :class:`~qmis_jax.problems.Problem`.
      theta_star: ``theta*`` (pytree), e.g. ``problem.population(key)`` or the fit of a large fresh sample.
      x_big: ``(m, ...)`` a large fresh sample (the first chunk). y_big: ``(m,)``.
      n: training-set size of the replicates (for ``p_k``).
      key: PRNG key for stochastic quantizers.
      select: a second, independent fresh sample ``(x, y)`` on which the loss-PTQ population release is chosen
        (theory.md section 6: on one sample ``delta_k >= 0`` by construction). None: chosen on ``(x_big, y_big)``.
      flip_key: PRNG key of the joint flip probability's importance sampling (None: a fixed key).
      options, **indicator: the indicator's settings, as in :func:`single_model_indicator` (``z`` unused; the
        Cramer cap defaults to ``log`` of the rows' sample size).
      more: optional ``more(c) -> (x, y)``, fresh chunk ``c >= 1`` (independent of everything else).
      max_size: at most this many gap-sample points (default: ``1500 n``, what ``sqrt(n) c_min = 3.5`` needs).
      exact_star: ``theta_star`` is the population optimum exactly (``problem.population``): the per-example
        gradient at it, of mean 0, is then a control variate of the gap estimates (far fewer points needed).

    Returns:
      :class:`PopulationAudit`.

    Raises:
      ValueError: unknown ``ptq``/``method``, bad ``n``, or a singular Hessian at ``theta*``.
    """
    opts = _indicator_options(options, indicator)
    n = positive_int("n", n)
    q = _get_quantizer(q)
    check_data(x_big, y_big)
    if select is not None:
        check_data(*select)
    m0 = int(x_big.shape[0])
    max_size = positive_int("max_size", max(1500 * n, m0) if max_size is None else max_size)
    if more is None:
        max_size = m0
    pr = _population._Problem(q, problem.loss, _glm(problem, opts.differences), opts.skip,
                              _check_sweeps(opts.max_sweeps), opts.chunk_size, opts.differences)  # fmt: skip

    def chunks(c):
        return (x_big, y_big) if c == 0 else more(c)

    ev = _population.population_events(pr, theta_star, chunks, select, ptq=opts.ptq, n=n, key=key,
                                       max_size=max_size, first_size=m0, exact_star=exact_star)  # fmt: skip
    if not ev.ok:
        what = "H (the mean Hessian at theta_star) is singular or non-finite" if opts.ptq == "rtn" else "a statistic"
        raise ValueError(f"theta_star: {what}; the population indicator is not defined there")
    flat = no_exponential_security(q, opts.ptq, theta_star, opts.skip)
    if ev.delta.size == 0:  # no event at all (a continuous release): one invalid row keeps the shapes non-empty
        nan = np.full(1, np.nan)
        none, zero = np.zeros(1, bool), np.zeros(1, np.int32)
        ev = ev._replace(delta=nan, sigma=nan, valid=none, kind=zero, coord=zero, rows=np.zeros((1, 2)))
        ev = ev._replace(undetermined=none)
    dtype = jnp.result_type(ravel_pytree(theta_star)[0], jnp.float32)  # float64 where x64 is on
    delta, sigma = jnp.asarray(ev.delta, dtype), jnp.asarray(ev.sigma, dtype)
    valid = jnp.asarray(ev.valid, bool)
    rows = jnp.asarray(ev.rows, dtype)
    capped = jnp.zeros(valid.shape, bool)
    if opts.method == "gaussian":
        rates = gaussian_rate(delta, sigma)
    else:
        cr = cramer_rate(rows, valid, cap=opts.cap)
        rates, capped = cr.rate, cr.capped
    approx = mis_asymptotic(n, delta, sigma, valid, method=opts.method, D=rows, continuous=flat, cap=opts.cap,
                            key=flip_key)  # fmt: skip
    determined = not bool(np.any(ev.undetermined))
    r_codes = indicator_fn(rates, valid, continuous=_codes_only(q, opts.ptq))
    r = indicator_fn(rates, valid, continuous=flat)
    reason = _population.zero_reason(q, theta_star, opts, ev, flat, np.asarray(rates))
    if not ev.settled or not determined:
        r = jnp.zeros_like(r)
    r_se, flip_se = _population.standard_errors(n, ev, float(r), flat, key=flip_key)
    codes = tree_codes(q, ev.release, theta_star, skip=opts.skip)
    return PopulationAudit(
        r=r,
        release=ev.release,
        codes=codes,
        delta=delta,
        sigma=sigma,
        valid=valid,
        rates=rates,
        capped=capped,
        mis_asymptotic=approx.mis,
        p=approx.p,
        f=approx.f,
        flip_rate_predicted=approx.flip_probability,
        flip_union_bound=approx.flip_union_bound,
        sqrt_n_c_min=approx.sqrt_n_c_min,
        applicable=approx.applicable & bool(ev.settled and determined),
        n_moves=jnp.int32(ev.n_moves),
        n=n,
        ptq=opts.ptq,
        method=opts.method,
        r_codes=r_codes,
        continuous=flat,
        r_se=r_se,
        flip_se=flip_se,
        events=_count_events(ev.kind, ev.valid),
        r_zero_reason=reason if float(r) == 0.0 else None,
        sample_size=ev.sample_size,
        kind=ev.kind,
        coord=ev.coord,
        settled=ev.settled,
        determined=determined,
        published=tree_published(q, ev.release, theta_star, skip=opts.skip),
    )
