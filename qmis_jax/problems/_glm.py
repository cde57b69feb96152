"""Helpers for generalised linear problems whose parameters are ``{"b": (1,), "w": (dim, 1)}``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def linear_init(dim: int):
    """``init(key) -> {"b": zeros (1,), "w": zeros (dim, 1)}`` (a convex problem's start; the key is unused)."""

    def init(key: Array):
        del key
        dtype = jnp.zeros(()).dtype
        return {"b": jnp.zeros((1,), dtype), "w": jnp.zeros((dim, 1), dtype)}

    return init


def intercept_design(x: Array) -> Array:
    """Design matrix ``[1, x]`` ``(n, 1 + dim)``: ``ravel_pytree({"b", "w"})`` puts ``b`` first."""
    return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x], axis=-1)


def linear_margin(params, x: Array) -> Array:
    """Margin ``eta = b + x @ w`` for ``x`` of shape ``(..., dim)``."""
    return params["b"][0] + x @ params["w"][:, 0]


def penalised_loss(margin_loss, margin, *, l2: float, penalised):
    """One example's loss ``margin_loss(margin(params, x_i), y_i) + l2 / 2 * sum of squares of penalised(params)``
    (the ridge term only when ``l2 > 0``; ``penalised(params)`` lists the penalised leaves)."""

    def loss(params, x_i: Array, y_i: Array) -> Array:
        out = margin_loss(margin(params, x_i), y_i)
        if l2 > 0:
            out = out + 0.5 * l2 * sum(jnp.sum(w**2) for w in penalised(params))
        return out

    return loss
