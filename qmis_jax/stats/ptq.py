"""Post-training quantization procedures: round-to-nearest and loss-minimising (theory.md section 3).

- :func:`ptq_rtn`: ``Q(theta_hat)`` leaf by leaf (section 3(b)).
- :func:`ptq_loss`: start at round-to-nearest, then take, one at a time, the single-coordinate move to an adjacent
  codebook level that lowers the empirical mean loss ``L_n`` most, while one does (greedy steepest descent over
  the codebook, in a ``lax.while_loop``, bounded by ``max_moves``). The codebook (scales, quantiles) is the one
  the trained parameters define and stays fixed. The release is then a local minimiser of ``L_n`` over the
  codebook: no single move lowers ``L_n`` (section 3(a)).

Both are pure functions of one model; ``vmap`` them over replicates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qmis_jax.quantizers import get as get_quantizer
from qmis_jax.quantizers import quantize_tree, tree_codes, tree_neighbors

from .sandwich import check_chunk, check_data, default_chunk, hashable_skip, normalized_weights

Array = jax.Array
PyTree = Any

__all__ = ["ptq_loss", "ptq_rtn"]


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


def flat_moves(q, unravel: Callable, params: PyTree, theta: Array, skip) -> tuple[Array, Array, Array]:
    """``(index, target, valid)`` of the ``K = 2p`` single-coordinate moves of the flat release ``theta``.

    Move ``2j`` goes to coordinate ``j``'s lower adjacent level, ``2j + 1`` to its upper one (codebook of
    ``params``); ``valid`` is False where that level does not exist (see :func:`adjacent_levels`).
    """
    _, lo, up, has_lo, has_up = adjacent_levels(q, unravel(theta), params, skip)
    target = jnp.stack([lo, up], axis=-1).reshape(-1).astype(theta.dtype)
    valid = jnp.stack([has_lo, has_up], axis=-1).reshape(-1)
    index = jnp.repeat(jnp.arange(theta.shape[0]), 2)
    return index, target, valid


def mean_move_differences(
    loss_fn,
    unravel: Callable,
    theta: Array,
    index: Array,
    target: Array,
    x: Array,
    y: Array,
    w: Array,
    *,
    design: Callable | None,
    margin_loss: Callable | None,
    chunk_size: int | None,
) -> Array:
    """Weighted means ``sum_i w_i D_k(z_i)`` of the loss differences of the moves ``theta[index_k] -> target_k``.

    GLM path (``design``, ``margin_loss``): ``eta = X theta``, ``D_k(z_i) = l(eta_i + e_k X_ik) - l(eta_i)``, all
    ``K`` moves in ``O(n K)``. Otherwise one forward pass per (move, example), ``vmap``-ed over moves in chunks.
    """
    k = index.shape[0]
    n = y.shape[0]
    chunk = chunk_size if chunk_size is not None else default_chunk(k, n)
    if design is not None:
        xd = design(x)
        eta = xd @ theta
        base = margin_loss(eta, y)
        cols = xd.T

        def one(args):
            j, t = args
            step = t - theta[j]
            return jnp.sum(w * (margin_loss(eta + step * cols[j], y) - base))

    else:
        batch = jax.vmap(loss_fn, in_axes=(None, 0, 0))
        base = batch(unravel(theta), x, y)

        def one(args):
            j, t = args
            return jnp.sum(w * (batch(unravel(theta.at[j].set(t)), x, y) - base))

    return jax.lax.map(one, (index, target), batch_size=chunk)


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
    max_moves: int | None = None,
    design: Callable[[Array], Array] | None = None,
    margin_loss: Callable[[Array, Array], Array] | None = None,
    chunk_size: int | None = None,
) -> tuple[PyTree, Array]:
    """Loss-minimising post-training quantization: greedy single-coordinate descent from round-to-nearest.

    theory.md section 3(a): start at ``theta_0 = Q(theta_hat)``; at each step evaluate every single-coordinate
    move ``theta_k`` to an adjacent codebook level (codebook fixed by ``params``) and take the one with the most
    negative mean loss difference ``sum_i w_i [l(theta_k, z_i) - l(theta_0, z_i)]``; stop when none is negative
    or after ``max_moves`` moves. Each accepted move strictly lowers ``L_n``, so the loop terminates; when it stops
    before ``max_moves`` the release is a local minimiser of ``L_n`` over the codebook (every competitor has
    ``delta_k >= 0`` on this data).

    Cost per move: ``K = 2p`` candidate evaluations. For GLMs pass ``design`` and ``margin_loss`` (a
    :class:`~qmis_jax.problems.Problem` provides them): with ``eta = X theta``, all candidates cost ``O(n p)`` via
    ``eta + e_k X[:, k]``. Otherwise candidates are forward passes, ``vmap``-ed in chunks of ``chunk_size``
    moves (default: about ``2^20 / n``). Runs in a ``lax.while_loop``; ``vmap`` it over replicates.

    Args:
      q: the quantizer (or a preset name).
      loss_fn: ``loss_fn(params, x_i, y_i) -> scalar`` one example's loss.
      params: one trained model's parameters (they also fix the codebook).
      x: ``(n, ...)`` training inputs. y: ``(n,)`` targets.
      key: PRNG key for stochastic quantizers (only the starting point is random).
      skip: leaves kept in full precision (never moved).
      weights: optional ``(n,)`` example weights (membership weights of a shared pool).
      max_moves: bound on accepted moves (default ``4 p``, two sweeps in each direction).
      design: optional GLM design map ``design(x) -> (n, p)`` in ``ravel_pytree`` order.
      margin_loss: with ``design``, ``margin_loss(eta, y)`` elementwise.
      chunk_size: candidate moves evaluated at once on the generic path.

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
    if (design is None) != (margin_loss is None):
        raise ValueError(f"design and margin_loss go together, got design={design!r}, margin_loss={margin_loss!r}")
    check_chunk(chunk_size)
    check_data(x, y, weights)
    q = get_quantizer(q)
    if q.stochastic and key is None:
        raise ValueError(f"key is required: quantizer {q.name!r} rounds stochastically, got key=None")
    p = int(ravel_pytree(params)[0].shape[0])
    if max_moves is None:
        max_moves = 4 * p
    if isinstance(max_moves, bool) or not isinstance(max_moves, int) or max_moves < 0:
        raise ValueError(f"max_moves must be a non-negative int or None, got max_moves={max_moves!r}")
    return _ptq_loss(
        q,
        loss_fn,
        params,
        x,
        y,
        key,
        weights,
        skip=hashable_skip(skip),
        max_moves=max_moves,
        design=design,
        margin_loss=margin_loss,
        chunk_size=chunk_size,
    )


@functools.partial(
    jax.jit,
    static_argnums=(0, 1),
    static_argnames=("skip", "max_moves", "design", "margin_loss", "chunk_size"),
)
def _ptq_loss(q, loss_fn, params, x, y, key, weights, *, skip, max_moves, design, margin_loss, chunk_size):
    release0 = quantize_tree(q, params, key=key, skip=skip)
    theta0, unravel = ravel_pytree(release0)
    dtype = jnp.result_type(theta0, jnp.float32)
    theta0 = theta0.astype(dtype)
    w = normalized_weights(weights, x.shape[0], dtype)

    def cond(state):
        _, moves, improving = state
        return improving & (moves < max_moves)

    def body(state):
        theta, moves, _ = state
        index, target, valid = flat_moves(q, unravel, params, theta, skip)
        diffs = mean_move_differences(
            loss_fn,
            unravel,
            theta,
            index,
            target,
            x,
            y,
            w,
            design=design,
            margin_loss=margin_loss,
            chunk_size=chunk_size,
        )
        diffs = jnp.where(valid & jnp.isfinite(diffs), diffs, jnp.inf)
        best = jnp.argmin(diffs)
        improving = diffs[best] < 0
        new = theta.at[index[best]].set(target[best])
        theta = jnp.where(improving, new, theta)
        return theta, moves + improving.astype(jnp.int32), improving

    theta, moves, _ = jax.lax.while_loop(cond, body, (theta0, jnp.int32(0), jnp.asarray(True)))
    return unravel(theta), moves
