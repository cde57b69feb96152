"""Post-training quantization procedures: round-to-nearest and loss-minimising (theory.md section 3).

- :func:`ptq_rtn`: ``Q(theta_hat)`` leaf by leaf (section 3(b)).
- :func:`ptq_loss`: start at round-to-nearest, then sweep over the coordinates, moving each to an adjacent codebook
  level when that lowers the empirical mean loss ``L_n``, until a sweep moves nothing (cyclic coordinate descent
  over the codebook, bounded by ``max_sweeps``). The codebook (scales, quantiles) is the one
  the trained parameters define and stays fixed. The release is then a local minimiser of ``L_n`` over the
  codebook: no single move lowers ``L_n`` (section 3(a)). Sparse ternary keeps its nonzero count (section 9): its
  moves are sign flips of kept entries and swaps (a kept entry to 0, a dropped one to ``+-alpha``), see
  :func:`sparse_moves`.

Both are pure functions of one model; ``vmap`` them over replicates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qmis_jax._loops import compacting_while
from qmis_jax.quantizers import get as get_quantizer
from qmis_jax.quantizers import quantize_tree, tree_codes, tree_neighbors
from qmis_jax.quantizers.tree import _flatten

from .sandwich import check_data, hashable_skip, normalized_weights

Array = jax.Array
PyTree = Any

__all__ = [
    "DescentPath",
    "StepRecord",
    "Trial",
    "descent_path",
    "descent_path_batched",
    "ptq_loss",
    "ptq_loss_batched",
    "ptq_rtn",
]


class Trial(NamedTuple):
    """One candidate move of a descent step: set ``theta_j = t``, then ``theta_i = u`` (``i == j``, ``u == t`` for
    a single-coordinate move; sparse ternary's swaps move two coordinates).

    Attributes:
      valid: bool, the move exists (an adjacent level, a swap partner).
      d: the weighted mean loss difference ``L_n(move) - L_n(current)`` the descent decided on (``+inf``-like
        values are never recorded: invalid moves keep whatever was computed and are masked by ``valid``).
      j, t, i, u: the move.
    """

    valid: Array
    d: Array
    j: Array
    t: Array
    i: Array
    u: Array


class StepRecord(NamedTuple):
    """The two candidate moves ``a`` (lower level, or sparse ternary's flip / swap-in) and ``b`` (upper level, or
    swap-out) of one coordinate step of a loss-PTQ descent, as :class:`Trial` s. The step takes ``b`` when
    ``d_b < d_a`` (strictly; the first on ties), and accepts the better move when its ``d < 0`` (theory.md
    section 3(a))."""

    a: Trial
    b: Trial


class DescentPath(NamedTuple):
    """A loss-PTQ descent and every comparison it made (theory.md section 3(a)).

    Attributes:
      release: ``(p,)`` the flat release where the descent stopped.
      start: ``(p,)`` the flat start (round-to-nearest, or a start given).
      records: :class:`StepRecord` of ``(S, p)`` arrays, ``S = max_sweeps``: sweep ``s``, coordinate ``j``
        (sweeps never run have ``valid`` False).
      sweeps: int32, the sweeps run. moves: int32, the moves accepted.
      settled: bool, the last sweep moved nothing (the release is a local minimiser); False when the descent
        stopped at ``max_sweeps``.
    """

    release: Array
    start: Array
    records: StepRecord
    sweeps: Array
    moves: Array
    settled: Array


def ptq_rtn(q, params: PyTree, *, key: Array | None = None, skip=None) -> PyTree:
    """Round-to-nearest post-training quantization ``R = Q(theta_hat)`` (theory.md section 3(b)).

    Args:
      q: a :class:`~qmis_jax.quantizers.Quantizer` (or preset name).
      params: one trained model's parameter pytree.
      key: PRNG key, required by stochastic quantizers (leaf ``j`` uses ``fold_in(key, j)``).
      skip: leaves left in full precision (see :func:`qmis_jax.quantizers.quantize_tree`).

    Returns:
      The released parameter pytree.

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import uniform
    >>> ptq_rtn(uniform(step=0.5), {"w": jnp.array([0.2, 0.8, -1.3])})["w"].tolist()
    [0.0, 1.0, -1.5]
    """
    q = get_quantizer(q)
    return _ptq_rtn(q, params, key, skip=hashable_skip(skip))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("skip",))
def _ptq_rtn(q, params, key, *, skip):
    return quantize_tree(q, params, key=key, skip=skip)


def adjacent_levels(q, release: PyTree, params: PyTree, skip) -> tuple[Array, Array, Array, Array, Array]:
    """Flat ``(theta, lower, upper, has_lower, has_upper)`` of a release in the codebook that ``params`` fixes.

    A level "exists" when its code (:func:`qmis_jax.quantizers.tree_codes`) differs from the release's, so a
    last-ulp difference between separately compiled decodes of the same level never counts as a move.
    """
    theta = ravel_pytree(release)[0]
    lo, up = tree_neighbors(q, release, params, skip=skip)
    code = ravel_pytree(tree_codes(q, release, params, skip=skip))[0]
    code_lo = ravel_pytree(tree_codes(q, lo, params, skip=skip))[0]
    code_up = ravel_pytree(tree_codes(q, up, params, skip=skip))[0]
    lo = ravel_pytree(lo)[0].astype(theta.dtype)
    up = ravel_pytree(up)[0].astype(theta.dtype)
    has_lo = (code_lo != code) & jnp.isfinite(lo) & (lo != theta)
    has_up = (code_up != code) & jnp.isfinite(up) & (up != theta)
    return theta, lo, up, has_lo, has_up


def is_sparse_ternary(q) -> bool:
    """Whether ``q`` is a sparse ternary quantizer (fixed nonzero count per leaf, theory.md section 9)."""
    return q.family == "ternary" and getattr(q, "sparsity", None) is not None


def _sparse_layout(q, params, skip):
    """Flat ``(leaf_id, movable, alpha, sign_hat, magnitude)`` of ``params`` for the sparse-ternary moves."""
    leaves, _ = _flatten(params, skip)
    ids, movable, alpha = [], [], []
    for j, (_, leaf, skipped) in enumerate(leaves):
        size = int(jnp.size(leaf))
        ids.append(jnp.full((size,), j, jnp.int32))
        movable.append(jnp.full((size,), not skipped))
        if skipped or size == 0:
            alpha.append(jnp.zeros((size,)))
        else:
            alpha.append(jnp.broadcast_to(q.scales(leaf), jnp.shape(leaf)).ravel())
    theta_hat = ravel_pytree(params)[0]
    dtype = jnp.result_type(theta_hat, jnp.float32)
    alpha = jnp.concatenate(alpha).astype(dtype) if alpha else jnp.zeros((0,), dtype)
    sign_hat = jnp.where(theta_hat >= 0, 1.0, -1.0).astype(dtype)
    return jnp.concatenate(ids), jnp.concatenate(movable), alpha, sign_hat, jnp.abs(theta_hat).astype(dtype)


def sparse_moves(q, release_flat: Array, params: PyTree, skip) -> tuple[Array, Array, Array, Array, Array]:
    """The ``K = 2p`` moves of a sparse-ternary release (theory.md section 9): none changes a nonzero count.

    Coordinate ``j`` kept (nonzero): move ``2j`` flips its sign; move ``2j + 1`` swaps it out (``j -> 0``) for the
    dropped entry of its leaf with the largest ``|theta_hat|``, which enters as ``sign(theta_hat_i) alpha``.
    Coordinate ``j`` dropped: move ``2j`` swaps it in (``j -> sign(theta_hat_j) alpha``) for the kept entry of its
    leaf with the smallest ``|theta_hat|`` (which leaves); move ``2j + 1`` does not exist. These are the kept/dropped
    pairs nearest the support boundary.

    Returns:
      ``(index, step, index2, step2, valid)``, each ``(K,)``: a move adds ``step`` to coordinate ``index`` and then
      ``step2`` to ``index2`` (``step2 = 0`` for a flip).
    """
    ids, movable, alpha, sign_hat, mag = _sparse_layout(q, params, skip)
    theta = release_flat.astype(alpha.dtype)
    p = theta.shape[0]
    kept = theta != 0
    leaves = len(_flatten(params, skip)[0])
    arange = jnp.arange(p, dtype=jnp.int32)

    def leaf_arg(mask, score):
        """Per coordinate: the first index of its leaf where ``mask`` holds with the largest ``score`` (O(p))."""
        neg = jnp.asarray(-jnp.inf, score.dtype)
        best = jax.ops.segment_max(jnp.where(mask, score, neg), ids, num_segments=leaves)
        hit = mask & (score == best[ids])
        first = jax.ops.segment_min(jnp.where(hit, arange, p), ids, num_segments=leaves)
        has = jax.ops.segment_max(mask.astype(jnp.int32), ids, num_segments=leaves) > 0
        return jnp.minimum(first[ids], p - 1), has[ids]

    i_in, has_in = leaf_arg(movable & ~kept, mag)  # the dropped entry with the largest |theta_hat|
    j_out, has_out = leaf_arg(movable & kept, -mag)  # the kept entry with the smallest |theta_hat|
    # move 2j
    step_a = jnp.where(kept, -2.0 * theta, sign_hat * alpha)
    index2_a = jnp.where(kept, arange, j_out.astype(jnp.int32))
    step2_a = jnp.where(kept, 0.0, -theta[j_out])
    valid_a = movable & (kept | has_out)
    # move 2j + 1
    step_b = -theta
    index2_b = i_in.astype(jnp.int32)
    step2_b = sign_hat[i_in] * alpha[i_in]
    valid_b = movable & kept & has_in

    def pair(a, b):
        return jnp.stack([a, b], axis=-1).reshape(-1)

    valid = pair(valid_a, valid_b)
    index = jnp.repeat(arange, 2)
    step = jnp.where(valid, pair(step_a, step_b), 0.0)
    step2 = jnp.where(valid, pair(step2_a, step2_b), 0.0)
    return index, step, pair(index2_a, index2_b), step2, valid


def coordinate_trial(loss_fn, unravel, x, y, w, *, design, margin_loss, penalty):
    """``(init, trial)`` of one-coordinate moves with per-example state.

    ``init(theta) -> state`` and ``trial(theta, state, j, t) -> (d, new_state)``: the weighted mean loss
    difference ``d = sum_i w_i [l(theta with theta_j = t, z_i) - l(theta, z_i)]`` and the state after the move.
    GLM path (``design``, ``margin_loss``): the state is ``(eta, l(eta))`` and a move costs ``O(n)``; with a ridge
    ``penalty`` (per-coordinate weights ``lambda``) ``d`` gains ``lambda_j (t^2 - theta_j^2) / 2``. Otherwise the
    state is the per-example losses and a move costs one forward pass per example.
    """
    if design is not None:
        xd = design(x)
        cols = xd.T

        def init(theta):
            eta = xd @ theta
            return eta, margin_loss(eta, y)

        def trial(theta, state, j, t):
            eta, base = state
            new_eta = eta + (t - theta[j]) * cols[j]
            new = margin_loss(new_eta, y)
            d = jnp.sum(w * (new - base))
            if penalty is not None:
                d = d + 0.5 * penalty[j] * (t * t - theta[j] * theta[j])
            return d, (new_eta, new)

        return init, trial

    batch = jax.vmap(loss_fn, in_axes=(None, 0, 0))

    def init(theta):
        return batch(unravel(theta), x, y)

    def trial(theta, state, j, t):
        new = batch(unravel(theta.at[j].set(t)), x, y)
        return jnp.sum(w * (new - state)), new

    return init, trial


def pair_difference(loss_fn, unravel, x, y, *, design, margin_loss, penalty):
    """``diff2(theta, state, j, t, i, u) -> (dv, pen, new_state)``: set ``theta_j = t`` then ``theta_i = u`` (the
    second after the first, so ``i == j`` with ``u == t`` is the single move); ``dv`` ``(m,)`` the per-example loss
    differences without the ridge term, ``pen`` the ridge term's change (a scalar, 0 without a ``penalty``), so an
    example's loss difference is ``dv + pen``; state as in :func:`coordinate_trial`."""
    if design is not None:
        cols = design(x).T

        def diff2(theta, state, j, t, i, u):
            eta, base = state
            e1 = t - theta[j]
            mid = theta.at[j].set(t)
            e2 = u - mid[i]
            new_eta = eta + e1 * cols[j] + e2 * cols[i]
            new = margin_loss(new_eta, y)
            pen = jnp.zeros((), new.dtype)
            if penalty is not None:
                pen = 0.5 * penalty[j] * (t * t - theta[j] * theta[j]) + 0.5 * penalty[i] * (u * u - mid[i] * mid[i])
            return new - base, pen, (new_eta, new)

        return diff2

    batch = jax.vmap(loss_fn, in_axes=(None, 0, 0))

    def diff2(theta, state, j, t, i, u):
        new = batch(unravel(theta.at[j].set(t).at[i].set(u)), x, y)
        return new - state, jnp.zeros((), new.dtype), new

    return diff2


def pair_trial(loss_fn, unravel, x, y, w, *, design, margin_loss, penalty):
    """``trial2(theta, state, j, t, i, u) -> (d, new_state)``: set ``theta_j = t`` then ``theta_i = u`` (the
    second after the first, so ``i == j`` with ``u == t`` is the single move), ``d`` the weighted mean loss
    difference; state as in :func:`coordinate_trial`."""
    diff2 = pair_difference(loss_fn, unravel, x, y, design=design, margin_loss=margin_loss, penalty=penalty)

    def trial2(theta, state, j, t, i, u):
        dv, pen, new = diff2(theta, state, j, t, i, u)
        return jnp.sum(w * dv) + pen, new

    return trial2


def ptq_loss(
    q,
    loss_fn: Callable[[PyTree, Array, Array], Array],
    params: PyTree,
    x: Array,
    y: Array,
    *,
    key: Array | None = None,
    skip=None,
    weights: Array | None = None,
    max_sweeps: int | None = None,
    design: Callable[[Array], Array] | None = None,
    margin_loss: Callable[[Array, Array], Array] | None = None,
    penalty: Array | None = None,
) -> tuple[PyTree, Array]:
    """Loss-minimising post-training quantization: coordinate sweeps from round-to-nearest.

    theory.md section 3(a): start at ``theta_0 = Q(theta_hat)``; sweep over the coordinates in order and, for each,
    move it to the adjacent codebook level (lower or upper, codebook fixed by ``params``) whose mean loss difference
    ``sum_i w_i [l(theta_k, z_i) - l(theta_0, z_i)]`` is the more negative, if one is negative; repeat sweeps until
    one moves nothing, or ``max_sweeps`` sweeps. Each accepted move strictly lowers ``L_n``, so the loop
    terminates; when the last sweep moved nothing the release is a local minimiser of ``L_n`` over the codebook
    (every competitor has ``delta_k >= 0`` on this data).

    Cost per sweep: ``2p`` one-coordinate trials. For GLMs pass ``design`` and ``margin_loss`` (a
    :class:`~qmis_jax.problems.Problem` provides them, with its ridge ``penalty``): the margins ``eta = X theta``
    are carried along, so a trial costs ``O(n)``. Otherwise a trial is one forward pass per example. Runs in a
    ``lax.while_loop`` over sweeps and a ``lax.scan`` over coordinates; ``vmap`` it over replicates.

    Args:
      q: the quantizer (or a preset name).
      loss_fn: ``loss_fn(params, x_i, y_i) -> scalar`` one example's loss.
      params: one trained model's parameters (they also fix the codebook).
      x: ``(n, ...)`` training inputs. y: ``(n,)`` targets.
      key: PRNG key for stochastic quantizers (only the starting point is random).
      skip: leaves kept in full precision (never moved).
      weights: optional ``(n,)`` example weights (membership weights of a shared pool).
      max_sweeps: bound on the sweeps (default 16).
      design: optional GLM design map ``design(x) -> (n, p)`` in ``ravel_pytree`` order.
      margin_loss: with ``design``, ``margin_loss(eta, y)`` elementwise.
      penalty: with ``design``, optional ``(p,)`` ridge weights ``lambda``: the loss of one example is
        ``margin_loss(eta, y) + sum_j lambda_j theta_j^2 / 2``.

    Returns:
      ``(release, n_moves)``: the released pytree and the int32 number of accepted moves.

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import uniform
    >>> loss = lambda prm, xi, yi: 0.5 * jnp.sum((prm["mu"] - xi) ** 2)
    >>> x = jnp.array([[0.3], [0.6], [0.9]])  # mean 0.6: level 1 fits better than RTN(0.49) = 0
    >>> release, moves = ptq_loss(uniform(step=1.0), loss, {"mu": jnp.array([0.49])}, x, jnp.zeros(3))
    >>> release["mu"].tolist(), int(moves)
    ([1.0], 1)
    """
    penalty = check_glm(design, margin_loss, penalty)
    check_data(x, y, weights)
    q = get_quantizer(q)
    if q.stochastic and key is None:
        raise ValueError(f"key is required: quantizer {q.name!r} rounds stochastically, got key=None")
    max_sweeps = _check_sweeps(max_sweeps)
    return _ptq_loss(
        q,
        loss_fn,
        params,
        x,
        y,
        key,
        weights,
        penalty,
        skip=hashable_skip(skip),
        max_sweeps=max_sweeps,
        design=design,
        margin_loss=margin_loss,
    )


DEFAULT_SWEEPS = 16


def _check_sweeps(max_sweeps) -> int:
    if max_sweeps is None:
        return DEFAULT_SWEEPS
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, int) or max_sweeps < 0:
        raise ValueError(f"max_sweeps must be a non-negative int or None, got max_sweeps={max_sweeps!r}")
    return max_sweeps


def check_glm(design, margin_loss, penalty) -> Array | None:
    """``design`` and ``margin_loss`` go together; a ``penalty`` needs them. Returns the penalty as an array (or
    None)."""
    if (design is None) != (margin_loss is None):
        raise ValueError(f"design and margin_loss go together, got design={design!r}, margin_loss={margin_loss!r}")
    if penalty is not None and design is None:
        raise ValueError("penalty applies to the GLM path only: pass design and margin_loss with it")
    return None if penalty is None else jnp.asarray(penalty)


def _descent(q, loss_fn, params, x, y, key, weights, penalty, *, skip, design, margin_loss, start=None):
    """The pieces of one model's loss-PTQ descent: ``(theta0, unravel, init, sweep)``, with ``theta0`` the flat
    round-to-nearest start (or ``start``, a flat codebook point), ``init(theta) -> state`` and
    ``sweep(theta, state) -> (theta, state, moved, records)`` one sweep over the coordinates, ``records`` its
    :class:`StepRecord` per coordinate (``sweep`` is None for a continuous quantizer, which has no adjacent
    levels)."""
    # a given start needs no rounding (nor a stochastic quantizer's key): the release has the structure of params
    release0 = quantize_tree(q, params, key=key, skip=skip) if start is None else params
    theta0, unravel = ravel_pytree(release0)
    dtype = jnp.result_type(theta0, jnp.float32)
    theta0 = theta0.astype(dtype) if start is None else jnp.asarray(start, dtype)
    w = normalized_weights(weights, x.shape[0], dtype)
    init, trial = coordinate_trial(loss_fn, unravel, x, y, w, design=design, margin_loss=margin_loss, penalty=penalty)
    if q.continuous:
        return theta0, unravel, init, None
    if is_sparse_ternary(q):
        trial2 = pair_trial(loss_fn, unravel, x, y, w, design=design, margin_loss=margin_loss, penalty=penalty)
        return theta0, unravel, init, _sparse_sweep(q, params, skip, trial2)

    def sweep(theta, state):
        # the adjacent levels of a sweep are those of the release it starts from
        _, lo, up, has_lo, has_up = adjacent_levels(q, unravel(theta), params, skip)

        def coordinate(c, j):
            theta, state, _ = c
            move_lo = (has_lo[j], *trial(theta, state, j, lo[j]), theta.at[j].set(lo[j]))
            move_up = (has_up[j], *trial(theta, state, j, up[j]), theta.at[j].set(up[j]))
            record = StepRecord(Trial(has_lo[j], move_lo[1], j, lo[j], j, lo[j]),
                                Trial(has_up[j], move_up[1], j, up[j], j, up[j]))  # fmt: skip
            return _take_better(c, move_lo, move_up), record

        return _scan_coordinates(coordinate, theta, state)

    return theta0, unravel, init, sweep


# the quantizer, the loss and the loss-PTQ settings are static; params, data, keys, weights and penalty traced
_ptq_jit = functools.partial(
    jax.jit, static_argnums=(0, 1), static_argnames=("skip", "max_sweeps", "design", "margin_loss")
)


def _scan_coordinates(coordinate, theta, state):
    """One sweep: ``coordinate`` (a :func:`_take_better` step and its :class:`StepRecord`) over every coordinate in
    order. Returns ``(theta, state, moved, records)``, ``records`` a :class:`StepRecord` of ``(p,)`` arrays."""
    (theta, state, moved), records = jax.lax.scan(
        coordinate, (theta, state, jnp.int32(0)), jnp.arange(theta.shape[0], dtype=jnp.int32)
    )
    return theta, state, moved, records


@_ptq_jit
def _ptq_loss(q, loss_fn, params, x, y, key, weights, penalty, *, skip, max_sweeps, design, margin_loss):
    glm = dict(skip=skip, design=design, margin_loss=margin_loss)
    theta0, unravel, init, sweep = _descent(q, loss_fn, params, x, y, key, weights, penalty, **glm)
    if sweep is None:  # no adjacent levels: the release is round-to-nearest
        return unravel(theta0), jnp.int32(0)
    theta, moves, _ = _greedy_sweeps(sweep, theta0, init(theta0), max_sweeps)
    return unravel(theta), moves


def ptq_loss_batched(q, loss_fn, params, x, y, *, keys=None, weights=None, **options) -> tuple[PyTree, Array]:
    """:func:`ptq_loss` of ``R`` models at once, each on its own data: the same releases as ``jax.vmap(ptq_loss)``,
    without every model waiting for the slowest.

    A vmapped ``while_loop`` sweeps every model as long as the one that needs the most sweeps (most settle in a
    few, some take ``max_sweeps``); here the models still moving are gathered into smaller batches as the others
    settle (:func:`~qmis_jax._loops.compacting_while`), and each model's sweeps are those of :func:`ptq_loss`.

    Args:
      q, loss_fn: as in :func:`ptq_loss`.
      params: ``R`` stacked models (leading axis). x: ``(R, n, ...)``. y: ``(R, n)``.
      keys: ``(R,)`` PRNG keys of a stochastic quantizer. weights: optional ``(R, n)`` example weights.
      **options: ``skip``, ``max_sweeps``, ``design``, ``margin_loss``, ``penalty`` of :func:`ptq_loss`.

    Returns:
      ``(releases, n_moves)``: the stacked releases and the ``(R,)`` int32 move counts.
    """
    q, args, glm = _batched_args(q, x, y, keys, weights, options)
    return _ptq_loss_batched(q, loss_fn, params, x, y, keys, weights, *args, record=False, **glm)


def descent_path_batched(q, loss_fn, params, x, y, *, keys=None, weights=None, **options) -> DescentPath:
    """:func:`descent_path` of ``R`` models at once from their round-to-nearest starts, settled models leaving the
    batch as in :func:`ptq_loss_batched` (the same releases).

    Args:
      q, loss_fn, params, x, y, keys, weights, **options: as in :func:`ptq_loss_batched`.

    Returns:
      :class:`DescentPath` whose fields have a leading axis ``R``.
    """
    q, args, glm = _batched_args(q, x, y, keys, weights, options)
    return _ptq_loss_batched(q, loss_fn, params, x, y, keys, weights, *args, record=True, **glm)


def _batched_args(q, x, y, keys, weights, options):
    """Check the arguments of the batched descents: ``(q, (penalty,), static options)``."""
    unknown = sorted(set(options) - {"skip", "max_sweeps", "design", "margin_loss", "penalty"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid: skip, max_sweeps, design, margin_loss, penalty")
    design, margin_loss = options.get("design"), options.get("margin_loss")
    penalty = check_glm(design, margin_loss, options.get("penalty"))
    q = get_quantizer(q)
    if q.stochastic and keys is None:
        raise ValueError(f"keys is required: quantizer {q.name!r} rounds stochastically, got keys=None")
    max_sweeps = _check_sweeps(options.get("max_sweeps"))
    if jnp.ndim(x) < 2 or jnp.ndim(y) != 2:
        raise ValueError(f"x must be (R, n, ...) and y (R, n), got x.shape={jnp.shape(x)}, y.shape={jnp.shape(y)}")
    check_data(x[0], y[0], None if weights is None else weights[0])
    glm = dict(skip=hashable_skip(options.get("skip")), max_sweeps=max_sweeps, design=design, margin_loss=margin_loss)
    return q, (penalty,), glm


@functools.partial(
    jax.jit, static_argnums=(0, 1), static_argnames=("skip", "max_sweeps", "design", "margin_loss", "record")
)
def _ptq_loss_batched(q, loss_fn, params, x, y, keys, weights, penalty, *, skip, max_sweeps, design, margin_loss,
                      record):  # fmt: skip
    glm = dict(skip=skip, design=design, margin_loss=margin_loss)

    def descent(m):
        return _descent(q, loss_fn, m["params"], m["x"], m["y"], m["key"], m["w"], penalty, **glm)

    def start(m):
        theta0, _, init, _ = descent(m)
        return theta0, init(theta0)

    def unravel(m, theta):
        return descent(m)[1](theta)

    members = {"params": params, "x": x, "y": y, "key": keys, "w": weights}
    theta0, state0 = jax.vmap(start)(members)
    size = theta0.shape[0]
    buf = jax.vmap(lambda t: _empty_records(t, max(max_sweeps, 1)))(theta0)
    if q.continuous:
        if record:
            zeros = jnp.zeros(size, jnp.int32)
            return DescentPath(theta0, theta0, buf, zeros, zeros, jnp.ones(size, bool))
        return jax.vmap(unravel)(members, theta0), jnp.zeros(size, jnp.int32)

    def active(c):
        return c["improving"] & (c["sweeps"] < max_sweeps)

    def member_step(c):
        theta, state, moved, rec = descent(c["m"])[3](c["theta"], c["state"])
        new = {**c, "theta": theta, "state": state, "moves": c["moves"] + moved, "sweeps": c["sweeps"] + 1}
        new["improving"] = moved > 0
        if record:
            new["buf"] = jax.tree.map(lambda b, r: b.at[c["sweeps"]].set(r.astype(b.dtype)), c["buf"], rec)
        go = active(c)
        return jax.tree.map(lambda a, b: jnp.where(go, a, b), new, c)

    carry = {
        "m": members,
        "theta": theta0,
        "state": state0,
        "moves": jnp.zeros(size, jnp.int32),
        "sweeps": jnp.zeros(size, jnp.int32),
        "improving": jnp.ones(size, bool),
    }
    if record:
        carry["buf"] = buf
    carry = compacting_while(jax.vmap(member_step), carry, active)
    if record:
        return DescentPath(carry["theta"], theta0, carry["buf"], carry["sweeps"], carry["moves"], ~carry["improving"])
    return jax.vmap(unravel)(members, carry["theta"]), carry["moves"]


def _take_better(carry, first, second):
    """One coordinate step of a greedy descent of ``L_n``: of two candidate moves, each ``(valid, change of L_n,
    trial state, new theta)``, take the one lowering ``L_n`` more (the first on ties) when it lowers it at all;
    ``carry = (theta, state, moved)`` with ``moved`` the count of accepted moves; returns the new carry."""
    theta, state, moved = carry
    valid_a, d_a, s_a, new_a = first
    valid_b, d_b, s_b, new_b = second
    d_a = jnp.where(valid_a & jnp.isfinite(d_a), d_a, jnp.inf)
    d_b = jnp.where(valid_b & jnp.isfinite(d_b), d_b, jnp.inf)
    b_wins = d_b < d_a
    accept = jnp.minimum(d_a, d_b) < 0
    target = jnp.where(b_wins, new_b, new_a)
    moved_state = jax.tree.map(lambda a, b: jnp.where(b_wins, b, a), s_a, s_b)
    theta = jnp.where(accept, target, theta)
    state = jax.tree.map(lambda new, old: jnp.where(accept, new, old), moved_state, state)
    return theta, state, moved + accept.astype(jnp.int32)


def _greedy_sweeps(sweep, theta0, state0, max_sweeps):
    """Sweeps from ``theta0`` until one moves nothing or ``max_sweeps`` sweeps are done.

    ``sweep(theta, state) -> (theta, state, moved)`` is one sweep over the coordinates.

    Returns:
      ``(theta, moves, settled)``: the final flat parameters, the total count of accepted moves and whether the
      last sweep moved nothing (False: stopped at ``max_sweeps``).
    """

    def body(carry):
        theta, state, moves, sweeps, _ = carry
        theta, state, moved, _ = sweep(theta, state)
        return theta, state, moves + moved, sweeps + 1, moved > 0

    def cond(carry):
        *_, sweeps, improving = carry
        return improving & (sweeps < max_sweeps)

    carry = (theta0, state0, jnp.int32(0), jnp.int32(0), jnp.asarray(True))
    theta, _, moves, _, improving = jax.lax.while_loop(cond, body, carry)
    return theta, moves, ~improving


def _empty_records(theta, sweeps: int) -> StepRecord:
    """``(sweeps, p)`` records with nothing valid, the buffer :func:`_recorded_sweeps` fills."""
    p = theta.shape[0]
    zeros = jnp.zeros((sweeps, p), theta.dtype)
    ints = jnp.zeros((sweeps, p), jnp.int32)
    trial = Trial(jnp.zeros((sweeps, p), bool), zeros, ints, zeros, ints, zeros)
    return StepRecord(trial, trial)


def _recorded_sweeps(sweep, theta0, state0, max_sweeps):
    """:func:`_greedy_sweeps` that also records every coordinate step of every sweep.

    Returns:
      ``(theta, moves, sweeps, settled, records)``: ``records`` a :class:`StepRecord` of ``(max_sweeps, p)``
      arrays, ``settled`` whether the last sweep moved nothing.
    """

    def body(carry):
        theta, state, moves, sweeps, _, buf = carry
        theta, state, moved, rec = sweep(theta, state)
        buf = jax.tree.map(lambda b, r: b.at[sweeps].set(r.astype(b.dtype)), buf, rec)
        return theta, state, moves + moved, sweeps + 1, moved > 0, buf

    def cond(carry):
        sweeps, improving = carry[3], carry[4]
        return improving & (sweeps < max_sweeps)

    buf = _empty_records(theta0, max(max_sweeps, 1))
    carry = (theta0, state0, jnp.int32(0), jnp.int32(0), jnp.asarray(True), buf)
    theta, _, moves, sweeps, improving, buf = jax.lax.while_loop(cond, body, carry)
    return theta, moves, sweeps, ~improving, buf


def descent_path(
    q,
    loss_fn: Callable[[PyTree, Array, Array], Array],
    params: PyTree,
    x: Array,
    y: Array,
    *,
    start: Array | None = None,
    key: Array | None = None,
    skip=None,
    weights: Array | None = None,
    max_sweeps: int | None = None,
    design: Callable[[Array], Array] | None = None,
    margin_loss: Callable[[Array, Array], Array] | None = None,
    penalty: Array | None = None,
) -> DescentPath:
    """The loss-PTQ descent of :func:`ptq_loss` with every comparison it makes (theory.md section 3(a)).

    The same sweeps, neighbour rules, acceptance (``< 0``), tie rule and ``max_sweeps`` as :func:`ptq_loss` (the
    same code), from round-to-nearest or from ``start``; the release is a function of the start cell and of the
    signs of the recorded comparisons, so they are its events
    (:func:`~qmis_jax.indicator.events.path_events`).

    Args:
      q, loss_fn, params, x, y, key, skip, weights, max_sweeps, design, margin_loss, penalty: as in
        :func:`ptq_loss`.
      start: optional ``(p,)`` flat codebook point (of the codebook ``params`` fix) to start from instead of
        round-to-nearest.

    Returns:
      :class:`DescentPath` (a continuous quantizer has no moves: ``sweeps`` 0, ``settled`` True).

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import uniform
    >>> loss = lambda prm, xi, yi: 0.5 * jnp.sum((prm["mu"] - xi) ** 2)
    >>> x = jnp.array([[0.3], [0.6], [0.9]])
    >>> path = descent_path(uniform(step=1.0), loss, {"mu": jnp.array([0.49])}, x, jnp.zeros(3))
    >>> path.release.tolist(), int(path.sweeps), bool(path.records.b.d[0, 0] < 0)  # moved up, then settled
    ([1.0], 2, True)
    """
    penalty = check_glm(design, margin_loss, penalty)
    check_data(x, y, weights)
    q = get_quantizer(q)
    if q.stochastic and key is None and start is None:
        raise ValueError(f"key is required: quantizer {q.name!r} rounds stochastically, got key=None")
    max_sweeps = _check_sweeps(max_sweeps)
    glm = dict(skip=hashable_skip(skip), max_sweeps=max_sweeps, design=design, margin_loss=margin_loss)
    return _descent_path(q, loss_fn, params, x, y, key, weights, penalty, start, **glm)


@_ptq_jit
def _descent_path(q, loss_fn, params, x, y, key, weights, penalty, start, *, skip, max_sweeps, design, margin_loss):
    glm = dict(skip=skip, design=design, margin_loss=margin_loss)
    theta0, _, init, sweep = _descent(q, loss_fn, params, x, y, key, weights, penalty, start=start, **glm)
    if sweep is None:
        return DescentPath(theta0, theta0, _empty_records(theta0, max(max_sweeps, 1)), jnp.int32(0), jnp.int32(0),
                           jnp.asarray(True))  # fmt: skip
    theta, moves, sweeps, settled, records = _recorded_sweeps(sweep, theta0, init(theta0), max_sweeps)
    return DescentPath(theta, theta0, records, sweeps, moves, settled)


def _sparse_sweep(q, params, skip, trial2):
    """One loss-PTQ sweep of a sparse-ternary release, ``sweep(theta, state) -> (theta, state, moved)``: flips and
    swaps of :func:`sparse_moves`, the nonzero count of every leaf held fixed (theory.md section 9). For each
    coordinate the better of its two moves is taken when it lowers ``L_n``; the partners are recomputed from the
    current release at every step."""
    ids, movable, alpha, sign_hat, mag = _sparse_layout(q, params, skip)

    def coordinate(c, j):
        theta, state, _ = c
        inf = jnp.asarray(jnp.inf, theta.dtype)
        kept = theta != 0
        same = (ids == ids[j]) & movable
        i_in = jnp.argmax(jnp.where(same & ~kept, mag, -inf))
        has_in = jnp.any(same & ~kept)
        j_out = jnp.argmin(jnp.where(same & kept, mag, inf))
        has_out = jnp.any(same & kept)
        is_kept = kept[j]
        # move A: flip a kept entry, or swap a dropped one in (its partner j_out leaves)
        t_a = jnp.where(is_kept, -theta[j], sign_hat[j] * alpha[j])
        i_a = jnp.where(is_kept, j, j_out)
        u_a = jnp.where(is_kept, -theta[j], 0.0)
        valid_a = movable[j] & (is_kept | has_out)
        # move B: swap a kept entry out (its partner i_in enters)
        u_b = sign_hat[i_in] * alpha[i_in]
        valid_b = movable[j] & is_kept & has_in
        t_b = 0.0 * theta[j]
        move_a = (valid_a, *trial2(theta, state, j, t_a, i_a, u_a), theta.at[j].set(t_a).at[i_a].set(u_a))
        move_b = (valid_b, *trial2(theta, state, j, t_b, i_in, u_b), theta.at[j].set(0.0).at[i_in].set(u_b))
        record = StepRecord(Trial(valid_a, move_a[1], j, t_a, i_a.astype(jnp.int32), u_a),
                            Trial(valid_b, move_b[1], j, t_b, i_in.astype(jnp.int32), u_b))  # fmt: skip
        return _take_better(c, move_a, move_b), record

    return lambda theta, state: _scan_coordinates(coordinate, theta, state)
