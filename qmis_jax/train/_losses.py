"""Per-sample losses and gradients of a stack of replicates (inputs of theory.md sections 2, 3 and 7)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from qmis_jax.problems._base import Problem

from ._validate import check_positive_int, check_problem

Array = jax.Array
PyTree = Any


def _replicates(params: PyTree) -> int:
    leaves = jax.tree.leaves(params)
    if not leaves or any(jnp.ndim(a) == 0 for a in leaves):
        raise ValueError("params must be a non-empty pytree whose leaves have a leading replicate axis R")
    r = {jnp.shape(a)[0] for a in leaves}
    if len(r) != 1:
        raise ValueError(f"params leaves disagree on the replicate axis: sizes {sorted(r)}")
    return r.pop()


def _check_xy(x: Array, y: Array, r: int) -> bool:
    """True when the data are one shared pool ``(N, dx)``, False for per-replicate ``(R, n, dx)``."""
    if x.ndim == 2 and y.shape == (x.shape[0],):
        return True
    if x.ndim == 3 and x.shape[0] == r and y.shape == x.shape[:2]:
        return False
    raise ValueError(
        f"x, y must be (N, dx), (N,) shared or ({r}, n, dx), ({r}, n) per replicate; got {x.shape}, {y.shape}"
    )


def _map(fn, xs, chunk_size):
    if chunk_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("problem", "shared", "chunk_size"))
def _losses(problem, params, x, y, shared, chunk_size):
    if shared:
        if problem.design is not None and problem.margin_loss is not None:
            theta = jax.vmap(lambda p: ravel_pytree(p)[0])(params)
            design = problem.design(x)
            if problem.penalty is None:
                return _map(lambda th: problem.margin_loss(design @ th, y), theta, chunk_size)
            ridge = jnp.asarray(problem.penalty, theta.dtype)
            return _map(lambda th: problem.margin_loss(design @ th, y) + 0.5 * ridge @ th**2, theta, chunk_size)
        return _map(lambda p: problem.batch_loss(p, x, y), params, chunk_size)
    return _map(lambda a: problem.batch_loss(*a), (params, x, y), chunk_size)


@functools.partial(jax.jit, static_argnames=("problem", "shared", "chunk_size"))
def _grads(problem, params, x, y, shared, chunk_size):
    def one(p, xs, ys):
        theta, unravel = ravel_pytree(p)
        g = jax.grad(lambda th, xi, yi: problem.loss(unravel(th), xi, yi))
        return jax.vmap(g, in_axes=(None, 0, 0))(theta, xs, ys)

    if shared:
        return _map(lambda p: one(p, x, y), params, chunk_size)
    return _map(lambda a: one(*a), (params, x, y), chunk_size)


def per_sample_losses(problem: Problem, params: PyTree, x: Array, y: Array, *, chunk_size: int | None = None) -> Array:
    """Per-example losses ``l(theta_r, z_i)`` of every replicate, ``(R, N)``.

    For generalised linear models (``problem.design``) on a shared pool this is one product
    ``m(Theta @ X^T, y)``; otherwise the per-example loss vmapped over examples and replicates. Compiled once per
    problem and shapes.

    Args:
      problem: the problem. params: parameters with a leading replicate axis ``R``.
      x, y: a shared pool ``(N, dx)``, ``(N,)``, or per-replicate data ``(R, n, dx)``, ``(R, n)``.
      chunk_size: replicates evaluated at once (``lax.map`` batches) to bound memory; None: all.

    Returns:
      ``(R, N)`` losses.
    """
    check_problem(problem)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    r = _replicates(params)
    x, y = jnp.asarray(x), jnp.asarray(y)
    return _losses(problem, params, x, y, _check_xy(x, y, r), chunk_size)


def per_sample_grads_batched(
    problem: Problem, params: PyTree, x: Array, y: Array, *, chunk_size: int | None = None
) -> Array:
    """Per-example gradients ``grad_theta l(theta_r, z_i)`` as flat vectors in ``ravel_pytree`` order, ``(R, N, p)``.

    These are the scores whose outer products give ``V_hat`` of theory.md section 2.

    Args:
      problem: the problem. params: parameters with a leading replicate axis ``R``.
      x, y: shared ``(N, dx)``, ``(N,)`` or per-replicate ``(R, n, dx)``, ``(R, n)``.
      chunk_size: replicates evaluated at once; None: all.

    Returns:
      ``(R, N, p)`` gradients.
    """
    check_problem(problem)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    r = _replicates(params)
    x, y = jnp.asarray(x), jnp.asarray(y)
    return _grads(problem, params, x, y, _check_xy(x, y, r), chunk_size)
