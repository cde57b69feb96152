"""Ternary quantizers: BitNet b1.58 absmean and sparse (quantile) ternary (design.md, "Quantizer definitions")."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from qmis_jax.quantizers._base import (
    ScaledLadderQuantizer,
    accurate_mean,
    check_scale_format,
    check_sparsity,
    format_name,
    percent_label,
)

Array = jax.Array


def kept_count(sparsity: float, size: int) -> int:
    """``k = round((1 - s) size)`` (halves rounded up): the nonzero count of a sparse ternary leaf of ``size``."""
    return int(math.floor(round((1.0 - sparsity) * size, 9) + 0.5))


def _kept_mask(a: Array, k: int) -> Array:
    """True at the ``k`` largest entries of ``a`` (ties broken by position: the earlier entry is kept)."""
    flat = a.ravel()
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (rank < k).reshape(a.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ternary(ScaledLadderQuantizer):
    """Ternary quantizer with codebook ``{-a, 0, +a}``; build it with :func:`ternary`.

    ``sparsity=None`` (absmean, BitNet b1.58): ``g = mean|w|``, ``q = g * clip(round(w / g), -1, 1)``; thresholds
    ``+-g/2`` (midpoints), differentiated through ``g`` (a float32 scale; with a discrete scale format ``g`` is a
    fixed number given its code).

    ``sparsity=s``: keep exactly ``k = round((1 - s) size)`` entries, the ``k`` largest ``|w|`` (ties broken by
    position), as ``alpha * sign(w)`` (``sign(0) = +1``), zero the rest; ``alpha`` = mean ``|w|`` of the kept
    entries. The support changes when a kept and a dropped magnitude swap order (theory.md section 9): a kept
    ``w_j >= 0`` has the lower threshold ``max_dropped |w|`` (0 when nothing is dropped: then its sign flips at
    0), a kept ``w_j < 0`` the upper threshold ``-max_dropped |w|``, a dropped entry the thresholds
    ``+-min_kept |w|``; all differentiated through those order statistics (delta method on
    ``|w_j| - |w_i|``). No interpolated quantile: no coordinate sits on a threshold by construction.

    Straight-through rule: identity everywhere (BitNet's plain straight-through estimator; the scale rescales all
    weights, so no weight is clipped).

    Attributes:
      sparsity: None (absmean) or the zero fraction ``s`` in ``[0, 1)``.
      scale_format: how ``g`` / ``alpha`` is published (theory.md section 9, absmean rule): ``"f32"``
        (continuous), ``"bf16"`` / ``"f16"`` (rounded to the format) or ``"e8m0"`` (``2^round(log2 stat)``).
    """

    family = "ternary"
    scale_rule = "absmean"

    sparsity: float | None = None
    scale_format: str = "f32"

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            check_sparsity(self.sparsity)
        super().__post_init__()

    def _kept(self, w: Array) -> Array:
        return _kept_mask(lax.stop_gradient(jnp.abs(w)), kept_count(self.sparsity, w.size))

    def _scale_stat(self, w: Array) -> Array:
        # to the last bit (accurate_mean), so that a sparse release, k copies of +-alpha, returns alpha
        a = jnp.abs(w)
        if self.sparsity is None:
            return accurate_mean(a)
        return accurate_mean(a, self._kept(w), count=max(kept_count(self.sparsity, w.size), 1))

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        g, divisor = super()._codebook(w)
        return g, divisor, g if self.sparsity is None else self._kept(w)

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        return -1.0, 1.0

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        return jnp.clip(jnp.round(x / cb[1]), -1, 1)

    def _rule_index(self, cb: tuple[Array, ...], w: Array) -> Array:
        if self.sparsity is None:
            return self._nearest(cb, w)
        return jnp.where(cb[2], jnp.where(w >= 0, 1, -1), 0).astype(w.dtype)

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return cb[0] * i

    def _thresholds(self, w: Array) -> tuple[Array, Array]:
        if self.sparsity is None:
            return super()._thresholds(w)
        a = jnp.abs(w)
        kept = self._kept(w)
        inf = jnp.asarray(jnp.inf, w.dtype)
        max_dropped = jnp.max(jnp.where(kept, jnp.zeros_like(a), a))  # 0 when nothing is dropped
        min_kept = jnp.min(jnp.where(kept, a, inf))  # inf when nothing is kept
        pos = w >= 0
        t_lower = jnp.where(kept, jnp.where(pos, max_dropped, -inf), -min_kept)
        t_upper = jnp.where(kept, jnp.where(pos, inf, -max_dropped), min_kept)
        return t_lower, t_upper


def ternary(*, sparsity: float | None = None, scale_format: str = "f32", name: str | None = None) -> Ternary:
    """A ternary quantizer: BitNet b1.58 absmean (``sparsity=None``) or sparse ternary with zero fraction ``s``.

    Absmean: ``g = mean|w|``, ``q = g * clip(round(w / g), -1, 1)``, thresholds ``+-g/2``. Sparse: keep the
    ``k = round((1 - s) size)`` largest ``|w|`` as ``alpha * sign(w)`` with ``alpha`` the mean kept magnitude,
    zero the rest; support thresholds at the order statistics of section 9. Both scales follow the absmean rule
    of theory.md section 9 (``e8m0``: ``2^round(log2 stat)``). Straight-through: identity everywhere.

    Args:
      sparsity: None, or the fraction of zeros in ``[0, 1)``.
      scale_format: ``"f32"`` (default, continuous), ``"bf16"``, ``"f16"`` or ``"e8m0"``.
      name: report name; default ``"ternary"`` or ``"ternary_s{100 s}"`` (``ternary_s33``, ``ternary_s90``), with
        ``@{scale_format}`` when not ``"f32"``.

    Returns:
      A :class:`Ternary` quantizer.

    >>> import jax.numpy as jnp
    >>> ternary()(jnp.array([-1.0, 0.2, 0.8, 2.0])).tolist()
    [-1.0, 0.0, 1.0, 1.0]
    >>> ternary(sparsity=0.5, scale_format="e8m0")(jnp.array([-1.0, 0.2, 0.8, 2.0])).tolist()  # 2^round(log2 1.5)
    [-2.0, 0.0, 0.0, 2.0]
    """
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    check_scale_format(scale_format)
    if name is None:
        name = format_name("ternary" if sparsity is None else f"ternary_s{percent_label(sparsity)}", scale_format)
    return Ternary(name=name, sparsity=sparsity, scale_format=scale_format)
