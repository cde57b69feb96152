"""Single-replicate training programs; the engine vmaps them over replicates (theory.md section 1's ERM).

Every function here trains ONE model. They are written so that ``jax.vmap`` over replicates turns the work that
dominates into matrix-matrix products: with a shared pool ``X (N, p)`` the per-replicate margins ``X @ theta``
become ``Theta @ X^T`` and the Hessians ``X^T diag(s) X`` become one product ``S @ K`` with the Khatri-Rao
features ``K[i] = upper triangle of x_i x_i^T`` (computed once per fit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

Array = jax.Array
PyTree = Any

ARMIJO_C = 1e-4
LINE_SEARCH_STEPS = 16  # step sizes 1, 1/2, ..., 2^-15 are tried at once


class Solution(NamedTuple):
    """One replicate's result: parameters, final gradient norm, convergence flag and iteration count."""

    params: PyTree
    grad_norm: Array
    converged: Array
    steps: Array


class _NewtonState(NamedTuple):
    theta: Array
    f: Array
    g: Array
    gn: Array
    step: Array
    done: Array


def triangle_features(design: Array) -> Array:
    """Khatri-Rao features, transposed: ``K^T (p (p + 1) / 2, N)``, column ``i`` the upper triangle of ``x_i x_i^T``.

    ``K^T @ s`` is the upper triangle of ``X^T diag(s) X``, so vmapped over replicates the Hessians on a shared pool
    are one ``(p (p + 1) / 2, N) @ (N, R)`` product, half the flops of the full ``X^T diag(s) X`` and a large,
    efficient matrix product. (The transposed layout is the faster one on CPU.)
    """
    iu, ju = np.triu_indices(design.shape[1])
    return (design[:, iu] * design[:, ju]).T


def unpack_triangle(h: Array, p: int) -> Array:
    """Symmetric ``(p, p)`` matrix from its upper triangle in ``np.triu_indices`` order (a gather)."""
    iu, ju = np.triu_indices(p)
    index = np.zeros((p, p), np.int32)
    index[iu, ju] = np.arange(iu.size)
    index[ju, iu] = np.arange(iu.size)
    return h[index]


def newton_direction(g: Array, hess: Array) -> Array:
    """Newton direction ``-(H + mu I)^{-1} g`` by Cholesky, ``mu`` a relative jitter; ``-g`` if that fails.

    The jitter ``mu = 100 eps mean(diag H)`` keeps a singular but positive semi-definite Hessian (a feature absent
    from a replicate's data) solvable without moving the fixed point ``g = 0``.
    """
    p = g.shape[0]
    eps = jnp.finfo(g.dtype).eps
    mu = 100 * eps * jnp.maximum(jnp.trace(hess) / p, jnp.finfo(g.dtype).tiny)
    chol = jnp.linalg.cholesky(hess + mu * jnp.eye(p, dtype=g.dtype))
    d = -jax.scipy.linalg.cho_solve((chol, True), g)
    return jnp.where(jnp.all(jnp.isfinite(d)), d, -g)


def _newton_loop(
    theta0: Array,
    value_grad: Callable[[Array], tuple[Array, Array]],
    hessian: Callable[[Array], Array],
    line_values: Callable[[Array, Array, Array], Array],
    *,
    tol: Array,
    max_steps: int,
) -> Solution:
    """Damped Newton's method with an Armijo line search over ``2^-j`` steps evaluated together.

    Stops when ``||g||_2 <= tol``, after ``max_steps`` iterations, or when no step makes progress: no Armijo step,
    or, once the predicted decrease ``-g.d`` is below the floating-point resolution of the objective (where the
    Armijo test is noise and full Newton steps are safe), a full step that does not lower ``||g||``.
    """
    alphas = 2.0 ** -jnp.arange(LINE_SEARCH_STEPS, dtype=theta0.dtype)
    eps = jnp.finfo(theta0.dtype).eps

    def cond(s: _NewtonState):
        return ~s.done

    def body(s: _NewtonState):
        d = newton_direction(s.g, hessian(s.theta))
        gd = s.g @ d
        trial = line_values(s.theta, d, alphas)
        armijo = (trial <= s.f + ARMIJO_C * alphas * gd) & jnp.isfinite(trial)
        tiny = -gd <= 10 * eps * (1 + jnp.abs(s.f))
        alpha = jnp.where(tiny, 1.0, jnp.where(jnp.any(armijo), alphas[jnp.argmax(armijo)], 0.0))
        theta = s.theta + alpha * d
        f, g = value_grad(theta)
        gn = jnp.linalg.norm(g)
        accept = jnp.where(tiny, gn < s.gn, alpha > 0) & jnp.isfinite(f) & jnp.isfinite(gn)
        pick = lambda new, old: jnp.where(accept, new, old)
        step = s.step + 1
        gn = pick(gn, s.gn)
        done = (gn <= tol) | (step >= max_steps) | ~accept
        return _NewtonState(pick(theta, s.theta), pick(f, s.f), pick(g, s.g), gn, step, done)

    f0, g0 = value_grad(theta0)
    gn0 = jnp.linalg.norm(g0)
    s0 = _NewtonState(theta0, f0, g0, gn0, jnp.zeros((), jnp.int32), (gn0 <= tol) | (max_steps <= 0))
    s = jax.lax.while_loop(cond, body, s0)
    return Solution(s.theta, s.gn, s.gn <= tol, s.step)


def glm_newton(
    theta0: Array,
    design: Array,
    y: Array,
    w: Array,
    *,
    margin_loss: Callable[[Array, Array], Array],
    features: Array | None,
    tol: Array,
    max_steps: int,
) -> Solution:
    """Weighted ERM of a generalised linear model by damped Newton (theory.md section 1).

    Objective ``f(theta) = sum_i w_i m(x_i . theta, y_i) / sum_i w_i`` with ``m = margin_loss``; gradient
    ``X^T (w m') / sum w``; Hessian ``X^T diag(w m'') X / sum w``, computed as ``(w m'') @ K`` from the Khatri-Rao
    ``features`` when given (see :func:`triangle_features`), else directly.

    Args:
      theta0: ``(p,)`` start. design: ``(N, p)``. y, w: ``(N,)``; ``w >= 0`` with a positive sum.
      margin_loss: elementwise ``m(eta, y)``, convex in ``eta``.
      features: ``(p (p + 1) / 2, N)`` from :func:`triangle_features`, or None.
      tol: gradient-norm tolerance (scalar array). max_steps: iteration cap.

    Returns:
      :class:`Solution` with ``params`` the flat ``(p,)`` vector.
    """
    wn = w / jnp.sum(w)
    m1 = jax.vmap(jax.grad(margin_loss))
    m2 = jax.vmap(jax.grad(jax.grad(margin_loss)))
    p = design.shape[1]

    def value_grad(theta):
        eta = design @ theta
        return wn @ margin_loss(eta, y), (wn * m1(eta, y)) @ design

    def hessian(theta):
        s = wn * m2(design @ theta, y)
        if features is not None:
            return unpack_triangle(features @ s, p)
        return (design * s[:, None]).T @ design

    def line_values(theta, d, alphas):
        eta, xd = design @ theta, design @ d
        return jax.vmap(lambda a: wn @ margin_loss(eta + a * xd, y))(alphas)

    return _newton_loop(theta0, value_grad, hessian, line_values, tol=tol, max_steps=max_steps)


def weighted_objective(batch_loss, unravel, x: Array, y: Array, w: Array):
    """``theta -> sum_i w_i l(unravel(theta), z_i) / sum_i w_i`` for a flat parameter vector."""
    wn = w / jnp.sum(w)
    return lambda theta: wn @ batch_loss(unravel(theta), x, y)


def generic_newton(
    params0: PyTree, batch_loss, x: Array, y: Array, w: Array, *, tol: Array, max_steps: int
) -> Solution:
    """Weighted ERM of a convex problem by damped Newton with the autodiff Hessian (``p x p`` per replicate).

    Args:
      params0: start pytree. batch_loss: ``(params, x, y) -> (N,)``. x ``(N, dx)``, y ``(N,)``, w ``(N,)``.

    Returns:
      :class:`Solution` with ``params`` the flat vector (``ravel_pytree`` order of ``params0``).
    """
    theta0, unravel = ravel_pytree(params0)
    f = weighted_objective(batch_loss, unravel, x, y, w)
    value_grad = jax.value_and_grad(f)
    hessian = jax.hessian(f)

    def line_values(theta, d, alphas):
        return jax.vmap(lambda a: f(theta + a * d))(alphas)

    return _newton_loop(theta0, value_grad, hessian, line_values, tol=tol, max_steps=max_steps)


def closed_form(solve, batch_loss, x: Array, y: Array, w: Array, *, tol: Array) -> Solution:
    """The problem's closed-form weighted ERM ``solve(x, y, w)``, with the gradient norm it leaves (0 steps)."""
    params = solve(x, y, w)
    theta, unravel = ravel_pytree(params)
    gn = jnp.linalg.norm(jax.grad(weighted_objective(batch_loss, unravel, x, y, w))(theta))
    return Solution(theta, gn, gn <= tol, jnp.zeros((), jnp.int32))


def optax_fixed_steps(
    key: Array,
    params0: PyTree,
    batch_loss,
    x: Array,
    y: Array,
    w: Array,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int | None,
    tol: Array,
) -> Solution:
    """``steps`` optimizer steps on the weighted empirical risk (a non-convex problem's training).

    Full batch (``batch_size=None``): the gradient of ``sum_i w_i l_i / sum_i w_i``. Minibatch: each step draws
    ``batch_size`` indices with replacement, with probabilities ``w / sum w`` (so 0/1 membership weights sample
    members only and bootstrap counts are honoured), from ``fold_in(key, step)``, and uses their plain mean.

    Returns:
      :class:`Solution` with the flat parameters, the full-batch gradient norm at the end and
      ``converged = grad_norm <= tol`` (informative only: training always runs ``steps`` steps).
    """
    wn = w / jnp.sum(w)
    objective = lambda params: wn @ batch_loss(params, x, y)
    logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1)), -jnp.inf)

    def grad_fn(params, t):
        if batch_size is None:
            return jax.grad(objective)(params)
        idx = jax.random.categorical(jax.random.fold_in(key, t), logits, shape=(batch_size,))
        return jax.grad(lambda p: jnp.mean(batch_loss(p, x[idx], y[idx])))(params)

    def body(carry, t):
        params, opt_state = carry
        updates, opt_state = optimizer.update(grad_fn(params, t), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(body, (params0, optimizer.init(params0)), jnp.arange(steps))
    theta = ravel_pytree(params)[0]
    gn = jnp.linalg.norm(ravel_pytree(jax.grad(objective)(params))[0])
    return Solution(theta, gn, gn <= tol, jnp.full((), steps, jnp.int32))
