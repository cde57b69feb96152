"""Logistic regression on a two-class Gaussian mixture (a convex generalised linear model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._base import Problem
from ._checks import finite
from ._glm import intercept_design, linear_init, linear_margin, penalised_loss
from ._mixture import logistic_margin_loss, mixture_law, mixture_sampler

Array = jax.Array


def logistic_mixture(
    *,
    dim: int = 128,
    k_modes: int = 4,
    separation: float = 2.5,
    scale: float = 2.0,
    l2: float = 0.0,
    seed: int = 0,
) -> Problem:
    """Binary logistic regression ``P(y = 1 | x) = sigmoid(b + x @ w)`` on a two-class Gaussian mixture.

    Data law (fixed by the config, see :func:`~qmis_jax.problems._mixture.mixture_centres`): ``y ~ Bernoulli(1/2)``,
    ``x | y ~`` an equal-weight mixture of ``k_modes`` modes ``N(mu_yj, I_dim)`` whose class means are
    ``+-(separation / 2) u``. The per-example loss is the logistic loss
    ``l(theta, (x, y)) = softplus(-(2y - 1) eta) + (l2 / 2) ||w||^2`` with ``eta = b + x @ w``, computed stably
    with ``logaddexp``; the ERM is the (penalised) maximum-likelihood estimate of theory.md section 1, and its
    sandwich covariance (section 2) is statsmodels' ``HC0`` times ``n``.

    The defaults (``separation=2.5``, ``scale=2.0``) give, at ``dim=128`` and ``n = 1000``, data that are not
    linearly separable (so the unpenalised MLE exists) and a held-out accuracy of about 85% (about 89% for the
    population optimum).

    GLM structure: ``design(x) = [1, x]`` (``ravel_pytree`` puts ``"b"`` before ``"w"``),
    ``margin_loss(eta, y) = softplus(-(2y - 1) eta)`` and, when ``l2 > 0``, the ridge ``penalty`` ``(0, l2, ...)``;
    the statistics use them for their fast paths. With a penalty the training engine uses its generic Newton solver.

    Args:
      dim: input dimension (parameters: ``dim + 1``).
      k_modes: Gaussian modes per class.
      separation: distance between the two class means (along a fixed unit direction).
      scale: norm of each mode's offset from its class mean (before centring).
      l2: ridge penalty on ``w`` (not on the intercept), >= 0.
      seed: fixes the mode centres, so the data law is a deterministic function of the config.

    Returns:
      A convex binary :class:`Problem` with parameters ``{"b": (1,), "w": (dim, 1)}``; ``predict`` returns
      ``P(y = 1 | x)``.

    >>> import jax
    >>> p = logistic_mixture(dim=4, k_modes=2)
    >>> x, y = p.sample(jax.random.key(0), 3)
    >>> x.shape, p.design(x).shape
    ((3, 4), (3, 5))
    """
    dim, k_modes, separation, scale, seed, centres = mixture_law(
        dim=dim, k_modes=k_modes, separation=separation, scale=scale, seed=seed
    )
    l2 = finite("l2", l2, nonnegative=True)

    loss = penalised_loss(logistic_margin_loss, linear_margin, l2=l2, penalised=lambda p: [p["w"]])

    def predict(params, x: Array) -> Array:
        return jax.nn.sigmoid(linear_margin(params, x))

    return Problem(
        name="logistic_mixture",
        sample=mixture_sampler(centres),
        init=linear_init(dim),
        loss=loss,
        predict=predict,
        task="binary",
        convex=True,
        config={"dim": dim, "k_modes": k_modes, "separation": separation, "scale": scale, "l2": l2, "seed": seed},
        design=intercept_design,
        margin_loss=logistic_margin_loss,
        penalty=jnp.concatenate([jnp.zeros(1), jnp.full(dim, l2)]) if l2 > 0 else None,
    )
