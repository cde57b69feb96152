"""The 1-bit sign quantizer ``alpha * sign(w)``, ``alpha = mean|w|`` (design.md, "Quantizer definitions")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import LadderQuantizer

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sign(LadderQuantizer):
    """Binary quantizer ``alpha * sign(w)`` with ``alpha = mean|w|`` and ``sign(0) = +1``; build with :func:`sign`.

    Codebook ``{-alpha, +alpha}`` (ladder indices 0, 1; public codes -1, +1). One decision threshold at 0: below
    for ``+alpha``, above for ``-alpha`` (theory.md section 3(b)); it does not depend on the data, so its gradient
    is zero. Straight-through rule: identity everywhere (the clip range is the whole tensor, as in BitNet;
    ``alpha`` rescales every weight, so a fixed window such as ``|w| <= 1`` would have no meaning).
    """

    @property
    def family(self) -> str:
        return "sign"

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        return (jnp.mean(jnp.abs(w)),)

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        return 0.0, 1.0

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        return (x >= 0).astype(x.dtype)

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return cb[0] * (2 * i - 1)

    def _code(self, i: Array) -> Array:
        return (2 * i - 1).astype(jnp.int32)


def sign(*, name: str = "sign") -> Sign:
    """The 1-bit quantizer ``alpha * sign(w)``, ``alpha = mean|w|``, ``sign(0) = +1``.

    Thresholds: 0 below a ``+alpha`` coordinate, 0 above a ``-alpha`` one, infinite on the other side (theory.md
    section 3(b)). Idempotent up to the rounding of ``alpha``. Straight-through: identity everywhere.

    Args:
      name: report name.

    Returns:
      A :class:`Sign` quantizer.

    >>> import jax.numpy as jnp
    >>> sign()(jnp.array([-1.0, 0.0, 2.0])).tolist()
    [-1.0, 1.0, 1.0]
    """
    return Sign(name=name)
