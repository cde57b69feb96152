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


def psd_cholesky(hess: Array) -> Array:
    """Lower Cholesky factor of ``H + mu I`` with the relative jitter ``mu = 100 eps mean(diag H)``.

    The jitter keeps a singular but positive semi-definite Hessian (a feature absent from a replicate's data)
    factorisable without moving the fixed point ``g = 0``.
    """
    p = hess.shape[0]
    eps = jnp.finfo(hess.dtype).eps
    mu = 100 * eps * jnp.maximum(jnp.trace(hess) / p, jnp.finfo(hess.dtype).tiny)
    return jnp.linalg.cholesky(hess + mu * jnp.eye(p, dtype=hess.dtype))


def newton_direction(g: Array, hess: Array) -> Array:
    """Newton direction ``-(H + mu I)^{-1} g`` by Cholesky (see :func:`psd_cholesky`); ``-g`` if that fails."""
    d = -jax.scipy.linalg.cho_solve((psd_cholesky(hess), True), g)
    return jnp.where(jnp.all(jnp.isfinite(d)), d, -g)


def backtrack(value_at: Callable[[Array], Array], f0: Array, gd: Array, skip: Array | bool = False) -> Array:
    """Largest step ``a`` in ``1, 1/2, ..., 2^-(LINE_SEARCH_STEPS - 1)`` with ``value_at(a) <= f0 + c a gd``
    (Armijo, ``c = 1e-4``), tried in that order and stopping at the first success; 0 when none succeeds.

    A ``lax.while_loop``: vmapped over replicates it runs as many trials as the slowest replicate needs, which is
    one almost always (full Newton or quasi-Newton steps are accepted), instead of evaluating every step size.
    With ``skip`` true no trial is made and the full step ``1`` is returned (the caller tests it otherwise).
    """
    return backtrack_value(value_at, f0, gd, skip)[0]


def backtrack_value(
    value_at: Callable[[Array], Array], f0: Array, gd: Array, skip: Array | bool = False
) -> tuple[Array, Array]:
    """:func:`backtrack` that also returns the objective at the step taken (``f0`` when skipped or failed)."""
    one = jnp.ones((), f0.dtype)

    def cond(c):
        j, _, _, ok = c
        return ~ok & (j < LINE_SEARCH_STEPS)

    def body(c):
        j, a, _, _ = c
        val = value_at(a)
        ok = (val <= f0 + ARMIJO_C * a * gd) & jnp.isfinite(val)
        return j + 1, jnp.where(ok, a, 0.5 * a), jnp.where(ok, val, f0), ok

    init = (jnp.zeros((), jnp.int32), one, f0, jnp.asarray(skip, bool))
    _, a, val, ok = jax.lax.while_loop(cond, body, init)
    return jnp.where(ok, a, 0.0), val


def _newton_loop(
    theta0: Array,
    value_grad: Callable[[Array], tuple[Array, Array]],
    hessian: Callable[[Array], Array],
    line_search: Callable[[Array, Array], Callable[[Array], Array]],
    *,
    tol: Array,
    max_steps: int,
) -> Solution:
    """Damped Newton's method with an Armijo backtracking line search (:func:`backtrack`).

    Stops when ``||g||_2 <= tol``, after ``max_steps`` iterations, or when no step makes progress: no Armijo step,
    or, once the predicted decrease ``-g.d`` is below the floating-point resolution of the objective (where the
    Armijo test is noise and full Newton steps are safe), a full step that does not lower ``||g||``.
    """
    eps = jnp.finfo(theta0.dtype).eps

    def cond(s: _NewtonState):
        return ~s.done

    def body(s: _NewtonState):
        d = newton_direction(s.g, hessian(s.theta))
        gd = s.g @ d
        tiny = -gd <= 10 * eps * (1 + jnp.abs(s.f))
        alpha = backtrack(line_search(s.theta, d), s.f, gd, skip=tiny)
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


class GLMParts(NamedTuple):
    """Objective pieces of a weighted generalised linear model on one design (see :func:`glm_parts`)."""

    value_grad: Callable[[Array], tuple[Array, Array]]
    hessian: Callable[[Array], Array]
    line_search: Callable[[Array, Array], Callable[[Array], Array]]
    eta_value_grad: Callable[[Array], tuple[Array, Array, Array]]
    grad_from_eta: Callable[[Array], tuple[Array, Array]]


def glm_parts(design: Array, y: Array, w: Array, margin_loss, features: Array | None) -> GLMParts:
    """``f(theta) = sum_i w_i m(x_i . theta, y_i) / sum_i w_i``, its gradient ``X^T (w m') / sum w`` and Hessian
    ``X^T diag(w m'') X / sum w`` (from the Khatri-Rao ``features`` when given), for one replicate."""
    wn = w / jnp.sum(w)
    m1 = jax.vmap(jax.grad(margin_loss))
    m2 = jax.vmap(jax.grad(jax.grad(margin_loss)))
    p = design.shape[1]

    def grad_from_eta(eta):
        return wn @ margin_loss(eta, y), (wn * m1(eta, y)) @ design

    def eta_value_grad(theta):
        eta = design @ theta
        return (eta, *grad_from_eta(eta))

    def value_grad(theta):
        return grad_from_eta(design @ theta)

    def hessian(theta):
        s = wn * m2(design @ theta, y)
        if features is not None:
            return unpack_triangle(features @ s, p)
        return (design * s[:, None]).T @ design

    def line_search(theta, d):
        eta, xd = design @ theta, design @ d
        return lambda a: wn @ margin_loss(eta + a * xd, y)

    return GLMParts(value_grad, hessian, line_search, eta_value_grad, grad_from_eta)


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
    ``X^T (w m') / sum w``; Hessian ``X^T diag(w m'') X / sum w``, computed as ``K^T (w m'')`` from the Khatri-Rao
    ``features`` when given (see :func:`triangle_features`), else directly. Costs ``O(N p^2)`` per iteration.

    Args:
      theta0: ``(p,)`` start. design: ``(N, p)``. y, w: ``(N,)``; ``w >= 0`` with a positive sum.
      margin_loss: elementwise ``m(eta, y)``, convex in ``eta``.
      features: ``(p (p + 1) / 2, N)`` from :func:`triangle_features`, or None.
      tol: gradient-norm tolerance (scalar array). max_steps: iteration cap.

    Returns:
      :class:`Solution` with ``params`` the flat ``(p,)`` vector.
    """
    parts = glm_parts(design, y, w, margin_loss, features)
    return _newton_loop(theta0, parts.value_grad, parts.hessian, parts.line_search, tol=tol, max_steps=max_steps)


QN_MEMORY = 8  # curvature pairs kept by the quasi-Newton solver


def lbfgs_direction(g: Array, s_mem: Array, y_mem: Array, rho: Array, precond: Array) -> Array:
    """``-H g`` for the L-BFGS inverse-Hessian ``H`` built from the pairs ``(s_j, y_j)`` (newest first, unused rows
    with ``rho_j = 0``) on top of the initial inverse Hessian ``precond`` (the two-loop recursion, Nocedal and
    Wright, algorithm 7.4)."""
    q, alphas = g, []
    for j in range(s_mem.shape[0]):
        a = rho[j] * (s_mem[j] @ q)
        q = q - a * y_mem[j]
        alphas.append(a)
    r = precond @ q
    for j in reversed(range(s_mem.shape[0])):
        r = r + (alphas[j] - rho[j] * (y_mem[j] @ r)) * s_mem[j]
    return -r


def inverse_hessian(hess: Array) -> Array:
    """``(H + mu I)^{-1}`` with the jitter of :func:`psd_cholesky` (the shared preconditioner of :func:`glm_lbfgs`)."""
    eye = jnp.eye(hess.shape[0], dtype=hess.dtype)
    return jax.scipy.linalg.cho_solve((psd_cholesky(hess), True), eye)


class LBFGSState(NamedTuple):
    """One replicate's L-BFGS state (:func:`glm_lbfgs_init`, :func:`glm_lbfgs_step`); ``eta = X theta``."""

    theta: Array
    eta: Array
    f: Array
    g: Array
    gn: Array
    s_mem: Array
    y_mem: Array
    rho: Array
    step: Array
    stalled: Array
    done: Array


def glm_lbfgs_init(theta0: Array, parts: GLMParts, *, tol: Array, max_steps: int) -> LBFGSState:
    """The state at ``theta0``: margins, objective, gradient and an empty curvature memory."""
    eta, f, g = parts.eta_value_grad(theta0)
    gn = jnp.linalg.norm(g)
    zeros = jnp.zeros((QN_MEMORY, theta0.shape[0]), theta0.dtype)
    no = jnp.zeros((), bool)
    done = (gn <= tol) | (max_steps <= 0)
    step = jnp.zeros((), jnp.int32)
    return LBFGSState(theta0, eta, f, g, gn, zeros, zeros, jnp.zeros(QN_MEMORY, theta0.dtype), step, no, done)


def glm_lbfgs_step(
    s: LBFGSState, design: Array, y: Array, w: Array, *, margin_loss, precond: Array, tol: Array, max_steps: int
) -> LBFGSState:
    """One L-BFGS iteration (see :func:`glm_lbfgs`); a finished state (``done``) is returned unchanged."""
    wn = w / jnp.sum(w)
    m1 = jax.vmap(jax.grad(margin_loss))
    eps = jnp.finfo(s.theta.dtype).eps
    d = lbfgs_direction(s.g, s.s_mem, s.y_mem, s.rho, precond)
    gd = s.g @ d
    d = jnp.where((gd < 0) & jnp.isfinite(gd), d, -(precond @ s.g))
    gd = s.g @ d
    xd = design @ d
    tiny = -gd <= 10 * eps * (1 + jnp.abs(s.f))
    # The objective at the step comes from the line search; below its resolution (tiny) it is kept as it is.
    alpha, f = backtrack_value(lambda a: wn @ margin_loss(s.eta + a * xd, y), s.f, gd, skip=tiny | s.done)
    theta, eta = s.theta + alpha * d, s.eta + alpha * xd
    g = (wn * m1(eta, y)) @ design
    gn = jnp.linalg.norm(g)
    # Below the objective's resolution the Armijo test is noise: a full step is kept unless the gradient grows
    # (quasi-Newton gradient norms need not fall monotonically; the iteration cap bounds the rest).
    accept = jnp.where(tiny, gn < 2 * s.gn, alpha > 0) & jnp.isfinite(f) & jnp.isfinite(gn)
    sv, yv = theta - s.theta, g - s.g
    sy = sv @ yv
    keep = accept & (sy > eps * jnp.linalg.norm(sv) * jnp.linalg.norm(yv)) & (sy > 0)
    push = lambda mem, row: jnp.where(keep, jnp.concatenate([row[None], mem[:-1]]), mem)
    had_memory = jnp.any(s.rho != 0)
    # A rejected step with curvature pairs in memory restarts from -precond g; without them the solver stalls.
    reset = ~accept & had_memory
    pick = lambda new, old: jnp.where(accept, new, old)
    step = s.step + 1
    gn = pick(gn, s.gn)
    stalled = ~accept & ~had_memory
    new = LBFGSState(
        pick(theta, s.theta),
        pick(eta, s.eta),
        pick(f, s.f),
        pick(g, s.g),
        gn,
        jnp.where(reset, 0.0, push(s.s_mem, sv)),
        jnp.where(reset, 0.0, push(s.y_mem, yv)),
        jnp.where(reset, 0.0, push(s.rho, jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), 0.0))),
        step,
        stalled,
        (gn <= tol) | (step >= max_steps) | stalled,
    )
    return jax.tree.map(lambda old, upd: jnp.where(s.done, old, upd), s, new)


def glm_lbfgs_refresh(s: LBFGSState, parts: GLMParts, *, tol: Array, max_steps: int) -> LBFGSState:
    """Margins, objective and gradient recomputed from ``X theta`` (the updates ``eta + a X d`` drift by rounding),
    and ``done`` re-decided on that exact gradient: the certificate of the returned parameters."""
    eta, f, g = parts.eta_value_grad(s.theta)
    gn = jnp.linalg.norm(g)
    done = (gn <= tol) | (s.step >= max_steps) | s.stalled
    return s._replace(eta=eta, f=f, g=g, gn=gn, done=done)


def glm_lbfgs(
    theta0: Array,
    design: Array,
    y: Array,
    w: Array,
    *,
    margin_loss: Callable[[Array, Array], Array],
    precond: Array,
    tol: Array,
    max_steps: int,
) -> Solution:
    """Weighted ERM of a generalised linear model by L-BFGS preconditioned with a fixed inverse Hessian.

    Same objective as :func:`glm_newton` (theory.md section 1). ``precond`` is the inverse Hessian of a pilot fit
    (the whole pool with unit weights, or a pilot sample of the data law), shared by every replicate: the L-BFGS
    pairs correct the difference between it and the replicate's own curvature, and no per-replicate Hessian
    (``2 n p^2`` flops) is ever formed. An iteration costs two passes over the design (``X d`` for the line search,
    ``X^T r`` for the gradient; the margins are updated as ``eta + a X d``): ``4 n p`` flops against ``2 n p^2``
    for one Newton Hessian. Armijo backtracking on the margins (:func:`backtrack`); a pair with ``s.y <= 0`` is
    skipped and a rejected step restarts from ``-precond g`` (stops if that fails too). When the loop ends the
    gradient is recomputed from ``X theta`` and the loop resumes if that exact gradient is above ``tol``, so
    ``converged`` certifies the returned parameters.

    Args:
      theta0: ``(p,)`` start. design: ``(N, p)``. y, w: ``(N,)``; ``w >= 0`` with a positive sum.
      margin_loss: elementwise ``m(eta, y)``, convex in ``eta``.
      precond: ``(p, p)`` symmetric positive definite initial inverse Hessian.
      tol: gradient-norm tolerance (scalar array). max_steps: iteration cap.

    Returns:
      :class:`Solution` with ``params`` the flat ``(p,)`` vector.
    """
    parts = glm_parts(design, y, w, margin_loss, None)
    kw = dict(tol=tol, max_steps=max_steps)
    step = lambda s: glm_lbfgs_step(s, design, y, w, margin_loss=margin_loss, precond=precond, **kw)
    s = glm_lbfgs_init(theta0, parts, **kw)
    for _ in range(2):  # the second round runs only where the exact gradient is still above tol
        s = glm_lbfgs_refresh(jax.lax.while_loop(lambda s: ~s.done, step, s), parts, **kw)
    return Solution(s.theta, s.gn, s.gn <= tol, s.step)


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

    def line_search(theta, d):
        return lambda a: f(theta + a * d)

    return _newton_loop(theta0, value_grad, hessian, line_search, tol=tol, max_steps=max_steps)


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
    cdf = jnp.cumsum(w)

    def grad_fn(params, t):
        if batch_size is None:
            return jax.grad(objective)(params)
        # Inverse-CDF draws with probabilities w / sum w: zero-weight examples are never drawn.
        u = jax.random.uniform(jax.random.fold_in(key, t), (batch_size,), cdf.dtype) * cdf[-1]
        idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), w.shape[0] - 1)
        return jax.grad(lambda p: jnp.mean(batch_loss(p, x[idx], y[idx])))(params)

    def body(carry, t):
        params, opt_state = carry
        updates, opt_state = optimizer.update(grad_fn(params, t), opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(body, (params0, optimizer.init(params0)), jnp.arange(steps))
    theta = ravel_pytree(params)[0]
    gn = jnp.linalg.norm(ravel_pytree(jax.grad(objective)(params))[0])
    return Solution(theta, gn, gn <= tol, jnp.full((), steps, jnp.int32))
