"""Magnitude pruning: a sparse but continuous control release (design.md, "Quantizer definitions")."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import ContinuousQuantizer, check_sparsity, percent_label

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prune(ContinuousQuantizer):
    """Zero the ``floor(s * size)`` smallest-magnitude entries, keep the rest in full precision; see :func:`prune`.

    Continuous release: no adjacent levels, thresholds ``-inf`` / ``+inf``, ``r = 0`` (theory.md section 4).
    Straight-through rule: identity everywhere (pruned coordinates keep receiving gradient, so they can return).

    Attributes:
      sparsity: the pruned fraction ``s`` in ``[0, 1)``.
    """

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)

    @property
    def family(self) -> str:
        return "prune"

    def _release(self, w: Array, key: Array | None) -> tuple[Array, Array]:
        flat = jnp.abs(w).ravel()
        m = math.floor(round(self.sparsity * flat.size, 9))  # 0.29 * 100 is 28.999...: count 29
        order = jnp.argsort(flat, stable=True)
        rank = jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
        keep = (rank >= m).reshape(w.shape)
        return jnp.where(keep, w, jnp.zeros_like(w)), jnp.ones(w.shape, bool)


def prune(*, sparsity: float, name: str | None = None) -> Prune:
    """Magnitude pruning: zero the fraction ``sparsity`` of smallest ``|w|`` (``floor(s * size)`` entries, ties
    broken by position), keep the others unchanged.

    A control: as sparse as a ternary release but continuous, so no exponential security (theory.md section 4).
    Straight-through: identity everywhere.

    Args:
      sparsity: fraction of zeros in ``[0, 1)``.
      name: report name; default ``"prune{100 s}"`` (``prune50``, ``prune90``).

    Returns:
      A :class:`Prune` quantizer.

    >>> import jax.numpy as jnp
    >>> prune(sparsity=0.5)(jnp.array([0.1, -3.0, 0.5, 2.0])).tolist()
    [0.0, -3.0, 0.0, 2.0]
    """
    sparsity = check_sparsity(sparsity)
    if name is None:
        name = f"prune{percent_label(sparsity)}"
    return Prune(name=name, sparsity=sparsity)
