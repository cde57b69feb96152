"""Competitors of a quantized release, their loss differences, and round-to-nearest decision margins.

theory.md section 3. Parameters are one flat vector ``theta = ravel_pytree(params)[0]`` (``p`` coordinates);
competitor ``k`` of a release ``theta_0`` moves one coordinate to an adjacent codebook level. The ``K = 2p``
competitors are ordered by coordinate, lower move then upper move: ``k = 2j`` is coordinate ``j``'s move down,
``k = 2j + 1`` its move up; a move is invalid where no such level exists (an end of a clipped grid, a skipped leaf,
a continuous release).

- Loss-minimising PTQ (section 3(a)): ``D_k(z) = l(theta_k, z) - l(theta_0, z)``, ``delta_k = E D_k``,
  ``sigma_k^2 = Var D_k``; the release moves to ``theta_k`` only if ``mean_i D_k(Z_i) < 0``.
- Round-to-nearest (section 3(b)): coordinate ``j`` changes level when ``theta_hat_j`` crosses a threshold ``t``;
  margins ``g(theta) = theta_j - t_lower(theta)`` and ``t_upper(theta) - theta_j`` with the delta method for
  thresholds that depend on ``theta`` (a float32 scale, the sparse-ternary order statistics):
  ``s^2 = grad g^T Sigma grad g``.
- Scale events (section 9): with a discrete scale format the scale code is one more coordinate of the release;
  :func:`scale_margins` gives its events (they follow the ``2p`` element events in :func:`rtn_margins`).

Invalid competitors get NaN statistics; consumers mask them with ``valid``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qmis_jax.quantizers import get as get_quantizer
from qmis_jax.quantizers import tree_scale_margins, tree_thresholds

from .ptq import adjacent_levels, check_glm, is_sparse_ternary, sparse_moves
from .sandwich import check_chunk, check_data, default_chunk, hashable_skip, hessian_diag, normalized_weights

Array = jax.Array
PyTree = Any

__all__ = [
    "LOSS_DIFFERENCE_METHODS",
    "Moves",
    "competitors",
    "gap_stats",
    "loss_differences",
    "rtn_differences",
    "rtn_margins",
    "scale_differences",
    "scale_margins",
]

LOSS_DIFFERENCE_METHODS = ("exact", "taylor")


class Moves(NamedTuple):
    """The ``K = 2p`` single-coordinate moves of a release (coordinate ``j``: ``k = 2j`` down, ``2j + 1`` up).

    Attributes:
      index: ``(K,)`` int, the coordinate moved (``ravel_pytree`` order).
      step: ``(K,)`` the change of that coordinate, ``level - current value`` (0 where invalid).
      valid: ``(K,)`` bool, the adjacent level exists.
      index2, step2: ``(K,)`` a second coordinate and its change, for the swaps of sparse ternary (theory.md
        section 9); None for single-coordinate moves.
    """

    index: Array
    step: Array
    valid: Array
    index2: Array | None = None
    step2: Array | None = None


def competitors(q, release: PyTree, params: PyTree, *, skip=None) -> Moves:
    """Single-coordinate moves of ``release`` to its adjacent codebook levels (theory.md section 3(a)).

    The codebook is the one ``params`` defines (scales / quantiles held fixed, section 8), read with
    :func:`qmis_jax.quantizers.tree_neighbors`. Sparse ternary instead has the sign flips and support swaps of
    section 9 (:func:`qmis_jax.indicator.ptq.sparse_moves`), with ``index2`` / ``step2`` set.

    Args:
      q: the quantizer (or a preset name).
      release: the released pytree ``theta_0`` (codebook points).
      params: the pytree that fixes the codebook (the trained model, or ``theta*``).
      skip: leaves kept in full precision (their moves are invalid).

    Returns:
      :class:`Moves` with ``K = 2p`` entries, lower then upper move per coordinate.

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import uniform
    >>> moves = competitors(uniform(bits=2), {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 0.2])})
    >>> moves.index.tolist(), moves.step.tolist(), moves.valid.tolist()  # levels {-1, 0, 1}
    ([0, 0, 1, 1], [-1.0, 0.0, -1.0, 1.0], [True, False, True, True])
    """
    return _competitors(get_quantizer(q), release, params, skip=hashable_skip(skip))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("skip",))
def _competitors(q, release, params, *, skip):
    if is_sparse_ternary(q):  # flips and swaps: the nonzero count never changes (theory.md section 9)
        index, step, index2, step2, valid = sparse_moves(q, ravel_pytree(release)[0], params, skip)
        return Moves(index=index, step=step, valid=valid, index2=index2, step2=step2)
    theta, lo, up, has_lo, has_up = adjacent_levels(q, release, params, skip)
    step = jnp.stack([lo - theta, up - theta], axis=-1).reshape(-1)
    valid = jnp.stack([has_lo, has_up], axis=-1).reshape(-1)
    index = jnp.repeat(jnp.arange(theta.shape[0], dtype=jnp.int32), 2)
    return Moves(index=index, step=jnp.where(valid, step, 0.0), valid=valid)


def loss_differences(
    loss_fn: Callable[[PyTree, Array, Array], Array],
    release: PyTree,
    moves: Moves,
    x: Array,
    y: Array,
    *,
    design: Callable[[Array], Array] | None = None,
    margin_loss: Callable[[Array, Array], Array] | None = None,
    penalty: Array | None = None,
    chunk_size: int | None = None,
    method: str = "exact",
    hess_diag: Array | None = None,
) -> Array:
    """Per-example loss differences ``D_k(z_i) = l(theta_k, z_i) - l(theta_0, z_i)`` (theory.md section 3(a)).

    ``method="exact"``: GLM path (``design``, ``margin_loss``): with ``eta = X theta_0``,
    ``D_k(z_i) = l(eta_i + e_k X_{i, j_k}) - l(eta_i)`` (plus ``lambda_j ((theta_j + e_k)^2 - theta_j^2) / 2``
    with a ridge ``penalty``), ``O(K m)`` in all; otherwise one forward pass per
    (competitor, example), ``vmap``-ed over competitors in chunks of ``chunk_size`` (default about ``2^20 / m``).

    ``method="taylor"`` (section 6, "Cost", for large models):
    ``D_k(z) ~ g_{j_k}(z) e_k + 1/2 h_{j_k j_k} e_k^2`` with the per-example gradient ``g(z)`` at ``theta_0`` and
    the diagonal curvature ``h`` of the mean loss on ``(x, y)`` (:func:`qmis_jax.indicator.hessian_diag`, or
    ``hess_diag``). The per-example curvature is replaced by its mean: ``delta_k`` is right to second order in
    ``e_k`` and ``sigma_k`` to first order.

    Args:
      loss_fn: one example's loss ``loss_fn(params, x_i, y_i)``.
      release: the release ``theta_0`` (pytree).
      moves: its competitors, from :func:`competitors`.
      x: ``(m, ...)`` inputs. y: ``(m,)`` targets.
      design, margin_loss, penalty: optional GLM structure (see :class:`~qmis_jax.problems.Problem`).
      chunk_size: competitors evaluated at once (generic exact path).
      method: ``"exact"`` or ``"taylor"``.
      hess_diag: optional ``(p,)`` Hessian diagonal for ``"taylor"``.

    Returns:
      ``(K, m)`` loss differences; rows of invalid moves are 0 (mask with ``moves.valid``).
    """
    if method not in LOSS_DIFFERENCE_METHODS:
        raise ValueError(f"method must be one of {LOSS_DIFFERENCE_METHODS}, got method={method!r}")
    penalty = check_glm(design, margin_loss, penalty)
    check_chunk(chunk_size)
    check_data(x, y)
    p = int(ravel_pytree(release)[0].shape[0])
    if any(a is not None and jnp.shape(a) != jnp.shape(moves.index) for a in moves):
        raise ValueError(f"moves fields must share one shape (K,), got {[jnp.shape(a) for a in moves]}")
    if method == "taylor":
        if hess_diag is None:
            hess_diag = hessian_diag(loss_fn, release, x, y)
        if jnp.shape(hess_diag) != (p,):
            raise ValueError(f"hess_diag must have shape ({p},), got hess_diag.shape={jnp.shape(hess_diag)}")
    return _loss_differences(
        loss_fn,
        release,
        moves,
        x,
        y,
        hess_diag,
        penalty,
        design=design,
        margin_loss=margin_loss,
        chunk_size=chunk_size,
        method=method,
    )


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("design", "margin_loss", "chunk_size", "method"))
def _loss_differences(loss_fn, release, moves, x, y, hess_diag, penalty, *, design, margin_loss, chunk_size, method):
    m = x.shape[0]
    theta, unravel = ravel_pytree(release)
    index, step = moves.index, jnp.where(moves.valid, moves.step, 0.0).astype(theta.dtype)
    pairs = moves.index2 is not None
    index2 = moves.index2 if pairs else index
    step2 = jnp.where(moves.valid, moves.step2, 0.0).astype(theta.dtype) if pairs else jnp.zeros_like(step)
    k = index.shape[0]
    if method == "taylor":
        g = jax.vmap(jax.grad(lambda th, xi, yi: loss_fn(unravel(th), xi, yi)), in_axes=(None, 0, 0))(theta, x, y)
        h = jnp.asarray(hess_diag, theta.dtype)
        d = g[:, index].T * step[:, None] + (0.5 * h[index] * step**2)[:, None]
        if pairs:
            d = d + g[:, index2].T * step2[:, None] + (0.5 * h[index2] * step2**2)[:, None]
        return d
    chunk = chunk_size if chunk_size is not None else default_chunk(k, m)
    if design is not None:
        xd = design(x)
        eta = xd @ theta
        base = margin_loss(eta, y)
        cols = xd.T

        def one(args):
            j, e, j2, e2 = args
            d = margin_loss(eta + e * cols[j] + e2 * cols[j2], y) - base
            if penalty is not None:
                mid = theta.at[j].add(e)
                d = d + 0.5 * penalty[j] * e * (2 * theta[j] + e) + 0.5 * penalty[j2] * e2 * (2 * mid[j2] + e2)
            return d

    else:
        batch = jax.vmap(loss_fn, in_axes=(None, 0, 0))
        base = batch(release, x, y)

        def one(args):
            j, e, j2, e2 = args
            return batch(unravel(theta.at[j].add(e).at[j2].add(e2)), x, y) - base

    return jax.lax.map(one, (index, step, index2, step2), batch_size=chunk)


def gap_stats(D: Array, valid: Array, *, weights: Array | None = None) -> tuple[Array, Array]:
    """Loss gaps ``delta_k = mean D_k`` and spreads ``sigma_k = sd D_k`` (theory.md section 3(a)).

    Plug-in moments of the empirical law (weighted when ``weights`` is given, divisor ``sum w``, no
    small-sample correction).

    Args:
      D: ``(K, m)`` loss differences. valid: ``(K,)`` bool.
      weights: optional ``(m,)`` example weights.

    Returns:
      ``(delta, sigma)``, each ``(K,)``; NaN where not valid.

    >>> import jax.numpy as jnp
    >>> delta, sigma = gap_stats(jnp.array([[1.0, 3.0], [0.0, 0.0]]), jnp.array([True, False]))
    >>> delta.tolist(), sigma[0].tolist()
    ([2.0, nan], 1.0)
    """
    D = jnp.asarray(D)
    if D.ndim != 2 or jnp.shape(valid) != (D.shape[0],):
        raise ValueError(f"D must be (K, m) and valid (K,), got D.shape={D.shape}, valid.shape={jnp.shape(valid)}")
    dtype = jnp.result_type(D, jnp.float32)
    D = D.astype(dtype)
    if weights is not None and jnp.shape(weights) != (D.shape[1],):
        raise ValueError(f"weights must have shape ({D.shape[1]},), got weights.shape={jnp.shape(weights)}")
    return _gap_stats(D, jnp.asarray(valid), weights)


@jax.jit
def _gap_stats(D, valid, weights):
    dtype = D.dtype
    w = normalized_weights(weights, D.shape[1], dtype)
    delta = D @ w
    var = ((D - delta[:, None]) ** 2) @ w
    nan = jnp.asarray(jnp.nan, dtype)
    return jnp.where(valid, delta, nan), jnp.where(valid, jnp.sqrt(var), nan)


MARGIN_EVENTS = ("all", "scale")


def _margin_fn(q, unravel, skip, events="all"):
    """``g(theta)``: the element margins (``events="all"``: ``2p`` of them, lower then upper per coordinate)
    followed by the scale events' margins of a discrete scale format (theory.md section 9)."""

    def g(theta):
        params = unravel(theta)
        parts = []
        if events == "all":
            t_lo, t_up = tree_thresholds(q, params, skip=skip)
            t_lo = ravel_pytree(t_lo)[0].astype(theta.dtype)
            t_up = ravel_pytree(t_up)[0].astype(theta.dtype)
            parts.append(jnp.stack([theta - t_lo, t_up - theta], axis=-1).reshape(-1))
        if q.discrete_scale:
            parts.append(tree_scale_margins(q, params, skip=skip).astype(theta.dtype))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), theta.dtype)

    return g


def _margin_jacobian_rows(g, theta, chunk_size):
    """``(g(theta), row, K)``: ``row(k)`` is ``grad g_k(theta)``, a ``vjp`` with a one-hot cotangent."""
    value, vjp = jax.vjp(g, theta)
    k = value.shape[0]

    def row(i):
        return vjp(jax.nn.one_hot(i, k, dtype=value.dtype))[0]

    return value, row, k


def rtn_margins(
    q,
    params: PyTree,
    cov: Array,
    *,
    skip=None,
    chunk_size: int | None = None,
    events: str = "all",
) -> tuple[Array, Array, Array]:
    """Round-to-nearest decision margins ``m_k`` and their asymptotic spreads ``s_k`` (theory.md section 3(b)).

    For coordinate ``j`` the two events are ``g_{2j}(theta) = theta_j - t_lower_j(theta)`` and
    ``g_{2j+1}(theta) = t_upper_j(theta) - theta_j`` falling below 0, with the thresholds of
    :func:`qmis_jax.quantizers.tree_thresholds` (true gradient through data-dependent scales / quantiles).
    ``m_k = g_k(theta)`` and, by the delta method, ``s_k^2 = grad g_k^T Sigma grad g_k`` (``grad g_k`` by
    reverse-mode autodiff, one row at a time, ``lax.map``-ed in chunks). With ``cov`` the asymptotic sandwich
    ``Sigma`` of ``sqrt(n) (theta_hat - theta*)`` (as returned by :func:`~qmis_jax.indicator.sandwich_covariance`),
    ``(m_k, s_k)`` are on the scale of ``(delta_k, sigma_k)``: ``P(flip through k) ~ Phi(-sqrt(n) m_k / s_k)``.
    A ``(p,)`` ``cov`` is read as a diagonal (:func:`~qmis_jax.indicator.sandwich_diagonal`).

    Args:
      q: the quantizer (or a preset name).
      params: the full-precision parameters ``theta_hat`` (or ``theta*``) whose rounding is studied.
      cov: ``(p, p)`` asymptotic covariance ``Sigma`` (not divided by ``n``), or its ``(p,)`` diagonal.
      skip: leaves kept in full precision (no thresholds).
      chunk_size: Jacobian rows computed at once (default: one at a time, in a ``lax.map``).
      events: ``"all"`` (the default) or ``"scale"`` (the scale events only: :func:`scale_margins`).

    Returns:
      ``(m, s, valid)``, each ``(K,)``: ``K = 2p`` element events, then (discrete scale formats) the scale
      events of :func:`scale_margins`; ``valid`` False where no threshold exists; ``m``, ``s`` NaN
      there.

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import uniform
    >>> m, s, valid = rtn_margins(uniform(step=1.0), {"w": jnp.array([0.3])}, jnp.array([[4.0]]))
    >>> [round(v, 6) for v in m.tolist()], s.tolist()  # thresholds -0.5 and 0.5; s = sqrt(Sigma_00)
    ([0.8, 0.2], [2.0, 2.0])
    """
    if events not in MARGIN_EVENTS:
        raise ValueError(f"events must be one of {MARGIN_EVENTS}, got events={events!r}")
    check_chunk(chunk_size)
    p = int(ravel_pytree(params)[0].shape[0])
    if jnp.shape(cov) not in ((p, p), (p,)):
        raise ValueError(f"cov must have shape ({p}, {p}) or ({p},), got cov.shape={jnp.shape(cov)}")
    q = get_quantizer(q)
    return _rtn_margins(q, params, jnp.asarray(cov), skip=hashable_skip(skip), chunk_size=chunk_size, events=events)


def scale_margins(q, params: PyTree, cov: Array, **options) -> tuple[Array, Array, Array]:
    """Margins and spreads of the scale code's events of a discrete scale format (theory.md section 9).

    Absmax scales: per coordinate ``j`` the rising event ``b_up - |theta_j|`` (sd ``sqrt(Sigma_jj)``) and the
    block argmax's falling event ``|theta_argmax| - b_lo``; absmean-type statistics: ``stat - b_lo`` and
    ``b_hi - stat`` per block with ``s^2 = grad stat^T Sigma grad stat`` (delta method). The same events enter
    both PTQs: given the scale code, element thresholds and loss-PTQ competitors are those of a fixed codebook.
    Quantizers without a discrete scale have no such events (``K = 0``).

    Args:
      q: the quantizer (or a preset name).
      params: ``theta_hat`` (or ``theta*``).
      cov: ``(p, p)`` asymptotic covariance ``Sigma`` (not divided by ``n``), or its ``(p,)`` diagonal.
      **options: the keywords of :func:`rtn_margins`: ``skip`` (leaves kept in full precision, no scale) and
        ``chunk_size`` (Jacobian rows computed at once).

    Returns:
      ``(m, s, valid)``, each ``(K,)``; ``valid`` False where an event does not exist (``m``, ``s`` NaN there).

    >>> import jax.numpy as jnp
    >>> m, s, valid = scale_margins("sign@e8m0", {"w": jnp.array([1.2])}, jnp.array([[0.25]]))
    >>> [round(v, 4) for v in m.tolist()], s.tolist()  # 2^round(log2 1.2) = 1: boundaries 2^-0.5 and 2^0.5
    ([0.4929, 0.2142], [0.5, 0.5])
    """
    return rtn_margins(q, params, cov, events="scale", **options)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("skip", "chunk_size", "events"))
def _rtn_margins(q, params, cov, *, skip, chunk_size, events="all"):
    theta, unravel = ravel_pytree(params)
    dtype = jnp.result_type(theta, jnp.float32)
    theta = theta.astype(dtype)
    cov = cov.astype(dtype)
    g = _margin_fn(q, unravel, skip, events)
    value, row, k = _margin_jacobian_rows(g, theta, chunk_size)
    if k == 0:
        empty = jnp.zeros((0,), dtype)
        return empty, empty, jnp.zeros((0,), bool)

    def s2(i):
        r = row(i)
        r = jnp.where(jnp.isfinite(r), r, 0.0)
        return r @ cov @ r if cov.ndim == 2 else jnp.sum(r**2 * cov)

    var = jax.lax.map(s2, jnp.arange(k), batch_size=chunk_size)
    valid = jnp.isfinite(value)
    nan = jnp.asarray(jnp.nan, dtype)
    m = jnp.where(valid, value, nan)
    s = jnp.where(valid, jnp.sqrt(jnp.maximum(var, 0.0)), nan)
    return m, s, valid


def rtn_differences(
    q,
    loss_fn: Callable[[PyTree, Array, Array], Array],
    params: PyTree,
    x: Array,
    y: Array,
    *,
    skip=None,
    weights: Array | None = None,
    chunk_size: int | None = None,
    events: str = "all",
) -> tuple[Array, Array]:
    """Linearised per-example contributions to the round-to-nearest margins, for Cramer rates of RTN events.

    Extension of theory.md section 3(b) to ``method="cramer"``: by the delta method and the influence expansion
    ``theta_hat - theta ~ -H^-1 mean_i grad l(theta, Z_i)``,
    ``g_k(theta_hat) ~ mean_i D_k(Z_i)`` with ``D_k(z) = g_k(theta) - grad g_k^T H^-1 grad l(theta, z)``, so the
    RTN release flips through ``k`` when ``mean_i D_k(Z_i) < 0``. ``D_k`` has mean ``m_k`` (at a stationary point
    of the weighted loss) and variance ``s_k^2`` of :func:`rtn_margins` with the sandwich ``Sigma``; its
    empirical Chernoff rate (:func:`~qmis_jax.indicator.cramer_rate`) refines the Gaussian one.

    Args:
      q: the quantizer. loss_fn: one example's loss. params: ``theta_hat`` or ``theta*``.
      x: ``(m, ...)`` inputs. y: ``(m,)`` targets. weights: optional ``(m,)`` weights for ``H``.
      skip: leaves kept in full precision. chunk_size: Jacobian rows at once (default: one at a time).
      events: ``"all"`` (the events of :func:`rtn_margins`: element events, then scale events) or ``"scale"``
        (those of :func:`scale_margins` only).

    Returns:
      ``(D, valid)``: ``(K, m)`` contributions (rows of invalid events are 0) and ``(K,)`` bool.
    """
    if events not in MARGIN_EVENTS:
        raise ValueError(f"events must be one of {MARGIN_EVENTS}, got events={events!r}")
    check_chunk(chunk_size)
    check_data(x, y, weights)
    return _rtn_differences(
        get_quantizer(q),
        loss_fn,
        params,
        x,
        y,
        weights,
        skip=hashable_skip(skip),
        chunk_size=chunk_size,
        events=events,
    )


def scale_differences(
    q, loss_fn: Callable[[PyTree, Array, Array], Array], params: PyTree, x: Array, y: Array, **options
) -> tuple[Array, Array]:
    """:func:`rtn_differences` for the scale events of :func:`scale_margins` only (Cramer rates of scale codes).

    Args:
      q, loss_fn, params, x, y: as for :func:`rtn_differences`.
      **options: its keywords ``skip``, ``weights`` and ``chunk_size``.

    Returns:
      ``(D, valid)``: ``(K, m)`` linearised contributions and ``(K,)`` bool.
    """
    return rtn_differences(q, loss_fn, params, x, y, events="scale", **options)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("skip", "chunk_size", "events"))
def _rtn_differences(q, loss_fn, params, x, y, weights, *, skip, chunk_size, events="all"):
    m_ex = x.shape[0]
    theta, unravel = ravel_pytree(params)
    dtype = jnp.result_type(theta, jnp.float32)
    theta = theta.astype(dtype)

    def f(th, xi, yi):
        return loss_fn(unravel(th), xi, yi)

    w = normalized_weights(weights, m_ex, dtype)
    grads = jax.vmap(jax.grad(f), in_axes=(None, 0, 0))(theta, x, y)
    hess = jax.hessian(lambda th: jnp.sum(w * jax.vmap(f, in_axes=(None, 0, 0))(th, x, y)))(theta)
    hess = 0.5 * (hess + hess.T)
    a = jnp.linalg.solve(hess, grads.T)  # (p, m): H^-1 grad l(z_i)
    g = _margin_fn(q, unravel, skip, events)
    value, row, k = _margin_jacobian_rows(g, theta, chunk_size)
    if k == 0:
        return jnp.zeros((0, m_ex), dtype), jnp.zeros((0,), bool)

    def one(i):
        r = row(i)
        r = jnp.where(jnp.isfinite(r), r, 0.0)
        return value[i] - r @ a

    valid = jnp.isfinite(value)
    D = jax.lax.map(one, jnp.arange(k), batch_size=chunk_size)
    return jnp.where(valid[:, None], D, 0.0), valid
