"""A one-hidden-layer MLP (Flax NNX) on the two-class Gaussian mixture: the non-convex problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ._base import Problem
from ._checks import finite, positive_int
from ._glm import penalised_loss
from ._mixture import logistic_margin_loss, mixture_law, mixture_sampler
from ._nnx import pure_module

Array = jax.Array

_ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "softplus": jax.nn.softplus, "relu": jax.nn.relu}


class MLP(nnx.Module):
    """``x -> out(act(hidden(x)))`` with a scalar output (the logit), batched over leading axes of ``x``."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "tanh", rngs: nnx.Rngs):
        self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        return self.out(_ACTIVATIONS[self.activation](self.hidden(x)))[..., 0]


def mlp_mixture(
    *,
    dim: int = 128,
    k_modes: int = 4,
    hidden: int = 32,
    separation: float = 2.5,
    scale: float = 2.0,
    activation: str = "tanh",
    l2: float = 0.0,
    seed: int = 0,
    prior: float = 0.5,
) -> Problem:
    """A one-hidden-layer MLP classifier on the data law of :func:`logistic_mixture` (same config, same law).

    Model ``eta(x) = out(act(hidden(x)))`` written with Flax NNX (``nnx.Linear`` layers, default LeCun-normal
    kernels and zero biases); ``nnx.split`` turns it into a pure ``apply`` over a plain nested dict
    ``{"hidden": {"bias", "kernel"}, "out": {"bias", "kernel"}}`` of arrays, which vmaps over replicates.
    Loss: ``softplus(-(2y - 1) eta(x)) + (l2 / 2) (||hidden.kernel||^2 + ||out.kernel||^2)``.

    The empirical risk is not convex: the engine trains it with a fixed number of optimizer steps, every replicate
    from one shared initialisation by default, so the replicates stay in one basin and ``theta*`` is the optimum
    of that basin (theory.md section 8).

    Args:
      dim, k_modes, separation, scale, seed, prior: the data law (see :func:`logistic_mixture`; ``prior`` is
        ``P(y = 1)``, in (0, 1)). No closed-form ``theta*`` here: it is estimated by a fit.
      hidden: hidden width.
      activation: one of ``"tanh"`` (default, smooth), ``"gelu"``, ``"softplus"``, ``"relu"``.
      l2: weight decay on the kernels, >= 0.

    Returns:
      A non-convex binary :class:`Problem`; ``init(key)`` draws fresh NNX parameters from ``key``.

    >>> import jax
    >>> p = mlp_mixture(dim=4, hidden=3)
    >>> jax.tree.map(lambda a: a.shape, p.init(jax.random.key(0)))["hidden"]
    {'bias': (3,), 'kernel': (4, 3)}
    """
    law = mixture_law(dim=dim, k_modes=k_modes, separation=separation, scale=scale, seed=seed, prior=prior)
    dim, k_modes, separation, scale, seed, prior = law.dim, law.k_modes, law.separation, law.scale, law.seed, law.prior
    hidden = positive_int("hidden", hidden)
    l2 = finite("l2", l2, nonnegative=True)
    if activation not in _ACTIVATIONS:
        raise KeyError(f"unknown activation {activation!r}; valid: {sorted(_ACTIVATIONS)}")
    # The template is built abstractly (nnx.eval_shape): no arrays are drawn and nothing is compiled here.
    apply, _ = pure_module(nnx.eval_shape(lambda: MLP(dim, hidden, activation=activation, rngs=nnx.Rngs(0))))

    def init(key: Array):
        return pure_module(MLP(dim, hidden, activation=activation, rngs=nnx.Rngs(params=key)))[1]

    loss = penalised_loss(
        logistic_margin_loss, apply, l2=l2, penalised=lambda p: [p["hidden"]["kernel"], p["out"]["kernel"]]
    )

    def predict(params, x: Array) -> Array:
        return jax.nn.sigmoid(apply(params, x))

    return Problem(
        name="mlp_mixture",
        sample=mixture_sampler(law.centres, prior),
        init=init,
        loss=loss,
        predict=predict,
        task="binary",
        convex=False,
        config={
            "dim": dim,
            "k_modes": k_modes,
            "hidden": hidden,
            "separation": separation,
            "scale": scale,
            "activation": activation,
            "l2": l2,
            "seed": seed,
            "prior": prior,
        },
    )
