"""Sandwich (HC0) covariance of an M-estimator, per-sample gradients and diagonal curvature.

Parameters are handled as one flat vector ``theta = ravel_pytree(params)[0]`` (``p`` coordinates, ravel order):
every matrix returned here is indexed in that order.

For an empirical risk minimiser ``theta_hat``, ``sqrt(n) (theta_hat - theta*) -> N(0, Sigma)`` with the sandwich
``Sigma = H^-1 V H^-1`` (theory.md section 2). The plug-in estimate (HC0) uses the mean per-sample Hessian
``H_hat`` and the mean outer product of per-sample gradients ``V_hat`` at ``theta_hat``, so that
``Cov(theta_hat) ~ Sigma_hat / n``. For logistic regression it equals statsmodels'
``Logit(...).fit(cov_type="HC0").cov_params() * n``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

Array = jax.Array
PyTree = Any
LossFn = Callable[[PyTree, Array, Array], Array]

__all__ = [
    "BIAS_MAX_P",
    "estimator_bias",
    "hessian_diag",
    "per_sample_grads",
    "sandwich_covariance",
    "sandwich_covariance_batched",
    "sandwich_covariance_flagged",
    "sandwich_diagonal",
]

_HESSIAN_DIAG_METHODS = ("exact", "hutchinson")


# ----------------------------------------------------------------------------------------------------------------
# small helpers shared by the estimator modules
# ----------------------------------------------------------------------------------------------------------------
def flat_loss(loss_fn: LossFn, params: PyTree) -> tuple[Array, Callable, Callable[[Array, Array, Array], Array]]:
    """``(theta, unravel, f)`` with ``f(theta, x_i, y_i) = loss_fn(unravel(theta), x_i, y_i)``."""
    theta, unravel = ravel_pytree(params)

    def f(th, xi, yi):
        return loss_fn(unravel(th), xi, yi)

    return theta, unravel, f


def normalized_weights(weights: Array | None, n: int, dtype) -> Array:
    """Weights ``(n,)`` summing to one (uniform when ``weights`` is None)."""
    if weights is None:
        return jnp.full((n,), 1.0 / n, dtype=dtype)
    w = jnp.asarray(weights, dtype=dtype)
    return w / jnp.sum(w)


def check_data(x: Array, y: Array, weights: Array | None = None) -> int:
    """Validate one data set ``x (n, ...)``, ``y (n,)``, optional ``weights (n,)``; return ``n``."""
    x_shape, y_shape = jnp.shape(x), jnp.shape(y)
    if len(x_shape) < 1 or len(y_shape) != 1:
        raise ValueError(f"y must be one-dimensional (n,) and x (n, ...), got x.shape={x_shape}, y.shape={y_shape}")
    if x_shape[0] != y_shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got x.shape={x_shape}, y.shape={y_shape}")
    if weights is not None and jnp.shape(weights) != (x_shape[0],):
        raise ValueError(f"weights must have shape ({x_shape[0]},), got weights.shape={jnp.shape(weights)}")
    if x_shape[0] < 1:
        raise ValueError(f"x must hold at least one example, got x.shape={x_shape}")
    return int(x_shape[0])


def default_chunk(k: int, n: int, budget: int = 1 << 20) -> int:
    """A candidate-chunk size so that ``chunk * n`` stays near ``budget`` evaluations in memory at once."""
    return int(max(1, min(k, budget // max(n, 1))))


def check_chunk(chunk_size: int | None, name: str = "chunk_size") -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name} must be a positive int or None, got {name}={chunk_size!r}")


def chunked_sum(fn: Callable[..., Array], xs: tuple, chunk_size: int | None) -> Array:
    """``sum_i fn(*xs[i])`` over the leading axis, ``vmap``-ed in chunks inside a ``lax.scan`` (memory per chunk).

    The last chunk is padded; padded rows are dropped with ``where`` (their value is never summed).
    """
    n = int(jnp.shape(xs[0])[0])
    c = n if chunk_size is None else min(int(chunk_size), n)
    m = -(-n // c)
    pad = m * c - n
    mask = jnp.arange(m * c) < n

    def prep(a):
        a = jnp.asarray(a)
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
        return a.reshape((m, c) + a.shape[1:])

    chunks = tuple(prep(a) for a in xs)
    mask = mask.reshape(m, c)
    first = jax.eval_shape(lambda *a: fn(*a), *(a[0, 0] for a in chunks))

    def body(acc, inp):
        mk, *args = inp
        out = jax.vmap(fn)(*args)
        out = jnp.where(mk.reshape((c,) + (1,) * (out.ndim - 1)), out, 0)
        return acc + jnp.sum(out, axis=0), None

    acc0 = jnp.zeros(first.shape, first.dtype)
    return jax.lax.scan(body, acc0, (mask, *chunks))[0]


def hashable_skip(skip):
    """``skip`` as a hashable static argument (an iterable of names becomes a tuple)."""
    if skip is None or callable(skip) or isinstance(skip, str):
        return skip
    try:
        return tuple(skip)
    except TypeError:
        return skip  # the quantizer helpers report the bad value


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------------------------------------------
# per-sample gradients, Hessian and the sandwich
# ----------------------------------------------------------------------------------------------------------------
def per_sample_grads(loss_fn: LossFn, params: PyTree, x: Array, y: Array) -> Array:
    """Per-example gradients ``grad_theta l(theta, z_i)`` as a matrix, by ``vmap(grad)``.

    Args:
      loss_fn: ``loss_fn(params, x_i, y_i) -> scalar``, one example's loss.
      params: parameter pytree of one model (``p`` coordinates in ravel order).
      x: ``(n, ...)`` inputs. y: ``(n,)`` targets.

    Returns:
      ``(n, p)`` gradients in ``ravel_pytree`` order.
    """
    check_data(x, y)
    return _per_sample_grads(loss_fn, params, x, y)


@functools.partial(jax.jit, static_argnums=(0,))
def _per_sample_grads(loss_fn, params, x, y):
    theta, _, f = flat_loss(loss_fn, params)
    return jax.vmap(jax.grad(f), in_axes=(None, 0, 0))(theta, x, y)


def _mean_loss(f, x, y, w):
    def total(th):
        return jnp.sum(w * jax.vmap(f, in_axes=(None, 0, 0))(th, x, y))

    return total


def _sandwich_core(f, theta, x, y, w, pinv: bool):
    """Sigma_hat and an ok flag for one model (traceable)."""
    p = theta.shape[0]
    hess = jax.hessian(_mean_loss(f, x, y, w))(theta)
    hess = 0.5 * (hess + hess.T)
    grads = jax.vmap(jax.grad(f), in_axes=(None, 0, 0))(theta, x, y)
    v = (grads * w[:, None]).T @ grads
    eig = jnp.abs(jnp.linalg.eigvalsh(hess))
    eps = jnp.finfo(hess.dtype).eps
    finite = jnp.all(jnp.isfinite(hess)) & jnp.all(jnp.isfinite(v))
    nonsingular = jnp.min(eig) > jnp.max(eig) * max(p, 1) * eps
    if pinv:
        hp = jnp.linalg.pinv(hess, hermitian=True)
        cov = hp @ v @ hp
        ok = finite & jnp.all(jnp.isfinite(cov))
    else:
        a = jnp.linalg.solve(hess, v)  # H^-1 V
        cov = jnp.linalg.solve(hess, a.T).T  # (H^-1 (H^-1 V)^T)^T = H^-1 V H^-1 (H symmetric)
        ok = finite & nonsingular & jnp.all(jnp.isfinite(cov))
    cov = 0.5 * (cov + cov.T)
    return cov, ok


def sandwich_covariance(
    loss_fn: LossFn,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    weights: Array | None = None,
    pinv: bool = False,
) -> Array:
    """Plug-in sandwich covariance ``Sigma_hat = H_hat^-1 V_hat H_hat^-1`` (HC0) of one trained model.

    theory.md section 2: with ``w_i`` the normalised weights (``1/n`` by default),
    ``H_hat = hessian_theta sum_i w_i l(theta, z_i)`` (``jax.hessian`` of the weighted mean loss) and
    ``V_hat = sum_i w_i g_i g_i^T`` with per-sample gradients ``g_i`` (``vmap(grad)``), both at ``params``.
    ``Sigma_hat`` is formed with two linear solves (no explicit inverse), so ``Cov(theta_hat) ~ Sigma_hat / n``.
    For logistic regression it equals ``statsmodels.Logit(y, X).fit(cov_type="HC0").cov_params() * n``.

    Batching: for a stack of replicates use :func:`sandwich_covariance_batched` (a ``vmap`` of the same core that
    reports singular replicates instead of raising). Under ``jit``/``vmap`` the values are traced, so this function
    cannot check them and returns the solve unchecked: use :func:`sandwich_covariance_flagged` there.

    Args:
      loss_fn: ``loss_fn(params, x_i, y_i) -> scalar`` one example's loss.
      params: parameter pytree of one trained model (``p`` coordinates, ravel order).
      x: ``(n, ...)`` training inputs. y: ``(n,)`` targets.
      weights: optional ``(n,)`` non-negative example weights (membership weights of a shared pool); the
        statistics are weighted means.
      pinv: use the Moore-Penrose pseudo-inverse of ``H_hat`` instead of raising when it is singular.

    Returns:
      ``(p, p)`` symmetric ``Sigma_hat`` in ``ravel_pytree`` order.

    Raises:
      ValueError: ``n < p``, mismatched shapes, or (without ``pinv``) ``H_hat`` singular or non-finite.

    >>> import jax.numpy as jnp
    >>> loss = lambda prm, xi, yi: 0.5 * jnp.sum((prm["mu"] - xi) ** 2)
    >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    >>> cov = sandwich_covariance(loss, {"mu": jnp.array([1.5])}, x, jnp.zeros(4))
    >>> round(float(cov[0, 0]), 4)  # the (biased) sample variance: H = 1, V = mean (mu - x)^2
    1.25
    """
    cov, ok = sandwich_covariance_flagged(loss_fn, params, x, y, weights=weights, pinv=pinv)
    if not _is_tracer(ok) and not bool(ok):
        raise ValueError(
            "H (the mean Hessian of the loss at params) is singular or non-finite; "
            "pass pinv=True for a pseudo-inverse, or use sandwich_covariance_batched to flag it"
        )
    return cov


def sandwich_covariance_flagged(
    loss_fn: LossFn,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    weights: Array | None = None,
    pinv: bool = False,
) -> tuple[Array, Array]:
    """:func:`sandwich_covariance` that flags a singular ``H_hat`` instead of raising (safe under ``jit``/``vmap``).

    Same estimator (theory.md section 2). ``H_hat`` counts as singular when its smallest absolute eigenvalue is
    below ``p * eps * max |eigenvalue|`` (the rank tolerance of ``numpy.linalg.matrix_rank``) or it is not finite.

    Args:
      loss_fn, params, x, y, weights, pinv: as in :func:`sandwich_covariance`.

    Returns:
      ``(cov, ok)``: ``(p, p)`` ``Sigma_hat`` and a scalar bool, False where ``H_hat`` is singular or not finite.
    """
    n = check_data(x, y, weights)
    p = int(ravel_pytree(params)[0].shape[0])
    if n < p:
        raise ValueError(f"x: the sandwich needs at least p = {p} examples, got n = {n}")
    return _sandwich_params(loss_fn, params, x, y, weights, pinv=bool(pinv))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("pinv",))
def _sandwich_params(loss_fn, params, x, y, weights, *, pinv):
    theta, _, f = flat_loss(loss_fn, params)
    w = normalized_weights(weights, x.shape[0], theta.dtype)
    return _sandwich_core(f, theta, x, y, w, pinv)


def sandwich_covariance_batched(
    loss_fn: LossFn,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    weights: Array | None = None,
    pinv: bool = False,
) -> tuple[Array, Array]:
    """:func:`sandwich_covariance` for ``R`` replicates at once (``vmap``), flagging singular ones.

    Same estimator as :func:`sandwich_covariance` (theory.md section 2), ``vmap``-ed over the leading replicate
    axis of ``params``. Data are either one shared pool ``x (N, ...)``, ``y (N,)`` (with membership weights
    ``(R, N)``), or one data set per replicate ``x (R, n, ...)``, ``y (R, n)``: shared when ``y`` is 1-D.

    Args:
      loss_fn: one example's loss ``loss_fn(params, x_i, y_i)``.
      params: pytree whose leaves carry a leading replicate axis ``R``.
      x, y: shared ``(N, ...)``, ``(N,)`` or per replicate ``(R, n, ...)``, ``(R, n)``.
      weights: optional ``(R, N)`` (or ``(R, n)``) example weights.
      pinv: pseudo-inverse instead of a solve.

    Returns:
      ``(cov, ok)``: ``(R, p, p)`` covariances and ``(R,)`` bool, False where ``H_hat`` was singular or not
      finite (the covariance there is not meaningful).
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params must hold at least one array")
    r = int(jnp.shape(leaves[0])[0])
    one = jax.tree_util.tree_map(lambda a: a[0], params)
    p = int(ravel_pytree(one)[0].shape[0])
    shared = jnp.ndim(y) == 1
    if shared:
        n = check_data(x, y)
    else:
        if jnp.shape(y)[0] != r or jnp.shape(x)[0] != r:
            raise ValueError(f"per-replicate x, y need a leading axis R = {r}, got {jnp.shape(x)}, {jnp.shape(y)}")
        n = check_data(x[0], y[0])
    if weights is not None and jnp.shape(weights) != (r, n):
        raise ValueError(f"weights must have shape ({r}, {n}), got weights.shape={jnp.shape(weights)}")
    if n < p:
        raise ValueError(f"x: the sandwich needs at least p = {p} examples, got n = {n}")
    return _sandwich_batched(loss_fn, params, x, y, weights, pinv=bool(pinv), shared=bool(shared))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("pinv", "shared"))
def _sandwich_batched(loss_fn, params, x, y, weights, *, pinv, shared):
    data_axis = None if shared else 0
    w_axis = None if weights is None else 0

    def one_model(prm, xx, yy, ww):
        return _sandwich_params(loss_fn, prm, xx, yy, ww, pinv=pinv)

    return jax.vmap(one_model, in_axes=(0, data_axis, data_axis, w_axis))(params, x, y, weights)


def hessian_diag(
    loss_fn: LossFn,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    weights: Array | None = None,
    method: str = "exact",
    key: Array | None = None,
    num_probes: int = 64,
    chunk_size: int | None = None,
) -> Array:
    """Diagonal of the Hessian of the (weighted) mean loss, ``h_jj = d^2 L_n / d theta_j^2``.

    theory.md section 6 ("Cost"): the second-order form of the loss differences needs the diagonal curvature.
    ``method="exact"``: ``h_jj = e_j^T (H e_j)`` from one Hessian-vector product (forward-over-reverse) per
    coordinate, ``lax.map``-ed in chunks: ``p`` HVPs, no ``p x p`` matrix in memory.
    ``method="hutchinson"`` (for ``p > 10^4``): ``h ~ mean_s v_s * (H v_s)`` over ``num_probes`` Rademacher
    probes ``v_s``; unbiased, with per-coordinate variance ``sum_{i != j} H_ij^2 / num_probes``, so exact when
    ``H`` is diagonal.

    Args:
      loss_fn: one example's loss. params: one model's parameter pytree.
      x: ``(n, ...)`` inputs. y: ``(n,)`` targets. weights: optional ``(n,)`` example weights.
      method: ``"exact"`` or ``"hutchinson"``.
      key: PRNG key, required by ``"hutchinson"``.
      num_probes: number of Hutchinson probes.
      chunk_size: HVPs evaluated at once (default: one at a time, in a ``lax.map``).

    Returns:
      ``(p,)`` diagonal in ``ravel_pytree`` order.
    """
    if method not in _HESSIAN_DIAG_METHODS:
        raise ValueError(f"method must be one of {_HESSIAN_DIAG_METHODS}, got method={method!r}")
    check_chunk(chunk_size)
    check_data(x, y, weights)
    if method == "hutchinson":
        if key is None:
            raise ValueError("key must be a PRNG key for method='hutchinson', got key=None")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive int, got num_probes={num_probes!r}")
    return _hessian_diag(
        loss_fn, params, x, y, weights, key, method=method, num_probes=num_probes, chunk_size=chunk_size
    )


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("method", "num_probes", "chunk_size"))
def _hessian_diag(loss_fn, params, x, y, weights, key, *, method, num_probes, chunk_size):
    theta, _, f = flat_loss(loss_fn, params)
    p = theta.shape[0]
    w = normalized_weights(weights, x.shape[0], theta.dtype)
    grad_fn = jax.grad(_mean_loss(f, x, y, w))

    def hvp(v):
        return jax.jvp(grad_fn, (theta,), (v,))[1]

    if method == "exact":

        def one(j):
            e = jax.nn.one_hot(j, p, dtype=theta.dtype)
            return hvp(e)[j]

        return jax.lax.map(one, jnp.arange(p), batch_size=chunk_size)
    probes = jax.random.rademacher(key, (num_probes, p), dtype=theta.dtype)
    est = jax.lax.map(lambda v: v * hvp(v), probes, batch_size=chunk_size)
    return jnp.mean(est, axis=0)


def sandwich_diagonal(
    loss_fn: LossFn,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    weights: Array | None = None,
    hess_diag: Array | None = None,
    chunk_size: int | None = None,
) -> Array:
    """Diagonal approximation of the sandwich for large models: ``Sigma_jj ~ V_jj / H_jj^2``.

    theory.md sections 2 and 6: treating ``H_hat`` as diagonal (exact for separable losses, e.g. the Gaussian
    mean), ``Sigma_hat = H^-1 V H^-1`` has diagonal ``V_jj / H_jj^2``, with ``V_jj = sum_i w_i g_ij^2``. This costs
    ``n`` per-sample gradients plus :func:`hessian_diag` and never forms a ``p x p`` matrix; use it when
    ``p > 10^4``. Off-diagonal curvature is ignored, so it is an approximation otherwise.

    Args:
      loss_fn: one example's loss. params: one model's parameter pytree.
      x: ``(n, ...)`` inputs. y: ``(n,)`` targets. weights: optional ``(n,)`` example weights.
      hess_diag: optional precomputed ``(p,)`` Hessian diagonal (e.g. Hutchinson); exact when None.
      chunk_size: examples per chunk for the per-sample gradients (default: all at once).

    Returns:
      ``(p,)`` approximate ``diag(Sigma_hat)`` in ``ravel_pytree`` order.
    """
    check_chunk(chunk_size)
    check_data(x, y, weights)
    p = int(ravel_pytree(params)[0].shape[0])
    if hess_diag is None:
        hess_diag = hessian_diag(loss_fn, params, x, y, weights=weights)
    if jnp.shape(hess_diag) != (p,):
        raise ValueError(f"hess_diag must have shape ({p},), got hess_diag.shape={jnp.shape(hess_diag)}")
    return _sandwich_diagonal(loss_fn, params, x, y, weights, jnp.asarray(hess_diag), chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size",))
def _sandwich_diagonal(loss_fn, params, x, y, weights, h, *, chunk_size):
    theta, _, f = flat_loss(loss_fn, params)
    w = normalized_weights(weights, x.shape[0], theta.dtype)
    g = jax.grad(f)
    v_diag = chunked_sum(lambda xi, yi, wi: wi * g(theta, xi, yi) ** 2, (x, y, w), chunk_size)
    return v_diag / h.astype(v_diag.dtype) ** 2


# ----------------------------------------------------------------------------------------------------------------
# the estimator's second-order bias
# ----------------------------------------------------------------------------------------------------------------
BIAS_MAX_P = 256  # the bias costs p^2 loss evaluations per example: beyond this it is not computed


def estimator_bias(
    loss_fn: LossFn,
    params: PyTree,
    x: Array,
    y: Array,
    *,
    chunk_size: int | None = 1024,
) -> Array:
    """The order-``1/n`` bias ``b`` of an M-estimator: ``E[theta_hat] - theta* = b / n + o(1/n)``.

    theory.md section 5: expanding the estimating equation ``mean_i grad l(theta_hat, Z_i) = 0`` to second order
    around ``theta*`` (with ``psi(z) = -H^-1 grad l(theta*, z)``, ``H`` and ``J = E[grad l grad l^T]`` the
    population Hessian and gradient covariance, ``T`` the population loss's third derivative)::

        b = H^-1 ( E[ hess l(theta*, Z) H^-1 grad l(theta*, Z) ] - 1/2 T[H^-1 J H^-1] )

    where ``T[S]_a = sum_bc T_abc S_bc = d/dtheta_a tr(hess L(theta) S)``, computed as the gradient of
    ``sum_k v_k^T hess l v_k`` over the columns ``v_k`` of a square root of ``S`` (forward-over-forward-over-reverse
    autodiff; ``p^2`` directional derivatives per example). Expectations are means over ``(x, y)``, a large fresh
    sample at ``params = theta*``. Closed forms: the exponential rate (``l = theta z - log theta``) has
    ``b = theta``, the Gaussian variance (``l = (z - mu)^2 / (2 v) + log(v) / 2``) has ``b = (0, -v)``; the sample
    mean (a quadratic loss) has ``b = 0``.

    The bias moves every threshold margin ``m_k(theta_hat)`` by ``grad m_k^T b / n`` on average, a shift of
    ``sqrt(n) m_k / s_k`` of order ``1/sqrt(n)``, as large as the skewness term of an Edgeworth expansion; the
    predicted flip probability of :func:`~qmis_jax.indicator.population_indicator` uses neither (theory.md section
    5 says why), and the rates ``I_k`` and ``r`` are limits.

    Args:
      loss_fn: ``loss_fn(params, x_i, y_i) -> scalar`` one example's loss (three times differentiable).
      params: ``theta*`` (pytree, ``p <=`` :data:`BIAS_MAX_P` coordinates).
      x: ``(m, ...)`` inputs of a fresh sample. y: ``(m,)`` targets.
      chunk_size: examples per ``vmap`` chunk (memory).

    Returns:
      ``(p,)`` ``b`` in ``ravel_pytree`` order, float64 on the host (NaN where ``H`` is singular).

    Raises:
      ValueError: mismatched shapes, ``m < p`` or ``p > BIAS_MAX_P``.

    >>> import jax.numpy as jnp
    >>> loss = lambda prm, xi, yi: prm["rate"][0] * xi[0] - jnp.log(prm["rate"][0])
    >>> x = jnp.array([[0.0], [2.0]])  # mean 1 and variance 1, as the exponential law of rate 1: b = theta = 1
    >>> round(float(estimator_bias(loss, {"rate": jnp.array([1.0])}, x, jnp.zeros(2))[0]), 6)
    1.0
    """
    m = check_data(x, y)
    check_chunk(chunk_size)
    theta, _, _ = flat_loss(loss_fn, params)
    p = int(theta.shape[0])
    if p > BIAS_MAX_P:
        raise ValueError(f"params: the bias is computed for at most {BIAS_MAX_P} coordinates, got p = {p}")
    if m < p:
        raise ValueError(f"x: the bias needs at least p = {p} examples, got m = {m}")
    h_sum, v_sum = (np.asarray(a, np.float64) for a in _bias_moments(loss_fn, params, x, y, chunk_size=chunk_size))
    h, v = 0.5 * (h_sum + h_sum.T) / m, v_sum / m
    try:
        h_inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        return np.full(p, np.nan)
    s = h_inv @ v @ h_inv
    eig, vec = np.linalg.eigh(0.5 * (s + s.T))
    root = vec * np.sqrt(np.clip(eig, 0.0, None))[None, :]  # S = root root^T
    dtype = theta.dtype
    sums = _bias_terms(loss_fn, params, x, y, jnp.asarray(h_inv, dtype), jnp.asarray(root.T, dtype),
                       chunk_size=chunk_size)  # fmt: skip
    t1, t2 = (np.asarray(a, np.float64) / m for a in sums)
    return h_inv @ (t1 - 0.5 * t2)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size",))
def _bias_moments(loss_fn, params, x, y, *, chunk_size):
    theta, _, f = flat_loss(loss_fn, params)

    def one(xi, yi):
        g = jax.grad(f)(theta, xi, yi)
        return jax.hessian(f)(theta, xi, yi), g[:, None] * g[None, :]

    return chunked_sum(lambda xi, yi: jnp.stack(one(xi, yi)), (x, y), chunk_size)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk_size",))
def _bias_terms(loss_fn, params, x, y, h_inv, roots, *, chunk_size):
    """Sums over the examples of ``hess l H^-1 grad l`` and of ``grad_theta sum_k v_k^T hess l v_k``."""
    theta, _, f = flat_loss(loss_fn, params)

    def one(xi, yi):
        def fi(th):
            return f(th, xi, yi)

        g = jax.grad(fi)(theta)
        t1 = jax.jvp(jax.grad(fi), (theta,), (h_inv @ g,))[1]

        def curvature(th):
            def second(v):
                return jax.jvp(lambda s: jax.jvp(fi, (s,), (v,))[1], (th,), (v,))[1]

            return jnp.sum(jax.vmap(second)(roots))

        return jnp.stack([t1, jax.grad(curvature)(theta)])

    return chunked_sum(one, (x, y), chunk_size)
