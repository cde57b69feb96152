"""The one straight-through core every quantizer uses (design.md, "Quantizer definitions").

A quantizer's forward value is piecewise constant in the weights, so its true derivative is zero almost everywhere.
For training through a quantizer (quantization-aware training, or gradients of a quantized model's loss) the
straight-through estimator replaces that derivative by the identity inside the clip range of the quantizer and by
zero outside ("clipped STE"). Each quantizer documents its clip range; the rule itself lives only here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_jvp
def straight_through(w: Array, value: Array, mask: Array) -> Array:
    """Return ``value`` exactly, with the clipped straight-through derivative ``d value_k / d w_k = mask_k``.

    The forward pass returns the quantized ``value`` bit for bit (no ``w + (value - w)`` rounding error); the
    derivative is the diagonal ``diag(mask)``: identity where ``mask`` is true (inside the clip range), zero
    elsewhere. Defined by a custom JVP, so forward mode, reverse mode and higher orders all work (the second
    derivative is zero).

    Args:
      w: ``(...)`` float array, the unquantized weights (the differentiation variable).
      value: ``(...)`` the quantized weights, same shape and dtype as ``w``; treated as a constant.
      mask: ``(...)`` boolean (or broadcastable to ``w``), true inside the clip range.

    Returns:
      ``value``.

    >>> import jax, jax.numpy as jnp
    >>> w = jnp.array([0.2, 1.7])
    >>> jax.grad(lambda w: straight_through(w, jnp.round(w), w < 1.0).sum())(w).tolist()
    [1.0, 0.0]
    """
    del w, mask
    return value


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    w, value, mask = primals
    dw = tangents[0]
    del w
    return value, jnp.where(mask, dw, jnp.zeros_like(dw))
