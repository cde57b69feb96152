"""8-bit floating point emulation, E4M3 (OCP ``float8_e4m3fn``), with a per-tensor absmax scale.

``w`` is scaled so that ``max|w|`` maps to 448 (the largest finite E4M3 value), rounded to nearest (ties to even)
on the E4M3 grid, and scaled back. The non-negative E4M3 values are indexed by their 7-bit patterns
``c = 0..126``: subnormals ``c * 2^-9`` for ``c < 8``, normals ``(1 + m/8) 2^e`` with ``c = 8 (e + 7) + m``,
``e = -6..8``, ``m = 0..7`` (``c = 127`` is NaN in E4M3FN and excluded). Signed codes ``-126..126`` index the 253
distinct levels in increasing order, so the ladder machinery of ``_base`` gives levels, neighbors and the
midpoint thresholds of this non-uniform grid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qmis_jax.quantizers._base import ScaledLadderQuantizer, check_scale_format, format_name

Array = jax.Array

E4M3_MAX = 448.0
E4M3_MAX_CODE = 126
_MIN_NORMAL_EXP = -6  # smallest normal exponent; subnormals share its spacing 2^-9


def _encode_magnitude(v: Array) -> Array:
    """Round ``v >= 0`` (in units of the E4M3 grid) to the nearest E4M3 bit pattern ``0..126``, ties to even."""
    _, ex = jnp.frexp(v)  # v = m 2^ex with m in [0.5, 1): floor(log2 v) = ex - 1
    e = jnp.where(v < 2.0**_MIN_NORMAL_EXP, _MIN_NORMAL_EXP, ex - 1)
    # In the binade [2^e, 2^(e+1)) the spacing is 2^(e-3) and the pattern is 8 e + 48 + v / 2^(e-3); the formula
    # is continuous across binades (v / 2^(e-3) = 16 is the next binade's 8), and the subnormal range shares e = -6.
    mantissa = jnp.round(jnp.ldexp(v, 3 - e))
    return jnp.clip(8 * e.astype(v.dtype) + 48 + mantissa, 0, E4M3_MAX_CODE)


def _decode_magnitude(c: Array) -> Array:
    """Value of the E4M3 bit pattern ``c`` in ``0..126`` (a float array of integers)."""
    block = jnp.floor(c / 8)
    e = jnp.maximum(block - 7, _MIN_NORMAL_EXP)
    frac = jnp.where(c < 8, c, 8 + c - 8 * block)
    return jnp.ldexp(frac, (e - 3).astype(jnp.int32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8(ScaledLadderQuantizer):
    """FP8 E4M3 emulation with a per-tensor absmax scale ``s = max|w| / 448``; build it with :func:`fp8`.

    Straight-through rule: identity everywhere (after absmax scaling nothing exceeds 448, nothing is clipped;
    with a rounded scale the largest entries saturate at ``448 s``).

    The scale ``max|w| / 448`` is a float32 function of the data unless ``scale_format`` rounds it: the default
    release is continuous (theory.md section 9). ``scale_format="e8m0"`` uses the absmax rule of section 9,
    ``s = 2^(floor(log2 max|w|) - 8)`` (``floor(log2 448) = 8``), the elements saturating at 448.

    Attributes:
      scale_format: ``"f32"`` (default), ``"bf16"``, ``"f16"`` or ``"e8m0"``.
    """

    family = "fp8_e4m3"
    scale_rule = "absmax"
    qmax = E4M3_MAX

    scale_format: str = "f32"

    def _scale_stat(self, w: Array) -> Array:
        return jnp.max(jnp.abs(w))

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        return -float(E4M3_MAX_CODE), float(E4M3_MAX_CODE)

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        y = x / cb[1]
        return jnp.sign(y) * _encode_magnitude(jnp.abs(y))

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return cb[0] * (jnp.sign(i) * _decode_magnitude(jnp.abs(i)))


def fp8(*, scale_format: str = "f32", name: str | None = None) -> FP8:
    """8-bit float E4M3 emulation: ``q = s * e4m3(w / s)``, ``s = max|w| / 448``, round to nearest even.

    Levels and neighbors are adjacent E4M3 values (times ``s``); thresholds are midpoints between adjacent values
    (theory.md section 3(b)), differentiated through ``max|w|``; none beyond ``+-448 s``. Straight-through:
    identity everywhere.

    Args:
      scale_format: ``"f32"`` (default, continuous), ``"bf16"``, ``"f16"`` or ``"e8m0"`` (absmax rule of
        theory.md section 9).
      name: report name (default ``"fp8_e4m3"``, with ``@{scale_format}`` when not ``"f32"``).

    Returns:
      An :class:`FP8` quantizer.

    >>> import jax.numpy as jnp
    >>> fp8()(jnp.array([448.0, 1.0, 1.06, 17.0, -0.002])).tolist()
    [448.0, 1.0, 1.0, 16.0, -0.001953125]
    """
    check_scale_format(scale_format)
    if name is None:
        name = format_name("fp8_e4m3", scale_format)
    return FP8(name=name, scale_format=scale_format)
