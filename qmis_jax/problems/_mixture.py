"""The two-class Gaussian-mixture data law shared by :func:`logistic_mixture` and :func:`mlp_mixture`."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._checks import finite, positive_int

Array = jax.Array


class MixtureLaw(NamedTuple):
    """A validated configuration of the two-class mixture, its mode centres (:func:`mixture_centres`) and the unit
    direction ``u`` of its class means (:func:`mixture_direction`)."""

    dim: int
    k_modes: int
    separation: float
    scale: float
    seed: int
    prior: float
    centres: np.ndarray
    direction: np.ndarray


def mixture_law(*, dim, k_modes, separation, scale, seed, prior=0.5) -> MixtureLaw:
    """Check the data-law arguments of the mixture problems and fix their mode centres.

    Args:
      dim: input dimension (> 0). k_modes: modes per class (> 0). separation: distance between the class means
        (>= 0). scale: norm of each mode's offset (>= 0). seed: a non-negative integer. prior: ``P(y = 1)``, in
        the open interval (0, 1).

    Returns:
      :class:`MixtureLaw`; ``ValueError`` naming the first bad argument.
    """
    dim = positive_int("dim", dim)
    k_modes = positive_int("k_modes", k_modes)
    separation = finite("separation", separation, nonnegative=True)
    scale = finite("scale", scale, nonnegative=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    prior = finite("prior", prior)
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must lie in the open interval (0, 1), got {prior!r}")
    centres = mixture_centres(dim=dim, k_modes=k_modes, separation=separation, scale=scale, seed=seed)
    direction = mixture_direction(dim=dim, seed=seed)
    return MixtureLaw(dim, k_modes, separation, scale, seed, prior, centres, direction)


def mixture_direction(*, dim: int, seed: int) -> np.ndarray:
    """The unit direction ``u`` ``(dim,)`` float64 of the class means of :func:`mixture_centres` (the same draw)."""
    return _unit(np.random.default_rng(seed).standard_normal(dim))


def _unit(u: np.ndarray) -> np.ndarray:
    return u / np.linalg.norm(u)


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
    u = _unit(rng.standard_normal(dim))  # the first draw: mixture_direction(dim=dim, seed=seed)
    v = rng.standard_normal((2, k_modes, dim))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v = scale * v
    v -= v.mean(axis=1, keepdims=True)
    v -= (v @ u)[..., None] * u
    signs = np.array([-1.0, 1.0])[:, None, None]
    return signs * (0.5 * separation) * u + v


def mixture_sampler(centres: np.ndarray, prior: float = 0.5):
    """Return ``sample(key, n) -> (x (n, dim), y (n,))`` for the mixture with the given mode centres.

    Labels are Bernoulli(``prior``), the mode uniform among the class's modes, and ``x = mu_{y, mode} + N(0, I)``;
    ``k_y, k_m, k_z = split(key, 3)`` draw the labels, modes and noise. ``x`` and ``y`` take JAX's default float
    dtype (float64 when x64 is enabled).
    """
    k_modes = centres.shape[1]
    prior = float(prior)

    def sample(key: Array, n: int) -> tuple[Array, Array]:
        k_y, k_m, k_z = jax.random.split(key, 3)
        z = jax.random.normal(k_z, (n, centres.shape[2]))
        cls = jax.random.bernoulli(k_y, prior, (n,)).astype(jnp.int32)
        mode = jax.random.randint(k_m, (n,), 0, k_modes)
        mu = jnp.asarray(centres, dtype=z.dtype)[cls, mode]
        return mu + z, cls.astype(z.dtype)

    return sample


def logistic_margin_loss(eta: Array, y: Array) -> Array:
    """Logistic loss ``softplus(-(2y - 1) eta) = log(1 + exp(eta)) - y eta`` for ``y`` in {0, 1}, computed stably."""
    return jnp.logaddexp(0.0, -(2.0 * y - 1.0) * eta)
