"""The 1-bit sign quantizer ``alpha * sign(w)``, ``alpha = mean|w|`` (design.md, "Quantizer definitions")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import ScaledLadderQuantizer, accurate_mean, check_scale_format, format_name

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sign(ScaledLadderQuantizer):
    """Binary quantizer ``alpha * sign(w)`` with ``alpha = mean|w|`` and ``sign(0) = +1``; build with :func:`sign`.

    Codebook ``{-alpha, +alpha}`` (ladder indices 0, 1; public codes -1, +1). One decision threshold at 0: below
    for ``+alpha``, above for ``-alpha`` (theory.md section 3(b)); it does not depend on the data, so its gradient
    is zero. Straight-through rule: identity everywhere (the clip range is the whole tensor, as in BitNet;
    ``alpha`` rescales every weight, so a fixed window such as ``|w| <= 1`` would have no meaning).

    Attributes:
      scale_format: how ``alpha`` is published (theory.md section 9, absmean rule): ``"f32"`` (continuous),
        ``"bf16"`` / ``"f16"`` (rounded to the format) or ``"e8m0"`` (``2^round(log2 mean|w|)``).
    """

    family = "sign"
    scale_rule = "absmean"

    scale_format: str = "f32"

    def _scale_stat(self, w: Array) -> Array:
        # to the last bit (accurate_mean): the mean magnitude of a release, n copies of alpha, is alpha
        return accurate_mean(jnp.abs(w))

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        return (self._scale(w),)

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        return 0.0, 1.0

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        return (x >= 0).astype(x.dtype)

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return cb[0] * (2 * i - 1)

    def _code(self, i: Array) -> Array:
        return (2 * i - 1).astype(jnp.int32)


def sign(*, scale_format: str = "f32", name: str | None = None) -> Sign:
    """The 1-bit quantizer ``alpha * sign(w)``, ``alpha = mean|w|``, ``sign(0) = +1``.

    Thresholds: 0 below a ``+alpha`` coordinate, 0 above a ``-alpha`` one, infinite on the other side (theory.md
    section 3(b)). Idempotent bit for bit: ``mean|w|`` is computed to the last bit, so a release re-derives its
    ``alpha``. Straight-through: identity everywhere. The scale follows the absmean rule of section 9: ``e8m0``
    publishes ``alpha = 2^round(log2 mean|w|)``.

    Args:
      scale_format: ``"f32"`` (default, continuous), ``"bf16"``, ``"f16"`` or ``"e8m0"``.
      name: report name (default ``"sign"``, with ``@{scale_format}`` when not ``"f32"``).

    Returns:
      A :class:`Sign` quantizer.

    >>> import jax.numpy as jnp
    >>> sign()(jnp.array([-1.0, 0.0, 2.0])).tolist()
    [-1.0, 1.0, 1.0]
    >>> sign(scale_format="e8m0")(jnp.array([-1.0, 0.0, 2.0])).tolist()  # 2^round(log2 1)
    [-1.0, 1.0, 1.0]
    """
    check_scale_format(scale_format)
    if name is None:
        name = format_name("sign", scale_format)
    return Sign(name=name, scale_format=scale_format)
