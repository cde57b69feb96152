"""The two-class Gaussian-mixture data law shared by :func:`logistic_mixture` and :func:`mlp_mixture`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def mixture_centres(*, dim: int, k_modes: int, separation: float, scale: float, seed: int) -> np.ndarray:
    """Mode centres ``(2, k_modes, dim)`` of the two-class mixture, a deterministic function of the config.

    Class ``c`` in {0, 1} has ``k_modes`` equally likely Gaussian modes ``N(mu_cj, I_dim)`` with
    ``mu_cj = (2c - 1) (separation / 2) u + scale * v_cj``: ``u`` a unit direction and ``v_cj`` unit offsets drawn
    from ``numpy.random.default_rng(seed)`` (float64, so the law does not depend on JAX's precision mode), with
    the offsets of each class centred so that the class means are exactly ``+-(separation / 2) u`` and projected
    off ``u``. Along ``u`` the classes are ``N(+-separation / 2, 1)``; the offsets make each class multimodal,
    which a non-linear model can exploit and a linear one cannot.

    Args:
      dim: input dimension. k_modes: modes per class. separation: distance between the class means.
      scale: norm of each mode's offset before centring. seed: fixes ``u`` and the offsets.

    Returns:
      ``(2, k_modes, dim)`` float64 array of mode means.
    """
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    v = rng.standard_normal((2, k_modes, dim))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v = scale * v
    v -= v.mean(axis=1, keepdims=True)
    v -= (v @ u)[..., None] * u
    signs = np.array([-1.0, 1.0])[:, None, None]
    return signs * (0.5 * separation) * u + v


def mixture_sampler(centres: np.ndarray):
    """Return ``sample(key, n) -> (x (n, dim), y (n,))`` for the mixture with the given mode centres.

    Labels are Bernoulli(1/2), the mode uniform among the class's modes, and ``x = mu_{y, mode} + N(0, I)``.
    ``x`` and ``y`` take JAX's default float dtype (float64 when x64 is enabled).
    """
    k_modes = centres.shape[1]

    def sample(key: Array, n: int) -> tuple[Array, Array]:
        k_y, k_m, k_z = jax.random.split(key, 3)
        z = jax.random.normal(k_z, (n, centres.shape[2]))
        cls = jax.random.bernoulli(k_y, 0.5, (n,)).astype(jnp.int32)
        mode = jax.random.randint(k_m, (n,), 0, k_modes)
        mu = jnp.asarray(centres, dtype=z.dtype)[cls, mode]
        return mu + z, cls.astype(z.dtype)

    return sample


def logistic_margin_loss(eta: Array, y: Array) -> Array:
    """Logistic loss ``softplus(-(2y - 1) eta) = log(1 + exp(eta)) - y eta`` for ``y`` in {0, 1}, computed stably."""
    return jnp.logaddexp(0.0, -(2.0 * y - 1.0) * eta)
