"""qwix recipes as quantizers: the release of ``qwix.dequantize(qwix.quantize(w, qtype, ...))``, reimplemented.

Our own pure-JAX implementation on the package's straight-through core and ladder machinery (it does not import
qwix), following qwix 0.1.8's symmetric quantization (integer and float elements, MX formats) exactly:

* **Calibration** per scale block: the blocks are the tensor, minus the ``channelwise_axes`` (one scale per index)
  and with each ``tiled_axes[a]`` cut into tiles of that size (an int, or ``1 / tile_count`` as a float, the tile
  size then ``round(dim * t)``). ``"absmax"`` takes ``max|w|`` of the block, ``"absmax,c"`` multiplies it by ``c``,
  ``"rms,c"`` uses ``c * sqrt(mean(w^2))``, ``"fixed,a"`` / ``"fixed,-a,a"`` a constant ``a`` (always per tensor).
* **Bounds**: codes are integers in ``[-2^(b-1), 2^(b-1) - 1]`` (int4: ``-8..7``; int8: ``-128..127``) and the
  calibration value maps to ``qmax + 1/2`` (7.5 for int4, 127.5 for int8):
  ``scale = cal / (2^(b-1) - 1/2)``, replaced by 1 where below ``sqrt(tiny)`` of its dtype.
* **Codes**: ``clip(round_half_even(w / scale), qmin, qmax)``, computed in the weights' dtype with that scale (the
  float32 scale for float32 weights); only then is the scale cast to ``scale_dtype``. So ``-absmax`` may take the
  code ``-2^(b-1)`` (``-7.5`` rounds to ``-8``) while ``+absmax`` saturates at ``qmax``.
* **Float elements** (``float8_e4m3fn``, ``float8_e5m2``, ``float4_e2m1fn``): the calibration maps to the largest
  finite element, the element is ``clip(w / scale)`` cast to that dtype (round to nearest even). The MX formats
  ``mxfp8`` / ``mxfp4`` (E4M3 / E2M1 elements in tiles of 32, ``tiled_axes`` required) round the scale up to a power
  of two, ``2^ceil(log2(scale))`` (qwix's rule, not the OCP one ``2^(floor(log2 amax) - emax)``). Codes are the
  signed index of the element's magnitude bit pattern (E4M3: ``-126..126``); a negative element rounded to zero is
  released as ``-0``, as qwix does, and coded 0.
* **Release**: ``code * scale`` computed in the scale's storage dtype (``scale_dtype``, else the weights' dtype).
  qwix returns it in that dtype; here it is returned in the weights' dtype, which holds it exactly whenever the
  storage dtype is no wider than the weights' (float32 weights: any ``scale_dtype``).

What is released (theory.md section 9): the codes and the scales in their storage format. With a data-dependent
scale stored in float32 the release is continuous (``r = 0``; the codes' own rate is ``r_codes``); with a
``bfloat16`` / ``float16`` ``scale_dtype``, a ``fixed`` calibration or an MX format (a power-of-two scale) every
published number lies on a grid fixed in advance, so the release is discrete. For bf16/f16 scales the element
thresholds (``(i + 1/2) scale`` for integers, midpoints of float elements times the scale) move with the float32
scale before its cast (their gradient flows through ``max|w|``: the delta method of section 9 applies); a fixed or
power-of-two scale's thresholds are constant between scale flips. ``info()["release"]`` says which.

Straight-through rule (qwix's QAT rule): identity where ``|w| <= cal`` of the block (everything for ``absmax``),
zero outside.

Numerics. qwix divides by a scale broadcast over several entries, which XLA compiles as a multiplication by the
scale's reciprocal (one unit in the last place away from the quotient at times); a division of equal shapes stays
an IEEE division. This module reproduces both cases explicitly, so its release is the same eager, under ``jit`` and
under ``vmap``, and equals qwix called eagerly (qwix inside a caller's ``jit`` may differ in the last place where XLA
rewrites divisions by constants). Bit-for-bit equality is tested for float32 and bfloat16 weights, float32 /
bfloat16 / float16 scales, ``absmax``, ``absmax,c`` and ``fixed`` calibrations. ``rms,c`` uses qwix's formula, but
the order in which XLA sums the squares is not fixed, so its scale may differ from qwix's in the last place (and a
code at an exact rounding tie with it); float16 weights follow XLA's float16 arithmetic only approximately.

Not covered: asymmetric calibrations (``minmax``, ``fixed,lo,hi`` with ``lo != -hi``), NF4 and NVFP4, stochastic
rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from qmis_jax.quantizers._base import LadderQuantizer, Quantizer
from qmis_jax.quantizers.tree import leaf_path

Array = jax.Array

__all__ = ["Qwix", "from_qwix", "from_qwix_rules", "quantize_tree_qwix"]

_INT_QTYPES = {f"int{b}": b for b in range(2, 9)}
# float element types and qwix's MX formats (blocks of 32 with a power-of-two scale): their element dtype
_FLOAT_QTYPES = {
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float4_e2m1fn": "float4_e2m1fn",
    "mxfp8": "float8_e4m3fn",
    "mxfp4": "float4_e2m1fn",
}
_MX_TILE = 32
_SCALE_DTYPES = ("float32", "bfloat16", "float16", "float64")
_FORMAT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
_WORK_DTYPES = ("bfloat16", "float16")


def _qtype_name(qtype: Any) -> str:
    if isinstance(qtype, str):
        name = qtype.lower()
    else:
        try:
            name = jnp.dtype(qtype).name
        except TypeError as err:
            raise ValueError(f"`qtype` must be an integer type int2..int8, got {qtype!r}") from err
    if name not in _INT_QTYPES and name not in _FLOAT_QTYPES:
        raise ValueError(
            f"`qtype` must be a signed integer type int2..int8 (jnp.int8, jnp.int4, 'int3', ...), a float element "
            f"type {tuple(_FLOAT_QTYPES)[:3]} or 'mxfp8' / 'mxfp4', got {qtype!r}; NF4 and NVFP4 are not covered"
        )
    return name


@functools.cache
def _magnitudes(element: str) -> np.ndarray:
    """The non-negative finite values of a float element dtype, increasing (index = bit pattern)."""
    dt = np.dtype(getattr(jnp, element))
    count = 8 if "float4" in element else 128
    vals = np.arange(count, dtype=np.uint8).view(dt).astype(np.float64)
    return vals[np.isfinite(vals)]  # the infinities and NaNs are the top patterns


def _scale_dtype_name(scale_dtype: Any) -> str | None:
    if scale_dtype is None:
        return None
    try:
        name = jnp.dtype(scale_dtype).name
    except TypeError as err:
        raise ValueError(f"`scale_dtype` must be None or one of {_SCALE_DTYPES}, got {scale_dtype!r}") from err
    if name not in _SCALE_DTYPES:
        raise ValueError(f"`scale_dtype` must be None or one of {_SCALE_DTYPES}, got {scale_dtype!r}")
    return name


def _parse_calibration(method: Any) -> tuple[str, tuple[float, ...]]:
    if not isinstance(method, str):
        raise ValueError(f"`calibration_method` must be a string such as 'absmax', got {method!r}")
    kind, *raw = method.lower().split(",")
    try:
        args = tuple(float(a) for a in raw)
    except ValueError as err:
        raise ValueError(f"`calibration_method` has a non-numeric argument: {method!r}") from err
    if kind == "absmax" and len(args) <= 1 and all(a > 0 and math.isfinite(a) for a in args):
        return kind, args
    if kind == "rms" and len(args) == 1 and args[0] > 0 and math.isfinite(args[0]):
        return kind, args
    if kind == "fixed" and len(args) in (1, 2):
        lo, hi = (-args[0], args[0]) if len(args) == 1 else args
        if not (lo < 0 < hi and math.isfinite(hi)):
            raise ValueError(f"`calibration_method` {method!r}: the fixed range must contain 0 and be non-empty")
        if lo + hi != 0:
            raise ValueError(
                f"`calibration_method` {method!r}: only symmetric fixed ranges are covered (asymmetric ones need a "
                "zero point)"
            )
        return kind, (hi,)
    raise ValueError(
        f"`calibration_method` must be 'absmax', 'absmax,c', 'rms,c', 'fixed,a' or 'fixed,-a,a' (c, a > 0), got "
        f"{method!r}; asymmetric calibrations (minmax) are not covered"
    )


def _opaque(x: Array) -> Array:
    """``x``, hidden from XLA's algebraic simplifier so that ``y / x`` stays an IEEE division.

    Under ``jit`` XLA rewrites a division by a constant into a multiplication by its rounded reciprocal, which can
    move the result by one unit in the last place; qwix called eagerly divides exactly, and so does this module.
    """
    return lax.optimization_barrier(x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwix(LadderQuantizer):
    """qwix's symmetric integer quantization as a ladder quantizer; build it with :func:`from_qwix`.

    Attributes:
      qtype: ``"int2"`` .. ``"int8"``.
      channelwise_axes: axes with one scale per index (axes beyond a leaf's rank are ignored, as in qwix).
      tiled_axes: ``((axis, tile), ...)``: an int tile size or a float ``1 / tile_count``.
      calibration_method: qwix's string (``"absmax"``, ``"absmax,c"``, ``"rms,c"``, ``"fixed,a"``...).
      scale_dtype: storage dtype of the published scales (``None``: the weights' dtype).
      work_dtype: internal; the dtype qwix computes in when the weights are bfloat16/float16 (set per call).
    """

    qtype: str = "int8"
    channelwise_axes: tuple[int, ...] = ()
    tiled_axes: tuple[tuple[int, int | float], ...] = ()
    calibration_method: str = "absmax"
    scale_dtype: str | None = None
    work_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.qtype not in _INT_QTYPES and self.qtype not in _FLOAT_QTYPES:
            raise ValueError(f"`qtype` must be one of {(*_INT_QTYPES, *_FLOAT_QTYPES)}, got {self.qtype!r}")
        if self.qtype.startswith("mx") and (not self.tiled_axes or any(t != _MX_TILE for _, t in self.tiled_axes)):
            raise ValueError(
                f"`tiled_axes` of {self.qtype!r} must give tiles of {_MX_TILE} (as in qwix), got "
                f"{dict(self.tiled_axes)!r}"
            )
        _parse_calibration(self.calibration_method)
        for ax in self.channelwise_axes:
            if isinstance(ax, bool) or not isinstance(ax, int) or ax < 0:
                raise ValueError(f"`channelwise_axes` must hold non-negative ints, got {self.channelwise_axes!r}")
        seen = set()
        for ax, tile in self.tiled_axes:
            if isinstance(ax, bool) or not isinstance(ax, int) or ax < 0 or ax in seen:
                raise ValueError(f"`tiled_axes` keys must be distinct non-negative ints, got {dict(self.tiled_axes)!r}")
            seen.add(ax)
            ok_int = isinstance(tile, int) and not isinstance(tile, bool) and tile >= 1
            ok_float = isinstance(tile, float) and 0.0 < tile <= 1.0
            if not (ok_int or ok_float):
                raise ValueError(
                    f"`tiled_axes` values must be int tile sizes >= 1 or floats 1 / tile_count in (0, 1], got "
                    f"{dict(self.tiled_axes)!r}"
                )
        if seen & set(self.channelwise_axes):
            raise ValueError(
                f"an axis cannot be both channelwise and tiled: channelwise_axes={self.channelwise_axes!r}, "
                f"tiled_axes={dict(self.tiled_axes)!r}"
            )
        _scale_dtype_name(self.scale_dtype)
        if self.work_dtype not in (None, *_WORK_DTYPES):
            raise ValueError(f"`work_dtype` must be None or one of {_WORK_DTYPES}, got {self.work_dtype!r}")

    @property
    def family(self) -> str:
        return "qwix"

    @property
    def element(self) -> str | None:
        """The float element dtype's name (``None`` for integer codes)."""
        return _FLOAT_QTYPES.get(self.qtype)

    @property
    def bits(self) -> int:
        """Bits per element."""
        return _INT_QTYPES[self.qtype] if self.element is None else jnp.finfo(getattr(jnp, self.element)).bits

    @property
    def code_range(self) -> tuple[int, int]:
        """Integer codes: ``(-2^(b-1), 2^(b-1) - 1)``; float elements: ``(-(m - 1), m - 1)`` over the ``m``
        non-negative finite values (the signed index of the magnitude's bit pattern)."""
        if self.element is not None:
            m = _magnitudes(self.element).size
            return -(m - 1), m - 1
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @property
    def bound(self) -> float:
        """The value the calibration maps to: ``qmax + 1/2`` for integers, the largest finite float element."""
        if self.element is not None:
            return float(jnp.finfo(getattr(jnp, self.element)).max)
        return 2 ** (self.bits - 1) - 0.5

    @property
    def scale_format(self) -> str:
        """``"fixed"`` (a constant scale), or the scale's storage format (``"f32"`` for float32 weights by default)."""
        if _parse_calibration(self.calibration_method)[0] == "fixed":
            return "fixed"
        if self.qtype.startswith("mx"):
            return "e8m0"  # a power of two, whatever dtype stores it
        return _FORMAT[self.scale_dtype or "float32"]

    @property
    def release_continuous(self) -> bool:
        """Whether some published number (a scale) is a continuous function of the weights (theory.md section 9).

        True for a data-dependent scale stored in float32/float64 (the default for float32 weights); False for a
        fixed calibration, an MX format (power-of-two scales) or a bfloat16/float16 ``scale_dtype``. For
        bfloat16/float16 weights with ``scale_dtype=None`` the scale is stored in the weights' dtype, hence discrete
        (this property describes float32 weights).
        """
        return self.scale_format in ("f32", "f64")

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.pop("work_dtype", None)
        out["tiled_axes"] = [list(t) for t in self.tiled_axes]
        out["channelwise_axes"] = list(self.channelwise_axes)
        out["release"] = {
            "continuous": self.release_continuous,
            "continuous_parts": ["scales"] if self.release_continuous else [],
            "scale_format": self.scale_format,
        }
        return out

    # -- the weights' dtype decides where qwix computes ---------------------------------------------------------

    def _at(self, w: Any) -> Qwix:
        name = getattr(getattr(w, "dtype", None), "name", None)
        want = name if name in _WORK_DTYPES else None
        return self if want == self.work_dtype else dataclasses.replace(self, work_dtype=want)

    def __call__(self, w: Array, *, key: Array | None = None) -> Array:
        return Quantizer.__call__(self._at(w), w, key=key)

    def levels(self, w: Array, *, key: Array | None = None) -> tuple[Array, Array, Array]:
        return Quantizer.levels(self._at(w), w, key=key)

    def neighbors(self, v: Array, w: Array) -> tuple[Array, Array]:
        return Quantizer.neighbors(self._at(w), v, w)

    def codes(self, v: Array, w: Array) -> Array:
        return Quantizer.codes(self._at(w), v, w)

    def thresholds(self, w: Array) -> tuple[Array, Array]:
        return Quantizer.thresholds(self._at(w), w)

    # -- codebook ----------------------------------------------------------------------------------------------

    def _work(self, x: Array) -> Array:
        """Round ``x`` to the dtype qwix computes in (a no-op for float32/float64 weights)."""
        return x if self.work_dtype is None else x.astype(self.work_dtype).astype(x.dtype)

    def _stored(self, x: Array) -> Array:
        """Round ``x`` to the scale's storage dtype."""
        dt = self.scale_dtype or self.work_dtype
        return x if dt is None else x.astype(dt).astype(x.dtype)

    def _blocks(self, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """qwix's split shape and the axes reduced by calibration (its ``split_axis`` / ``calibrate``)."""
        if _parse_calibration(self.calibration_method)[0] == "fixed":  # always per tensor
            return [math.prod(shape)], [0]
        tiles = dict(self.tiled_axes)
        split, reduce = [], []
        for axis, dim in enumerate(shape):
            if axis in tiles:
                tile = tiles[axis]
                size = round(dim * tile) if isinstance(tile, float) else tile
                if size <= 0 or dim % size:
                    raise ValueError(f"`tiled_axes` {tiles!r} cannot tile axis {axis} of size {dim} (shape {shape})")
                split += [dim // size, size]
                reduce.append(len(split) - 1)
            else:
                split.append(dim)
                if axis not in self.channelwise_axes:
                    reduce.append(len(split) - 1)
        return split, reduce

    def _block_size(self, shape: tuple[int, ...]) -> int:
        split, reduce = self._blocks(shape)
        return math.prod(split[i] for i in reduce)

    def _qdiv(self, a: Array, b: Array, *, broadcast: bool) -> Array:
        """qwix's ``a / b`` as XLA computes it.

        XLA compiles a division by a broadcast divisor (one scale for several entries, or a scalar for several
        scales) as a multiplication by the reciprocal of the divisor, which may differ from the quotient by one
        unit in the last place; a division of equal shapes is an IEEE division. Weights in bfloat16 are divided in
        float32 and rounded.
        """
        if self.work_dtype is None and broadcast:
            return a * (1.0 / _opaque(b))
        # an elementwise IEEE division: the divisor is made a full array of a's shape (and batching) that XLA
        # cannot see through (``a >= 0`` holds wherever this branch is used: calibration values and sums)
        b_full = _opaque(jnp.where(a >= 0, b, jnp.zeros_like(b)) if jnp.ndim(b) == 0 else b)
        return self._work(_opaque(a) / b_full)

    def _calibration(self, w: Array) -> Array:
        """The calibration value of each block, shaped like qwix's split array with the block axes kept."""
        kind, args = _parse_calibration(self.calibration_method)
        split, reduce = self._blocks(w.shape)
        if kind == "fixed":
            return self._work(jnp.full([1] * len(split), args[0], w.dtype))
        a = w.reshape(split)
        if kind == "absmax":
            stat = jnp.max(jnp.abs(a), axis=tuple(reduce), keepdims=True)
        else:  # jnp.mean: the sum over the block divided by its size
            total = jnp.sum(self._work(jnp.square(a)), axis=tuple(reduce), keepdims=True)
            count = jnp.asarray(math.prod(split[i] for i in reduce), w.dtype)
            stat = self._work(jnp.sqrt(self._qdiv(total, count, broadcast=total.size > 1)))
        if args:
            stat = self._work(stat * _opaque(self._work(jnp.asarray(args[0], w.dtype))))
        return stat

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        cal = self._calibration(w)
        scale = self._qdiv(cal, self._work(jnp.asarray(self.bound, w.dtype)), broadcast=cal.size > 1)
        work = jnp.dtype(self.work_dtype) if self.work_dtype else w.dtype
        tiny_sqrt = jnp.sqrt(jnp.asarray(jnp.finfo(work).tiny, work)).astype(w.dtype)
        scale = jnp.where(scale < tiny_sqrt, jnp.ones_like(scale), scale)
        if self.qtype.startswith("mx"):  # qwix's MX exponent rule: the next power of two up
            if self.work_dtype is None:
                log2 = jnp.log2(scale)
            else:  # jnp.log2 in bfloat16 / float16: log(x) / log(2), each rounded to that dtype
                log2 = self._work(self._work(jnp.log(scale)) / self._work(jnp.asarray(math.log(2.0), w.dtype)))
            scale = self._work(2.0 ** jnp.ceil(log2))
        split, _ = self._blocks(w.shape)
        cal, scale = (jnp.broadcast_to(x, split).reshape(w.shape) for x in (cal, scale))
        stored = self._stored(scale)
        stored_safe = jnp.where(stored > 0, stored, jnp.ones_like(stored))
        return scale, stored, stored_safe, cal

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        lo, hi = self.code_range
        return float(lo), float(hi)

    def _float_index(self, x: Array) -> Array:
        """Signed index of the float element nearest ``x`` (qwix's clip-and-cast, round to nearest even)."""
        table = jnp.asarray(_magnitudes(self.element), x.dtype)
        top = table[-1]
        xq = jnp.clip(x, -top, top).astype(getattr(jnp, self.element)).astype(x.dtype)
        mag = jnp.searchsorted(table, jnp.abs(xq)).astype(x.dtype)
        return jnp.where(xq < 0, -mag, mag)

    def _element_value(self, i: Array) -> Array:
        """Value of the signed element index ``i`` (integers: ``i`` itself)."""
        if self.element is None:
            # through the integer code, as qwix's dequantize: code 0 gives +0, never -0
            return i.astype(jnp.int32).astype(i.dtype)
        table = jnp.asarray(_magnitudes(self.element), i.dtype)
        mag = table[jnp.abs(i).astype(jnp.int32)]
        return jnp.where(i < 0, -mag, mag)

    def _rule_index(self, cb: tuple[Array, ...], w: Array) -> Array:
        x = self._qdiv(w, cb[0], broadcast=self._block_size(w.shape) > 1)
        if self.element is not None:
            return self._float_index(x)
        lo, hi = self.code_range
        return jnp.clip(jnp.round(x), lo, hi)

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        if self.element is not None:
            return self._float_index(x / cb[2])
        lo, hi = self.code_range
        return jnp.clip(jnp.round(x / cb[2]), lo, hi)

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return self._stored(self._element_value(i) * cb[1])

    def _release(self, w: Array, key: Array | None) -> tuple[Array, Array]:
        value, mask = super()._release(w, key)
        if self.element is not None:
            # float elements keep the sign of a zero (qwix's cast gives -0 for small negatives): same level, same bits
            cb = self._codebook(w)
            x = self._qdiv(w, cb[0], broadcast=self._block_size(w.shape) > 1)
            value = jnp.where(value == 0, jnp.copysign(jnp.zeros_like(value), x), value)
        return value, mask

    def _boundary(self, cb: tuple[Array, ...], i: Array) -> Array:
        # codes are decided on w / scale with the scale before its cast: the boundary is (i + 1/2) scale
        if self.element is None:
            return (i + 0.5) * cb[0]
        return 0.5 * (self._element_value(i) + self._element_value(i + 1)) * cb[0]

    def _ste_mask(self, cb: tuple[Array, ...], w: Array) -> Array:
        return jnp.abs(w) <= cb[3]


def _default_name(qtype, channelwise_axes, tiled_axes, calibration_method, scale_dtype) -> str:
    name = f"qwix_{qtype}"
    if channelwise_axes:
        name += "_ch" + "".join(str(a) for a in channelwise_axes)
    for ax, tile in tiled_axes:
        name += f"_t{ax}x{tile:g}" if isinstance(tile, float) else f"_t{ax}x{tile}"
    kind, args = _parse_calibration(calibration_method)
    if kind != "absmax" or args:
        name += f"_{kind}" + "".join(f"{a:g}" for a in args)
    if scale_dtype is not None:
        name += "@" + _FORMAT[scale_dtype]
    return name


def from_qwix(
    qtype,
    *,
    channelwise_axes: Sequence[int] = (),
    tiled_axes: Mapping[int, int | float] | None = None,
    calibration_method: str = "absmax",
    scale_dtype=None,
    name: str | None = None,
) -> Qwix:
    """The quantizer of ``qwix.dequantize(qwix.quantize(w, qtype, ...))``: same arguments, same release.

    Reimplements qwix's symmetric integer path (module docstring): ``scale = cal / (qmax + 1/2)`` per block,
    codes ``clip(round(w / scale), -2^(b-1), 2^(b-1) - 1)`` with the scale in the weights' dtype, release
    ``code * scale`` with the scale cast to ``scale_dtype``; equal to qwix's bit for bit (cast to the weights'
    dtype), codes equal to its ``qvalue``. Its ``levels``, ``codes``, ``thresholds`` and ``neighbors`` follow the
    ladder of the codes at the stored scale; thresholds ``(i +- 1/2) scale`` use the scale before its cast, with
    their true gradient. ``info()["release"]["continuous"]`` is True for a data-dependent float32 scale and False
    for a bfloat16/float16 ``scale_dtype`` or a ``fixed`` calibration (theory.md section 9).

    Args:
      qtype: ``jnp.int8``, ``jnp.int4``, ``"int2"`` .. ``"int8"``, ``jnp.float8_e4m3fn``, ``jnp.float8_e5m2``,
        ``jnp.float4_e2m1fn``, ``"mxfp8"`` or ``"mxfp4"`` (these two need ``tiled_axes`` with tiles of 32).
      channelwise_axes: axes with one scale per index (qwix's weight default for a Dense kernel ``(in, out)`` is
        ``(1,)``); non-negative.
      tiled_axes: ``{axis: tile}``: blocks of ``tile`` entries along ``axis`` (an int), or ``1 / tile_count``
        (a float).
      calibration_method: ``"absmax"``, ``"absmax,c"``, ``"rms,c"``, ``"fixed,a"`` or ``"fixed,-a,a"``.
      scale_dtype: ``None`` (the weights' dtype), ``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16``.
      name: report name (default built from the arguments, e.g. ``"qwix_int4_ch1@bf16"``).

    Returns:
      A :class:`Qwix` quantizer.

    >>> q = from_qwix(jnp.int4)
    >>> w = jnp.array([-1.5, 0.1, 0.75])
    >>> q.codes(q(w), w).tolist()  # scale 1.5 / 7.5 = 0.2; -7.5 rounds to the code -8
    [-8, 0, 4]
    """
    qname = _qtype_name(qtype)
    channelwise = tuple(
        int(a) if isinstance(a, (int, np.integer)) and not isinstance(a, bool) else a for a in channelwise_axes
    )
    tiles = {} if tiled_axes is None else dict(tiled_axes)
    tiled = tuple(
        sorted(
            (
                int(a) if isinstance(a, (int, np.integer)) and not isinstance(a, bool) else a,
                int(t) if isinstance(t, np.integer) else t,
            )
            for a, t in tiles.items()
        )
    )
    sdt = _scale_dtype_name(scale_dtype)
    if name is None:
        name = _default_name(qname, channelwise, tiled, calibration_method, sdt)
    return Qwix(
        name=name,
        qtype=qname,
        channelwise_axes=channelwise,
        tiled_axes=tiled,
        calibration_method=calibration_method,
        scale_dtype=sdt,
    )


# ----------------------------------------------------------------------------------------------------------------
# QuantizationRule lists over a parameter pytree
# ----------------------------------------------------------------------------------------------------------------


def from_qwix_rules(rules: Sequence[Any], params: Any, *, scale_dtype=None) -> dict[str, Qwix | None]:
    """The quantizer each leaf of ``params`` gets from a list of ``qwix.QuantizationRule`` (PTQ of weights).

    qwix quantizes the weight operand of ``dot_general``/``einsum``/``conv`` ops in modules whose path (``/``-joined
    module names) ``re.fullmatch``-es a rule's ``module_path``; the first matching rule with a ``weight_qtype``
    wins. On a parameter tree this reads: a leaf named ``kernel`` whose parent path matches; its contracting axes
    are all but the last (Flax ``Linear`` ``(in, out)`` and ``Conv`` ``(..., in, out)`` kernels), so it is
    channelwise on the last axis and, with ``tile_size``, tiled along its last contracting axis (``ndim - 2``), as
    qwix's ``get_how_to_quantize`` for these ops. Other leaves (biases, norms, embeddings) stay in full precision.
    Kernels of other layouts (``Einsum`` with several output axes) are not covered: quantize them with
    :func:`from_qwix` and the right axes.

    Args:
      rules: ``qwix.QuantizationRule`` objects (or anything with ``module_path``, ``weight_qtype``, ``tile_size``
        and ``weight_calibration_method`` attributes).
      params: a pytree of arrays (e.g. ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).
      scale_dtype: storage dtype of the scales, as in :func:`from_qwix`.

    Returns:
      ``{leaf path: Qwix or None}`` in flattening order (``None``: left in full precision).
    """
    out: dict[str, Qwix | None] = {}
    for path, leaf in tree_util.tree_flatten_with_path(params)[0]:
        name = leaf_path(path)
        module, _, last = name.rpartition("/")
        q = None
        if last == "kernel" and jnp.ndim(leaf) >= 2:
            for rule in rules:
                if getattr(rule, "weight_qtype", None) is not None and re.fullmatch(rule.module_path, module):
                    nd = jnp.ndim(leaf)
                    tile = getattr(rule, "tile_size", None)
                    q = from_qwix(
                        rule.weight_qtype,
                        channelwise_axes=(nd - 1,),
                        tiled_axes={nd - 2: tile} if tile else None,
                        calibration_method=getattr(rule, "weight_calibration_method", "absmax"),
                        scale_dtype=scale_dtype,
                    )
                    break
        out[name] = q
    return out


def quantize_tree_qwix(rules: Sequence[Any], params: Any, *, scale_dtype=None) -> Any:
    """Apply a ``qwix.QuantizationRule`` list to a parameter pytree (:func:`from_qwix_rules`), leaf by leaf.

    Args:
      rules: ``qwix.QuantizationRule`` objects.
      params: a pytree of float arrays.
      scale_dtype: storage dtype of the scales.

    Returns:
      A pytree like ``params``: the released (dequantized) weights, unmatched leaves unchanged.
    """
    plan = from_qwix_rules(rules, params, scale_dtype=scale_dtype)
    leaves, treedef = tree_util.tree_flatten(params)
    out = [leaf if q is None else q(leaf) for leaf, q in zip(leaves, plan.values(), strict=True)]
    return tree_util.tree_unflatten(treedef, out)
