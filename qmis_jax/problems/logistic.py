"""Logistic regression on a two-class Gaussian mixture (a convex generalised linear model)."""

from __future__ import annotations

import math

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
    prior: float = 0.5,
) -> Problem:
    """Binary logistic regression ``P(y = 1 | x) = sigmoid(b + x @ w)`` on a two-class Gaussian mixture.

    Data law (fixed by the config, see :func:`~qmis_jax.problems._mixture.mixture_centres`):
    ``y ~ Bernoulli(prior)``, ``x | y ~`` an equal-weight mixture of ``k_modes`` modes ``N(mu_yj, I_dim)`` whose
    class means are ``+-(separation / 2) u`` (``y = 1``: plus); the mode offsets are orthogonal to the unit
    direction ``u`` and centred within each class. The per-example loss is the logistic loss
    ``l(theta, (x, y)) = softplus(-(2y - 1) eta) + (l2 / 2) ||w||^2`` with ``eta = b + x @ w``, computed stably
    with ``logaddexp``; the ERM is the (penalised) maximum-likelihood estimate of theory.md section 1, and its
    sandwich covariance (section 2) is statsmodels' ``HC0`` times ``n``.

    The defaults (``separation=2.5``, ``scale=2.0``) give, at ``dim=128`` and ``n = 1000``, data that are not
    linearly separable (so the unpenalised MLE exists) and a held-out accuracy of about 85% (about 89% for the
    population optimum).

    Population optimum (``population``, when ``l2 = 0``): ``theta* = (b, w) = (logit(prior), separation * u)``
    exactly. Write ``t = x @ u`` and ``x_perp = x - t u``. Given the class, ``t ~ N(+-separation / 2, 1)`` exactly
    (the offsets have no component along ``u``), so with ``s = separation`` the log-odds given ``t`` is
    ``logit(prior) + log N(t; s/2, 1) - log N(t; -s/2, 1) = logit(prior) + s t``, which is
    ``b + x @ w`` at ``theta*``: ``E[y | t] = sigmoid(eta*(x))``. The population gradient
    ``E[(sigmoid(eta*(x)) - y) (1, x)]`` therefore vanishes along the intercept and along ``u`` (condition on
    ``t``). Along ``x_perp``: given the class, ``x_perp = v_mode + z_perp`` is independent of ``t`` (the mode and
    the Gaussian noise's ``u``-component are independent of it) and has mean 0 (the offsets are centred per class),
    so ``E[(sigmoid(eta*) - y) x_perp] = E[(sigmoid(eta*(t)) - y) E[x_perp | t, y]] = 0``. The population risk
    is convex with a positive definite Hessian (``x`` has a density), so this stationary point is the unique
    optimum (theory.md sections 2 and 8: the intercept is ``logit(prior)``, 0 only at ``prior = 1/2``). With
    ``l2 > 0`` the penalised optimum has no closed form and ``population`` is None (estimated by a fit).

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
      prior: the class prior ``P(y = 1)``, in the open interval (0, 1).

    Returns:
      A convex binary :class:`Problem` with parameters ``{"b": (1,), "w": (dim, 1)}``; ``predict`` returns
      ``P(y = 1 | x)``; ``population(key)`` returns ``theta*`` (the key is unused) when ``l2 = 0``, else None.

    >>> import jax
    >>> p = logistic_mixture(dim=4, k_modes=2)
    >>> x, y = p.sample(jax.random.key(0), 3)
    >>> x.shape, p.design(x).shape
    ((3, 4), (3, 5))
    >>> star = logistic_mixture(dim=2, separation=1.6, seed=3, prior=float(jax.nn.sigmoid(1.25))).population(None)
    >>> [round(float(v), 3) for v in (star["b"][0], *star["w"][:, 0])]
    [1.25, 0.998, -1.25]
    """
    law = mixture_law(dim=dim, k_modes=k_modes, separation=separation, scale=scale, seed=seed, prior=prior)
    dim, k_modes, separation, scale, seed, prior = law.dim, law.k_modes, law.separation, law.scale, law.seed, law.prior
    l2 = finite("l2", l2, nonnegative=True)

    loss = penalised_loss(logistic_margin_loss, linear_margin, l2=l2, penalised=lambda p: [p["w"]])

    def predict(params, x: Array) -> Array:
        return jax.nn.sigmoid(linear_margin(params, x))

    b_star = math.log(prior) - math.log1p(-prior)  # logit(prior)
    w_star = separation * law.direction

    def population(key: Array):
        del key
        dtype = jnp.zeros(()).dtype
        return {"b": jnp.full((1,), b_star, dtype), "w": jnp.asarray(w_star, dtype)[:, None]}

    return Problem(
        name="logistic_mixture",
        sample=mixture_sampler(law.centres, prior),
        init=linear_init(dim),
        loss=loss,
        predict=predict,
        task="binary",
        convex=True,
        config={
            "dim": dim,
            "k_modes": k_modes,
            "separation": separation,
            "scale": scale,
            "l2": l2,
            "seed": seed,
            "prior": prior,
        },
        design=intercept_design,
        margin_loss=logistic_margin_loss,
        penalty=jnp.concatenate([jnp.zeros(1), jnp.full(dim, l2)]) if l2 > 0 else None,
        population=population if l2 == 0 else None,
    )
