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
parameters) follow the ``2p`` element events under both PTQs, and ``r`` is the minimum over both.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qmis_jax._checks import positive_int
from qmis_jax.quantizers import get as _get_quantizer
from qmis_jax.quantizers import is_continuous, tree_codes

from .margins import (
    competitors,
    gap_stats,
    loss_differences,
    rtn_differences,
    rtn_margins,
    scale_differences,
    scale_margins,
)
from .mis import mis_asymptotic
from .options import PTQ_METHODS, IndicatorOptions
from .ptq import ptq_loss, ptq_loss_batched, ptq_rtn
from .rates import cramer_rate, gaussian_rate, indicator
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


class PopulationAudit(NamedTuple):
    """Population indicator and asymptotic MIS of one quantizer (theory.md sections 4-6).

    Attributes:
      r: scalar ``r_pop = min_k I_k`` at the population release.
      release: the population release ``theta_0`` (pytree).
      codes: its int32 codes in ``theta*``'s codebook (pytree): a replicate's release "is the same" iff its codes
        are equal (Monte Carlo flip rate).
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


def no_exponential_security(q, ptq: str, params=None, skip=None) -> bool:
    """Whether a release of ``q`` under ``ptq`` has only polynomial security (``r = 0``, theory.md sections 4 and
    9): the one rule of :func:`qmis_jax.quantizers.is_continuous` (continuous values, a float32 scale, a skipped
    leaf, stochastic round-to-nearest)."""
    return is_continuous(q, params, skip=skip, ptq=ptq)


def _codes_only(q, ptq: str) -> bool:
    """The rule before section 9, for the codes' own rate ``r_codes``: continuous values or stochastic RTN."""
    return bool(q.continuous or (ptq == "rtn" and q.stochastic))


class _Events(NamedTuple):
    """A release's events as parallel rows: gaps or margins ``delta``, their ``sigma`` and ``valid`` flags ``(K,)``,
    the linearised contributions ``D`` ``(K, n)`` (or None), and the ok flag of the statistics behind them."""

    delta: Array
    sigma: Array
    valid: Array
    D: Array | None
    ok: Array


def _with_scale_events(q, problem, params, x, y, weights, events: _Events, opts: IndicatorOptions) -> _Events:
    """Append the scale code's events (theory.md section 9) to the code events of a loss-PTQ release.

    The margins need the sandwich ``Sigma`` at ``params`` (HC0 on ``(x, y)``); for Cramer rates their linearised
    contributions extend ``D``. Nothing changes without a discrete scale format.
    """
    if not q.discrete_scale:
        return events
    skip, chunk_size, D = opts.skip, opts.chunk_size, events.D
    cov, cov_ok = sandwich_covariance_flagged(problem.loss, params, x, y, weights=weights)
    m, s, v = scale_margins(q, params, cov, skip=skip, chunk_size=chunk_size)
    if D is not None:
        if opts.method == "cramer":
            D_s, _ = scale_differences(q, problem.loss, params, x, y, skip=skip, weights=weights, chunk_size=chunk_size)
        else:
            D_s = jnp.zeros((m.shape[0], D.shape[1]), D.dtype)
        D = jnp.concatenate([D, D_s.astype(D.dtype)])
    dtype = events.delta.dtype
    return _Events(
        jnp.concatenate([events.delta, m.astype(dtype)]),
        jnp.concatenate([events.sigma, s.astype(dtype)]),
        jnp.concatenate([events.valid, v]),
        D,
        events.ok & cov_ok,
    )


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


def _statistics(
    q, problem, params, x, y, weights, key, opts: IndicatorOptions, select=None, rtn_samples=False, released=None
):
    """Release, ``(delta, sigma, valid)``, the samples ``D`` (or None), moves and an ok flag.

    ``select``: an optional sample ``(x_s, y_s)`` on which the loss-PTQ release is chosen, the gaps being estimated
    on ``(x, y)`` (theory.md section 6: on one sample ``delta_k >= 0`` by construction). ``rtn_samples``: also
    return the RTN events' linearised contributions ``D`` (their correlations enter the joint flip probability).
    ``released``: ``(release, n_moves)`` already computed (:func:`_release` or its batched form) instead of the PTQ.
    """
    glm = _glm(problem, opts.differences)
    skip, chunk_size = opts.skip, opts.chunk_size
    if opts.ptq == "loss":
        xs, ys, ws = (x, y, weights) if select is None else (*select, None)
        release, n_moves = _release(q, problem, params, xs, ys, ws, key, opts) if released is None else released
        moves = competitors(q, release, params, skip=skip)
        D = loss_differences(problem.loss, release, moves, x, y, **glm, chunk_size=chunk_size, method=opts.differences)
        valid = moves.valid
        delta, sigma = gap_stats(D, valid, weights=weights)
        events = _Events(delta, sigma, valid, D, jnp.asarray(True))
        delta, sigma, valid, D, ok = _with_scale_events(q, problem, params, x, y, weights, events, opts)
    else:
        release, n_moves = _release(q, problem, params, x, y, weights, key, opts) if released is None else released
        cov, ok = sandwich_covariance_flagged(problem.loss, params, x, y, weights=weights)
        delta, sigma, valid = rtn_margins(q, params, cov, skip=skip, chunk_size=chunk_size)
        D = None
        if opts.method == "cramer" or rtn_samples:
            D, _ = rtn_differences(q, problem.loss, params, x, y, skip=skip, weights=weights, chunk_size=chunk_size)
    finite = jnp.all(jnp.where(valid, jnp.isfinite(delta) & jnp.isfinite(sigma), True))
    finite = finite & jnp.all(jnp.isfinite(ravel_pytree(params)[0]))  # NaN parameters have no neighbours at all
    return release, delta, sigma, valid, D, n_moves, ok & finite


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
      released: ``(release, n_moves)`` of this model already computed on this data with these options
        (:func:`ptq_release_batched`), used instead of running the PTQ again.
      **indicator: or those fields as keywords (``ptq="rtn"``...), not both.

    Returns:
      :class:`SingleAudit`.

    >>> import jax
    >>> from qmis_jax.problems import gaussian_mean
    >>> from qmis_jax.quantizers import uniform
    >>> problem = gaussian_mean(mu=[0.3])
    >>> x, y = problem.sample(jax.random.key(0), 500)
    >>> audit = single_model_indicator(uniform(step=1.0), problem, problem.solve(x, y, y + 1), x, y)
    >>> audit.delta.shape, bool(audit.r_interval[0] <= audit.r_hat <= audit.r_interval[1])
    ((2,), True)
    """
    opts = _indicator_options(options, indicator)
    q = _get_quantizer(q)
    check_data(x, y, weights)
    return _single_core(q, problem, params, x, y, weights, key, opts, released)


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _single_core(q, problem, params, x, y, weights, key, opts: IndicatorOptions, released=None):
    n, z, method, cap = x.shape[0], opts.z, opts.method, opts.cap
    stats_ = _statistics(q, problem, params, x, y, weights, key, opts, released=released)
    release, delta, sigma, valid, D, n_moves, ok = stats_
    dtype = delta.dtype
    n_eff = _effective_n(weights, n, dtype)
    half = jnp.where(valid, z * sigma / jnp.sqrt(n_eff), 0.0)
    capped = jnp.zeros(valid.shape, bool)
    if method == "gaussian":
        rates = gaussian_rate(delta, sigma)
        lo_rates = gaussian_rate(delta - half, sigma)
        hi_rates = gaussian_rate(delta + half, sigma)
    else:
        k = valid.shape[0]
        stacked = jnp.concatenate([D, D - half[:, None], D + half[:, None]])  # one batched solve for all three
        cr = cramer_rate(stacked, jnp.tile(valid, 3), weights=weights, cap=cap)
        rates, capped = cr.rate[:k], cr.capped[:k]
        lo_rates, hi_rates = cr.rate[k : 2 * k], cr.rate[2 * k :]
    flat = no_exponential_security(q, opts.ptq, params, opts.skip)
    # a statistic that is not finite (NaN parameters, NaN losses) gives NaN, never a spurious +inf or 0
    bad = ~ok
    r_hat = jnp.where(bad, jnp.nan, indicator(rates, valid, continuous=flat))
    r_codes = jnp.where(bad, jnp.nan, indicator(rates, valid, continuous=_codes_only(q, opts.ptq)))
    r_interval = jnp.where(
        bad,
        jnp.nan,
        jnp.stack([indicator(lo_rates, valid, continuous=flat), indicator(hi_rates, valid, continuous=flat)]),
    )
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
        ok=ok,
        r_codes=r_codes,
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
    **indicator,
) -> PopulationAudit:
    """Population indicator ``r_pop`` and asymptotic MIS at ``theta*`` from a large fresh sample (section 6).

    ``ptq="loss"``: the population release is the loss-minimising PTQ of ``theta*`` with the population loss
    replaced by the mean loss on ``(x_big, y_big)`` (codebook fixed by ``theta*``); ``delta_k``, ``sigma_k`` (and
    the Cramer rates) come from its competitors' loss differences on the big sample. ``ptq="rtn"``: the release is
    ``Q(theta*)``; the margins use ``Sigma = sandwich_covariance(problem.loss, theta*, x_big, y_big)`` at ``theta*``
    (so ``Cov(theta_hat) ~ Sigma / n``, entering through ``sqrt(n)`` in ``p_k``) and the delta method. Then
    ``r = min_k I_k`` (section 4) and ``mis_asymptotic = 1 - sum_k p_k f_k`` for training sets of size ``n``
    (section 5). Never average ``exp(-n r_hat)`` over replicates instead (section 6).

    Args:
      q: the quantizer (or a preset name).
      problem: the :class:`~qmis_jax.problems.Problem`.
      theta_star: ``theta*`` (pytree), e.g. the replicate mean or ``problem.population(key)``.
      x_big: ``(m, ...)`` a large fresh sample. y_big: ``(m,)``.
      n: training-set size of the replicates (for ``p_k``).
      key: PRNG key for stochastic quantizers.
      select: a second, independent fresh sample ``(x, y)`` on which the loss-PTQ population release is chosen
        (its gaps are then estimated on ``(x_big, y_big)``; on one sample ``delta_k >= 0`` by construction,
        theory.md section 6). None: both on ``(x_big, y_big)``.
      flip_key: PRNG key of the joint flip probability's importance sampling
        (:func:`~qmis_jax.stats.union_probability`; None: a fixed key).
      options, **indicator: the indicator's settings, as in :func:`single_model_indicator` (``z`` unused; the
        Cramer cap defaults to ``log(m)``).

    Returns:
      :class:`PopulationAudit`.

    Raises:
      ValueError: unknown ``ptq``/``method``, bad ``n``, or (``"rtn"``) a singular Hessian at ``theta*``.
    """
    opts = _indicator_options(options, indicator)
    ptq = opts.ptq
    n = positive_int("n", n)
    q = _get_quantizer(q)
    check_data(x_big, y_big)
    if select is not None:
        check_data(*select)
    skip = opts.skip
    release, delta, sigma, valid, rates, capped, r, r_codes, approx, n_moves, ok = _population_core(
        q, problem, theta_star, x_big, y_big, select, key, flip_key, n, opts
    )
    if not bool(ok):
        what = "H (the mean Hessian at theta_star) is singular or non-finite" if ptq == "rtn" else "a statistic"
        raise ValueError(f"theta_star: {what}; the population indicator is not defined there")
    codes = tree_codes(q, release, theta_star, skip=skip)
    return PopulationAudit(
        r=r,
        release=release,
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
        applicable=approx.applicable,
        n_moves=n_moves,
        n=n,
        ptq=ptq,
        method=opts.method,
        r_codes=r_codes,
        continuous=no_exponential_security(q, ptq, theta_star, skip),
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 9))
def _population_core(q, problem, theta_star, x_big, y_big, select, key, flip_key, n, opts: IndicatorOptions):
    release, delta, sigma, valid, D, n_moves, ok = _statistics(
        q, problem, theta_star, x_big, y_big, None, key, opts, select=select, rtn_samples=True
    )
    method, cap = opts.method, opts.cap
    flat = no_exponential_security(q, opts.ptq, theta_star, opts.skip)
    capped = jnp.zeros(valid.shape, bool)
    if method == "gaussian":
        rates = gaussian_rate(delta, sigma)
    else:
        cr = cramer_rate(D, valid, cap=cap)
        rates, capped = cr.rate, cr.capped
    r = indicator(rates, valid, continuous=flat)
    r_codes = indicator(rates, valid, continuous=_codes_only(q, opts.ptq))
    approx = mis_asymptotic(n, delta, sigma, valid, method=method, D=D, continuous=flat, cap=cap, key=flip_key)
    return release, delta, sigma, valid, rates, capped, r, r_codes, approx, n_moves, ok
