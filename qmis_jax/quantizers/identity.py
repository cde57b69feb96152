"""The full-precision release ``fp32`` (identity), the continuous baseline of theory.md section 2."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import ContinuousQuantizer

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity(ContinuousQuantizer):
    """The identity release (``"fp32"``: the weights as trained, in their own dtype); see :func:`identity`.

    Continuous: ``Delta = Theta(n^-1/2)`` (theory.md section 2), ``r = 0``. Straight-through rule: identity.
    """

    @property
    def family(self) -> str:
        return "identity"

    def _release(self, w: Array, key: Array | None) -> tuple[Array, Array]:
        return w, jnp.ones(w.shape, bool)


def identity(*, name: str = "fp32") -> Identity:
    """The full-precision release: ``q(w) = w`` (same dtype), no levels, thresholds ``-inf`` / ``+inf``.

    Args:
      name: report name.

    Returns:
      An :class:`Identity` quantizer.

    >>> import jax.numpy as jnp
    >>> identity()(jnp.array([0.25, -1.5])).tolist()
    [0.25, -1.5]
    """
    return Identity(name=name)
