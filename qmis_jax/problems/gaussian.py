"""The Gaussian mean problem: the separable quadratic case of theory.md section 3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Problem

Array = jax.Array


def gaussian_mean(*, mu, sigma: float = 1.0) -> Problem:
    """Estimate the mean of ``N(mu, sigma^2 I_d)`` by empirical risk minimisation with the squared loss.

    ``l(theta, z) = ||theta - z||^2 / (2 sigma^2)``, so the weighted ERM is the weighted mean
    ``theta_hat = sum_i w_i z_i / sum_i w_i`` (closed form ``solve``), ``theta* = mu`` (``population``),
    ``H = I / sigma^2``, ``V = I / sigma^2`` and ``Sigma = sigma^2 I`` (theory.md section 2). With a fixed-step
    quantizer it is the exact check of theory.md sections 5 and 7.

    Data: ``x = z`` of shape ``(n, d)``; ``y`` is a vector of zeros (the problem is unsupervised). ``predict``
    returns the standardised distance ``||x_i - theta|| / sigma`` of each point to the estimate, so ``utility``'s
    RMSE is ``sqrt(2 * mean loss)``.

    Args:
      mu: the population mean, a scalar or a vector ``(d,)``.
      sigma: the noise standard deviation, > 0.

    Returns:
      A convex :class:`Problem` with parameters ``{"mu": (d,)}``.

    >>> import jax
    >>> p = gaussian_mean(mu=[0.3, -1.0])
    >>> x, y = p.sample(jax.random.key(0), 5)
    >>> x.shape, y.shape
    ((5, 2), (5,))
    """
    mu_np = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    if mu_np.ndim != 1 or mu_np.size == 0:
        raise ValueError(f"mu must be a scalar or a non-empty vector, got shape {np.shape(mu)}")
    if not np.all(np.isfinite(mu_np)):
        raise ValueError(f"mu must be finite, got {mu_np.tolist()}")
    sigma = float(sigma)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    d = mu_np.size

    def sample(key: Array, n: int) -> tuple[Array, Array]:
        z = jax.random.normal(key, (n, d))
        x = jnp.asarray(mu_np, z.dtype)[None, :] + sigma * z
        return x, jnp.zeros((n,), z.dtype)

    def init(key: Array):
        del key
        return {"mu": jnp.zeros((d,), jnp.zeros(()).dtype)}

    def loss(params, x_i: Array, y_i: Array) -> Array:
        del y_i
        return 0.5 * jnp.sum((params["mu"] - x_i) ** 2) / sigma**2

    def predict(params, x: Array) -> Array:
        return jnp.sqrt(jnp.sum((x - params["mu"][None, :]) ** 2, axis=-1)) / sigma

    def solve(x: Array, y: Array, w: Array):
        del y
        return {"mu": (w @ x) / jnp.sum(w)}

    def population(key: Array):
        del key
        return {"mu": jnp.asarray(mu_np, jnp.zeros(()).dtype)}

    return Problem(
        name="gaussian_mean",
        sample=sample,
        init=init,
        loss=loss,
        predict=predict,
        task="regression",
        convex=True,
        config={"mu": mu_np.tolist(), "sigma": sigma, "dim": d},
        solve=solve,
        population=population,
    )
