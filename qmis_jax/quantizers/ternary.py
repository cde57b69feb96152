"""Ternary quantizers: BitNet b1.58 absmean and sparse (quantile) ternary (design.md, "Quantizer definitions")."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import LadderQuantizer, check_sparsity, percent_label, safe_positive

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ternary(LadderQuantizer):
    """Ternary quantizer with codebook ``{-a, 0, +a}``; build it with :func:`ternary`.

    ``sparsity=None`` (absmean, BitNet b1.58): ``g = mean|w|``, ``q = g * clip(round(w / g), -1, 1)``; thresholds
    ``+-g/2`` (midpoints), differentiated through ``g``.

    ``sparsity=s``: ``tau`` = the ``s``-quantile of ``|w|`` (linear interpolation, as ``numpy.quantile``);
    ``|w| <= tau -> 0``, else ``alpha * sign(w)`` with ``alpha`` = mean ``|w|`` of the kept entries; thresholds
    ``+-tau`` (the zero-band edges, theory.md section 3(b)), differentiated through the quantile. With ``s = 0``
    only the smallest magnitude(s) are zeroed (``tau = min|w|``).

    Straight-through rule: identity everywhere (BitNet's plain straight-through estimator; the scale rescales all
    weights, so no weight is clipped).

    Attributes:
      sparsity: None (absmean) or the zero fraction ``s`` in ``[0, 1)``.
    """

    sparsity: float | None = None

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            check_sparsity(self.sparsity)

    @property
    def family(self) -> str:
        return "ternary"

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        a = jnp.abs(w)
        if self.sparsity is None:
            g = jnp.mean(a)
            return g, safe_positive(g), g
        tau = jnp.quantile(a.ravel(), self.sparsity)
        keep = a > tau
        count = jnp.sum(keep)
        alpha = jnp.sum(jnp.where(keep, a, 0)) / jnp.maximum(count, 1).astype(w.dtype)
        return alpha, safe_positive(alpha), tau

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        return -1.0, 1.0

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        return jnp.clip(jnp.round(x / cb[1]), -1, 1)

    def _rule_index(self, cb: tuple[Array, ...], w: Array) -> Array:
        if self.sparsity is None:
            return self._nearest(cb, w)
        return jnp.where(jnp.abs(w) > cb[2], jnp.sign(w), 0).astype(w.dtype)

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return cb[0] * i

    def _boundary(self, cb: tuple[Array, ...], i: Array) -> Array:
        if self.sparsity is None:
            return super()._boundary(cb, i)
        tau = cb[2]
        return jnp.where(i < 0, -tau, tau)


def ternary(*, sparsity: float | None = None, name: str | None = None) -> Ternary:
    """A ternary quantizer: BitNet b1.58 absmean (``sparsity=None``) or sparse ternary with zero fraction ``s``.

    Absmean: ``g = mean|w|``, ``q = g * clip(round(w / g), -1, 1)``, thresholds ``+-g/2``. Sparse:
    ``tau = quantile(|w|, s)``, ``q = 0`` where ``|w| <= tau``, else ``alpha * sign(w)`` with ``alpha`` the mean
    kept magnitude, thresholds ``+-tau`` (theory.md section 3(b); their gradient flows through ``g`` / the
    quantile, section 8). Straight-through: identity everywhere.

    Args:
      sparsity: None, or the fraction of zeros in ``[0, 1)``.
      name: report name; default ``"ternary"`` or ``"ternary_s{100 s}"`` (``ternary_s33``, ``ternary_s90``).

    Returns:
      A :class:`Ternary` quantizer.

    >>> import jax.numpy as jnp
    >>> ternary()(jnp.array([-1.0, 0.2, 0.8, 2.0])).tolist()
    [-1.0, 0.0, 1.0, 1.0]
    """
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    if name is None:
        name = "ternary" if sparsity is None else f"ternary_s{percent_label(sparsity)}"
    return Ternary(name=name, sparsity=sparsity)
