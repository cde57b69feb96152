"""Linear regression with Gaussian design (a convex generalised linear model with a closed-form ERM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Problem
from ._checks import finite, positive_int
from ._glm import intercept_design, linear_init, linear_margin, penalised_loss

Array = jax.Array


def _squared_margin_loss(eta: Array, y: Array) -> Array:
    return 0.5 * (eta - y) ** 2


def linear_regression(*, dim: int, noise: float = 1.0, l2: float = 0.0, seed: int = 0) -> Problem:
    """Least squares ``y ~ b + x @ w`` on ``x ~ N(0, I_dim)``, ``y = b* + x @ w* + noise * eps``.

    The coefficients ``w* ~ N(0, I / dim)`` and intercept ``b* ~ N(0, 1)`` are drawn from
    ``numpy.random.default_rng(seed)``, so the law is fixed by the config. Per-example loss
    ``l(theta, (x, y)) = (y - b - x @ w)^2 / 2 + (l2 / 2) ||w||^2``. The weighted ERM is closed form
    (``solve``: ``(X^T W X / sum w + l2 D) theta = X^T W y / sum w`` with ``X = [1, x]`` and ``D`` the identity
    without its intercept entry), and the population optimum is ``b = b*``, ``w = w* / (1 + l2)``
    (``population``). Sandwich ingredients (theory.md section 2): ``H = I + l2 D``, ``V = noise^2 I`` at ``l2 = 0``.

    ``design`` and ``margin_loss`` (``(eta - y)^2 / 2``) are provided when ``l2 == 0``.

    Args:
      dim: input dimension (parameters: ``dim + 1``).
      noise: standard deviation of the additive noise, >= 0.
      l2: ridge penalty on ``w`` (not on the intercept), >= 0.
      seed: fixes ``w*`` and ``b*``.

    Returns:
      A convex regression :class:`Problem` with parameters ``{"b": (1,), "w": (dim, 1)}``.

    >>> import jax
    >>> p = linear_regression(dim=3)
    >>> x, y = p.sample(jax.random.key(0), 10)
    >>> p.solve(x, y, jax.numpy.ones(10))["w"].shape
    (3, 1)
    """
    dim = positive_int("dim", dim)
    noise = finite("noise", noise, nonnegative=True)
    l2 = finite("l2", l2, nonnegative=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    w_star = rng.standard_normal(dim) / np.sqrt(dim)
    b_star = float(rng.standard_normal())

    def sample(key: Array, n: int) -> tuple[Array, Array]:
        k_x, k_e = jax.random.split(key)
        x = jax.random.normal(k_x, (n, dim))
        eps = jax.random.normal(k_e, (n,), x.dtype)
        return x, b_star + x @ jnp.asarray(w_star, x.dtype) + noise * eps

    loss = penalised_loss(_squared_margin_loss, linear_margin, l2=l2, penalised=lambda p: [p["w"]])

    def predict(params, x: Array) -> Array:
        return linear_margin(params, x)

    def solve(x: Array, y: Array, w: Array):
        design = intercept_design(x)
        wn = w / jnp.sum(w)
        gram = design.T @ (wn[:, None] * design)
        penalty = jnp.diag(jnp.concatenate([jnp.zeros((1,), x.dtype), jnp.full((dim,), l2, x.dtype)]))
        theta = jnp.linalg.solve(gram + penalty, design.T @ (wn * y))
        return {"b": theta[:1], "w": theta[1:, None]}

    def population(key: Array):
        del key
        dtype = jnp.zeros(()).dtype
        return {"b": jnp.full((1,), b_star, dtype), "w": jnp.asarray(w_star / (1.0 + l2), dtype)[:, None]}

    glm = l2 == 0
    return Problem(
        name="linear_regression",
        sample=sample,
        init=linear_init(dim),
        loss=loss,
        predict=predict,
        task="regression",
        convex=True,
        config={"dim": dim, "noise": noise, "l2": l2, "seed": seed},
        solve=solve,
        design=intercept_design if glm else None,
        margin_loss=_squared_margin_loss if glm else None,
        population=population,
    )
