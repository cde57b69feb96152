"""OCP Microscaling (MX) formats: blocks of 32 elements sharing one E8M0 scale (theory.md section 9).

A block is 32 consecutive entries along the contraction axis (axis 0 of a Flax ``(in, out)`` kernel, the only axis
of a 1-D leaf; a leaf viewed as ``(prod(shape[:-1]), shape[-1])``), the last block may be short. Its shared scale is
``X = 2^(floor(log2 amax) - floor(log2 qmax))`` with ``amax`` the block's largest magnitude and ``qmax`` the element
format's largest magnitude; the elements are ``w / X`` rounded to the element format and saturating at ``+-qmax``.

- ``mxint8``: :func:`qmis_jax.quantizers.uniform` with ``bits=8``, ``group_size=32``, ``scale_format="e8m0"``
  (``qmax = 127``, elements ``round(w / X)``; the OCP MXINT8 grid of step ``2^-6`` times ``2^floor(log2 amax)``).
- ``mxfp4``: :func:`fp4` here, FP4 E2M1 elements ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with sign (``qmax = 6``), round
  to nearest, ties to even.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import ScaledLadderQuantizer, check_scale_format
from qmis_jax.quantizers.uniform import _is_int, group_blocks, group_expand

Array = jax.Array

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
MX_BLOCK = 32


def _encode_e2m1(y: Array) -> Array:
    """Index ``0..7`` of the E2M1 magnitude nearest to ``y >= 0`` (ties to the even index, i.e. even mantissa),
    saturating at 7 (the value 6)."""
    values = jnp.asarray(E2M1_VALUES, y.dtype)
    mids = 0.5 * (values[1:] + values[:-1])
    grid = mids.reshape((1,) * y.ndim + mids.shape)  # the midpoints along a new last axis, explicitly
    below = jnp.sum(y[..., None] > grid, axis=-1)  # strictly above a midpoint: the upper value
    at_mid = jnp.any(y[..., None] == grid, axis=-1)
    # on a midpoint between indices i and i + 1: `below` counted i; keep it when even, else take i + 1
    idx = jnp.where(at_mid & (below % 2 == 1), below + 1, below)
    return idx.astype(y.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP4(ScaledLadderQuantizer):
    """FP4 E2M1 elements with a per-block scale; build it with :func:`fp4` (preset ``mxfp4``).

    Ladder indices ``-7..7`` index the signed E2M1 values ``sign(i) E2M1[|i|]`` times the block scale ``X``, so
    levels, neighbours and midpoint thresholds come from the ladder machinery. Straight-through rule: identity for
    ``|w| <= 6 X``, zero beyond (saturated entries).

    Attributes:
      group_size: block length along the contraction axis (32 for OCP MX).
      scale_format: ``"e8m0"`` (default, the OCP absmax rule ``X = 2^(floor(log2 amax) - 2)``, theory.md
        section 9), or ``"f32"`` / ``"bf16"`` / ``"f16"`` (``X = amax / 6``, rounded to the format).
    """

    family = "fp4_e2m1"
    scale_rule = "absmax"
    qmax = E2M1_MAX

    group_size: int = MX_BLOCK
    scale_format: str = "e8m0"

    def __post_init__(self) -> None:
        if not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"`group_size` must be a positive integer, got {self.group_size!r}")
        super().__post_init__()

    def _scale_stat(self, w: Array) -> Array:
        return group_blocks(jnp.abs(w), self.group_size)

    def _expand(self, blocks: Array, w: Array) -> Array:
        return group_expand(blocks, w.shape, self.group_size)

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        return -7.0, 7.0

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        y = x / cb[1]
        return jnp.where(y < 0, -1.0, 1.0).astype(x.dtype) * _encode_e2m1(jnp.abs(y))

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        values = jnp.asarray(E2M1_VALUES, cb[0].dtype)
        return cb[0] * jnp.sign(i) * values[jnp.abs(i).astype(jnp.int32)]

    def _ste_mask(self, cb: tuple[Array, ...], w: Array) -> Array:
        return jnp.abs(w) <= E2M1_MAX * cb[0]


def fp4(*, group_size: int = MX_BLOCK, scale_format: str = "e8m0", name: str | None = None) -> FP4:
    """FP4 E2M1 with one scale per block of ``group_size`` entries along the contraction axis (OCP MXFP4).

    ``X = 2^(floor(log2 amax) - 2)`` per block (E8M0, the absmax rule of theory.md section 9, ``qmax = 6``), each
    element ``w / X`` rounded to the nearest of ``+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (ties to even), saturating at
    ``+-6``. Thresholds are midpoints of adjacent E2M1 values times ``X`` (section 3(b)); ``X`` is fixed given its
    code. Straight-through: identity inside ``+-6 X``.

    Args:
      group_size: block length (32 for OCP MX); the last block of a leaf may be short.
      scale_format: ``"e8m0"`` (default), ``"f32"``, ``"bf16"`` or ``"f16"``.
      name: report name (default ``"mxfp4"`` for the OCP configuration).

    Returns:
      An :class:`FP4` quantizer.

    >>> import jax.numpy as jnp
    >>> fp4()(jnp.array([0.3, -1.3, 2.9, 0.1])).tolist()  # X = 2^(1 - 2)
    [0.25, -1.5, 3.0, 0.0]
    """
    check_scale_format(scale_format)
    if name is None:
        name = "mxfp4" if (group_size == MX_BLOCK and scale_format == "e8m0") else f"fp4_g{group_size}@{scale_format}"
    return FP4(name=name, group_size=group_size, scale_format=scale_format)
