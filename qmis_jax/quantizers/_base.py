"""The `Quantizer` record and the codebook machinery its families share.

A quantizer maps a weight tensor ``w`` to a point of a codebook that ``w`` itself may define (an absmax scale, a
mean magnitude, a quantile). Every discrete family here is a *ladder*: its codebook points are indexed by
consecutive integers ``i`` in ``[i_min, i_max]`` (possibly unbounded), increasing in value, so "the adjacent
levels" of a point are the points at ``i - 1`` and ``i + 1`` and the round-to-nearest decision thresholds are the
boundaries between consecutive points (theory.md section 3(b)). A family only says how ``w`` fixes the codebook,
how an index is decoded to a value, how a value or a weight is encoded to an index, and where the boundaries lie;
``levels``, ``neighbors``, ``codes`` and ``thresholds`` are written once here. Continuous releases (fp32, pruning)
have no ladder: no adjacent levels and no thresholds.

A family with a data-dependent scale (absmax: ``uniform(bits=...)``, ``fp8``, ``fp4``; absmean-type: ``sign``,
``ternary``) publishes it in a ``scale_format`` (theory.md section 9): ``"f32"`` (a continuous release), ``"bf16"`` /
``"f16"`` (the scale rounded to nearest, as a cast) or ``"e8m0"`` (a power of two: the OCP Microscaling shared
exponent ``2^(floor(log2 amax) - floor(log2 qmax))`` for absmax, ``2^round(log2 stat)`` for absmean-type
statistics). A rounded scale carries no gradient, so thresholds are fixed numbers given its code; the code itself
has its own events (``scale_margins``) and is packed into ``codes``.

Internally everything is computed in ``promote_types(w.dtype, float32)`` (float32 for bfloat16/float16 inputs,
float64 for float64 inputs) and cast back to ``w.dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qmis_jax.quantizers._ste import straight_through

Array = jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Boundary validation helpers (configuration is plain Python, validated when a quantizer is built)
# ----------------------------------------------------------------------------------------------------------------


def check_float_array(x: Any, argname: str) -> Array:
    """``jnp.asarray(x)``, or ``ValueError`` naming ``argname`` when it is not a floating-point array."""
    try:
        arr = jnp.asarray(x)
    except TypeError as err:
        raise ValueError(f"`{argname}` must be a floating-point array, got {type(x).__name__}") from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(f"`{argname}` must be a floating-point array, got dtype {arr.dtype}")
    return arr


def check_sparsity(sparsity: Any, argname: str = "sparsity") -> float:
    """A Python float in ``[0, 1)``, or ``ValueError`` naming ``argname`` and the value."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{argname}` must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"`{argname}` must lie in [0, 1), got {sparsity!r}")
    return value


def percent_label(fraction: float) -> str:
    """``0.33 -> "33"``, ``0.9 -> "90"``, ``0.125 -> "12.5"``: the percentage used in preset-style names."""
    return f"{round(100.0 * fraction, 4):g}"


def compute_dtype(dtype: Any) -> Any:
    """The dtype codebooks are computed in: at least float32, float64 when the input is float64."""
    return jnp.promote_types(dtype, jnp.float32)


def safe_positive(scale: Array) -> Array:
    """``scale`` where positive, else 1: a divisor that never produces NaN (all-zero tensors)."""
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


# ----------------------------------------------------------------------------------------------------------------
# Scale statistics to the last bit (theory.md section 9: a release must re-derive its own scale)
# ----------------------------------------------------------------------------------------------------------------
#
# Re-quantizing a release must return it bit for bit: ``q(q(w)) == q(w)``. The scale of ``q(w)`` is computed from
# the released values, so the statistic must come back exactly: the mean magnitude of ``n`` copies of ``alpha``
# must be ``alpha`` (a float32 sum accumulated in order is not: its rounding errors add up), and an absmax scale
# ``s`` must be recovered from the release's largest level ``fl(qmax s)``. Under ``jit`` XLA also rewrites a
# division by a constant into a multiplication by its rounded reciprocal, which is not a correctly rounded
# quotient; the helpers below divide exactly.


def exact_div(a: Array, c: float) -> Array:
    """``a / c`` rounded once (an IEEE division), also under ``jit``, for a Python number ``c``.

    XLA compiles ``a / c`` with a constant ``c`` as ``a * fl(1 / c)``, one unit in the last place away from the
    quotient at times. Here the divisor is an array shaped like ``a`` (``c`` where ``a`` is not NaN) hidden behind
    an optimization barrier, so the division stays a division. The divisor carries no gradient (``c`` is a
    constant): ``d(a / c) = da / c``.
    """
    divisor = lax.stop_gradient(jnp.where(jnp.isnan(a), a, jnp.full(jnp.shape(a), c, jnp.result_type(a))))
    return a / lax.optimization_barrier(divisor)


def _two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth's TwoSum: additions only)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _add2(x: tuple[Array, Array], y: tuple[Array, Array]) -> tuple[Array, Array]:
    """The sum of two double words ``hi + lo`` (TwoSum of the high parts, renormalised)."""
    s, e = _two_sum(x[0], y[0])
    return _two_sum(s, e + (x[1] + y[1]))


def _sum2(x: Array) -> tuple[Array, Array]:
    """Double-word sum ``(hi, lo)`` of a 1-D array: one reduction whose combiner is the compensated addition
    :func:`_add2`, so ``hi + lo`` carries about twice the working precision whatever order XLA adds in (a sum of
    integer multiples of one unit below ``2^48`` of them is exact)."""
    zero = jnp.zeros((), x.dtype)
    return lax.reduce((x, jnp.zeros_like(x)), (zero, zero), _add2, (0,))


def _accurate_mean_value(x: Array, mask: Array | None, count: int) -> Array:
    flat = x.ravel()
    keep = None if mask is None else jnp.broadcast_to(mask, x.shape).ravel()
    if keep is not None:
        flat = jnp.where(keep, flat, jnp.zeros_like(flat))
    hi, lo = _sum2(flat)
    m0 = exact_div(hi + lo, count)
    d = flat - m0
    if keep is not None:
        d = jnp.where(keep, d, jnp.zeros_like(d))
    d_hi, d_lo = _sum2(d)
    mean = m0 + exact_div(d_hi + d_lo, count)
    # an infinite or NaN entry (or an overflowing sum) makes the compensations NaN: the plain mean says which
    return jnp.where(jnp.isfinite(mean), mean, exact_div(jnp.sum(flat), count))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _accurate_mean(x: Array, mask: Array | None, count: int) -> Array:
    return _accurate_mean_value(x, mask, count)


@_accurate_mean.defjvp
def _accurate_mean_jvp(count, primals, tangents):
    x, mask = primals
    dx = tangents[0]
    if mask is not None:
        dx = jnp.where(mask, dx, jnp.zeros_like(dx))
    return _accurate_mean_value(x, mask, count), jnp.sum(dx) / count


def accurate_mean(x: Array, where: Array | None = None, *, count: int | None = None) -> Array:
    """The mean of ``x`` (over the entries where ``where`` is true) to the last bit: the scale statistic of
    theory.md section 9 as a release re-derives it.

    A corrected two-pass mean with compensated sums: ``m0 = fl(S / count)`` from a double-word sum ``S`` (a
    reduction whose combiner is TwoSum), then ``m = m0 + fl(sum(x - m0) / count)``, the correction summed the same
    way and both divisions exact (:func:`exact_div`). The mean of ``count`` equal values is that value exactly
    (for ``count < 2^22``): ``S`` is exact, ``m0`` is within an ulp of the value, every ``x - m0`` is the same exact
    difference, and so is the correction. In general the result is within about an ulp of the exact mean,
    whatever order the backend sums in. The gradient is that of the plain mean.

    Args:
      x: float array of any shape.
      where: None (every entry), or a boolean array broadcastable to ``x``: the entries averaged.
      count: the number of entries averaged (a Python int > 0), required with ``where`` (the kept count of a sparse
        leaf is known before the data are seen); default ``x.size``.

    Returns:
      A scalar of ``x``'s dtype.

    >>> import jax.numpy as jnp
    >>> x = jnp.full((7,), 0.1, jnp.float32)
    >>> bool(accurate_mean(x) == x[0]), bool(jnp.mean(x) == x[0])
    (True, False)
    """
    if count is None:
        if where is not None:
            raise ValueError("`count` is required with `where`, got count=None")
        count = math.prod(jnp.shape(x))
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"`count` must be a positive int, got {count!r}")
    return _accurate_mean(x, where, int(count))


def absmax_scale(stat: Array, qmax: float) -> Array:
    """The absmax scale ``stat / qmax`` as the fixed point that its release re-derives (theory.md section 9).

    A release's largest magnitude is its top level ``fl(qmax s)``, so re-quantizing it re-derives the scale
    ``g(s) = fl(fl(qmax s) / qmax)``, which is not always ``s`` when ``qmax`` is not a power of two. The scale is
    therefore ``s = g(fl(stat / qmax))``. The map ``g`` is idempotent: for ``y = fl(qmax x)`` the float nearest
    ``y / qmax`` is no farther from it than ``x``, so it lies in ``y``'s rounding interval divided by ``qmax`` and
    ``fl(qmax g(x)) = y`` (tests/test_quantizers_idempotent.py checks ``g(g(x)) = g(x)`` exhaustively over a float32
    binade, hence for every normal float32, for every ``qmax`` of the package). So ``g(s) = s`` and a release
    returns its own scale bit for bit. ``s`` is within an ulp of ``stat / qmax``; both divisions are exact
    (:func:`exact_div`); the gradient is that of ``stat / qmax``.
    """
    return exact_div(qmax * exact_div(stat, qmax), qmax)


# ----------------------------------------------------------------------------------------------------------------
# Scale formats (theory.md section 9): how a data-dependent scale is published
# ----------------------------------------------------------------------------------------------------------------

SCALE_FORMATS = ("f32", "bf16", "f16", "e8m0")
SCALE_RULES = ("absmax", "absmean")
_FORMAT_DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16}
E8M0_MIN_EXPONENT = -127
E8M0_MAX_EXPONENT = 127
# codes of a release with a discrete scale pack the scale code in their low bits (see Quantizer.codes)
SCALE_CODE_BITS = {"e8m0": 8, "bf16": 16, "f16": 16}


def check_scale_format(scale_format: Any) -> str:
    """``scale_format`` when it is one of :data:`SCALE_FORMATS`, else ``ValueError`` naming it."""
    if not isinstance(scale_format, str) or scale_format not in SCALE_FORMATS:
        raise ValueError(f"`scale_format` must be one of {SCALE_FORMATS}, got {scale_format!r}")
    return scale_format


def format_name(name: str, scale_format: str) -> str:
    """A report name for a scale format: ``name`` for ``"f32"`` (the bare preset), else ``name@scale_format``."""
    return name if scale_format == "f32" else f"{name}@{scale_format}"


def _floor_log2(x: Array) -> Array:
    """``floor(log2 x)`` exactly for ``x > 0`` (from the binary exponent, no rounding of a logarithm)."""
    _, ex = jnp.frexp(x)
    return ex.astype(jnp.int32) - 1


def scale_exponent(stat: Array, *, rule: str, qmax: float | None = None) -> Array:
    """The E8M0 exponent (int32) of a scale statistic (theory.md section 9).

    ``rule="absmax"`` (``stat`` the clip value ``c max|w|`` of a block): the OCP Microscaling shared exponent
    ``floor(log2 stat) - floor(log2 qmax)``. ``rule="absmean"`` (``stat`` a mean magnitude): ``round(log2 stat)``.
    A zero statistic (an all-zero block) gets the smallest exponent; exponents are clipped to E8M0's range.
    """
    positive = stat > 0
    safe = jnp.where(positive, stat, jnp.ones_like(stat))
    if rule == "absmax":
        e = _floor_log2(safe) - int(math.floor(math.log2(qmax)))
    else:
        e = jnp.round(jnp.log2(safe)).astype(jnp.int32)
    e = jnp.where(positive, e, E8M0_MIN_EXPONENT)
    return jnp.clip(e, E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)


def publish_scale(stat: Array, fmt: str, *, rule: str, qmax: float | None = None) -> Array:
    """The published scale of a statistic in format ``fmt`` (theory.md section 9), in ``stat``'s dtype.

    ``f32``: ``stat / qmax`` (absmax, as the fixed point :func:`absmax_scale` that a release re-derives) or
    ``stat`` (absmean), with its true gradient: a continuous function of the weights. ``bf16`` / ``f16``: that
    value rounded to the format (round to nearest even, as a cast). ``e8m0``: ``2^scale_exponent(stat)``. Discrete
    formats are piecewise constant in the weights: no gradient flows through them, so thresholds given the scale
    code are fixed numbers.
    """
    raw = absmax_scale(stat, qmax) if rule == "absmax" else stat
    if fmt == "f32":
        return raw
    if fmt in _FORMAT_DTYPES:
        return lax.stop_gradient(raw.astype(_FORMAT_DTYPES[fmt]).astype(stat.dtype))
    e = scale_exponent(lax.stop_gradient(stat), rule=rule, qmax=qmax)
    return jnp.ldexp(jnp.ones_like(stat), e)


def scale_code(stat: Array, fmt: str, *, rule: str, qmax: float | None = None) -> Array:
    """Integer code of the published scale: the E8M0 exponent, or the bit pattern of the bf16 / f16 / f32 value."""
    if fmt == "e8m0":
        return scale_exponent(stat, rule=rule, qmax=qmax)
    value = publish_scale(lax.stop_gradient(stat), fmt, rule=rule, qmax=qmax)
    if fmt in _FORMAT_DTYPES:
        bits = lax.bitcast_convert_type(value.astype(_FORMAT_DTYPES[fmt]), jnp.uint16)
        return bits.astype(jnp.int32)
    return lax.bitcast_convert_type(value.astype(jnp.float32), jnp.int32)


def scale_bounds(stat: Array, fmt: str, *, rule: str, qmax: float | None = None) -> tuple[Array, Array]:
    """``(lo, hi)``: the interval of the statistic over which the published scale code stays the same.

    E8M0 absmax: ``[2^e, 2^(e + 1))`` with ``e = floor(log2 stat)``; E8M0 absmean: ``[2^(k - 1/2), 2^(k + 1/2))``
    with ``k = round(log2 stat)``; bf16 / f16: the midpoints between the rounded scale and its neighbours in the
    format (times ``qmax`` for absmax). Computed without gradient (the boundaries of section 9 are fixed numbers).
    """
    stat = lax.stop_gradient(stat)
    one = jnp.ones_like(stat)
    if fmt == "e8m0":
        if rule == "absmax":
            e = _floor_log2(jnp.where(stat > 0, stat, one))
            return jnp.ldexp(one, e), jnp.ldexp(one, e + 1)
        k = jnp.round(jnp.log2(jnp.where(stat > 0, stat, one)))
        return jnp.exp2(k - 0.5), jnp.exp2(k + 0.5)
    dt = _FORMAT_DTYPES[fmt]
    value = publish_scale(stat, fmt, rule=rule, qmax=qmax).astype(dt)
    bits = lax.bitcast_convert_type(value, jnp.uint16)
    up = lax.bitcast_convert_type(bits + jnp.uint16(1), dt).astype(stat.dtype)
    down = lax.bitcast_convert_type(jnp.maximum(bits, jnp.uint16(1)) - jnp.uint16(1), dt).astype(stat.dtype)
    v = value.astype(stat.dtype)
    factor = qmax if rule == "absmax" else 1.0
    return factor * 0.5 * (v + down), factor * 0.5 * (v + up)


# ----------------------------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer:
    """A post-training quantizer: a pure, hashable map from a weight tensor to a codebook point.

    Frozen and hashable, so it can be a static argument of ``jax.jit``. Calling it quantizes with a
    straight-through gradient; ``levels``, ``neighbors``, ``codes`` and ``thresholds`` expose the codebook that the
    statistics of theory.md sections 3-6 need (competitors, flip events, decision margins).

    Attributes:
      name: short identifier used in reports (a preset name such as ``"int4"`` or ``"ternary_s90"``).
      continuous: whether the release keeps continuous coordinates (fp32, prune): no adjacent levels and no
        thresholds, hence ``r = 0`` (theory.md section 4).
      stochastic: whether quantizing draws random numbers (then ``key`` is required).

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import uniform
    >>> q = uniform(bits=2)  # levels {-s, 0, s} with s = max|w|
    >>> w = jnp.array([-2.0, 0.4, 1.2])
    >>> [x.tolist() for x in q.levels(w)]
    [[-2.0, 0.0, 2.0], [-2.0, -2.0, 0.0], [0.0, 2.0, 2.0]]
    >>> [x.tolist() for x in q.thresholds(w)]
    [[-inf, -1.0, 1.0], [-1.0, 1.0, inf]]
    >>> q.codes(q(w), w).tolist()
    [-1, 0, 1]
    """

    name: str

    @property
    def continuous(self) -> bool:
        return False

    @property
    def stochastic(self) -> bool:
        return False

    @property
    def family(self) -> str:
        """The family of the quantizer (``"uniform"``, ``"sign"``, ``"ternary"``, ``"prune"``...)."""
        return type(self).__name__.lower()

    @property
    def scale_rule(self) -> str | None:
        """How the published scale is computed from the weights: ``"absmax"``, ``"absmean"`` or None (no scale)."""
        return None

    @property
    def scaled(self) -> bool:
        """Whether the release publishes a data-dependent scale (theory.md section 9)."""
        return self.scale_rule is not None

    @property
    def discrete_scale(self) -> bool:
        """Whether the release publishes a scale on a fixed grid (``bf16``, ``f16``, ``e8m0``): it then has scale
        codes and scale events (theory.md section 9). False without a scale and for float32 scales."""
        return self.scaled and getattr(self, "scale_format", "f32") != "f32"

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description for reports: name, family, flags and the configuration fields."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}
        return {
            "name": self.name,
            "family": self.family,
            "continuous": self.continuous,
            "stochastic": self.stochastic,
            **fields,
        }

    # -- public interface --------------------------------------------------------------------------------------

    def __call__(self, w: Array, *, key: Array | None = None) -> Array:
        """Quantize ``w``; straight-through gradient (identity inside the clip range, zero outside).

        Args:
          w: float array of any shape (float32, bfloat16, float16, float64 with x64 enabled).
          key: a PRNG key, required when ``self.stochastic``; ignored otherwise.

        Returns:
          The released weights, same shape and dtype as ``w``.
        """
        w = check_float_array(w, "w")
        self._check_key(key)
        if w.size == 0:
            return w
        return _quantize(self, w, key)

    def levels(self, w: Array, *, key: Array | None = None) -> tuple[Array, Array, Array]:
        """The released level of each coordinate and its adjacent codebook levels, the codebook fixed by ``w``.

        For deterministic quantizers ``levels(w) == (q(w), *neighbors(q(w), w))``. Where no level exists below
        (above) a coordinate's level, ``lower`` (``upper``) equals the value; continuous releases return the value
        three times. The levels carry the true derivative of the codebook (scale), not the straight-through one.

        Args:
          w: float array of any shape.
          key: PRNG key, required when ``self.stochastic`` (the release is then the stochastic one).

        Returns:
          ``(value, lower, upper)``, each the shape and dtype of ``w``, with ``lower <= value <= upper``.
        """
        w = check_float_array(w, "w")
        self._check_key(key)
        if w.size == 0:
            return w, w, w
        return _levels(self, w, key)

    def neighbors(self, v: Array, w: Array) -> tuple[Array, Array]:
        """Adjacent levels of codebook points ``v`` in the codebook that ``w`` defines (scale held fixed).

        Args:
          v: points of ``w``'s codebook, same shape as ``w`` (e.g. a release ``q(w)``, or a competitor of it);
            other values are first snapped to the nearest codebook point.
          w: float array defining the codebook (its scale / quantile).

        Returns:
          ``(lower, upper)`` in ``w``'s dtype; equal to ``v`` where no adjacent level exists.
        """
        v, w = self._check_pair(v, w)
        if w.size == 0:
            return w, w
        return _neighbors(self, v, w)

    def codes(self, v: Array, w: Array) -> Array:
        """Integer index of each codebook point ``v`` in the codebook of ``w``; equal codes = the same release.

        Two releases of one quantizer are "the same" iff their codes are equal (Monte Carlo flip rates, theory.md
        sections 6 and 9). With a discrete scale format (``bf16``, ``f16``, ``e8m0``) the scale code is part of
        the release: the code is ``element * 2^S + scale_code`` (``S = 8`` for E8M0, whose exponent is offset by
        127; ``S = 16`` for the bf16 / f16 bit pattern), so a change of scale alone is a change of code;
        ``code >> S`` is the element code (see :func:`~qmis_jax.quantizers.published`). With a float32 scale only
        the element codes are compared (such a release is continuous anyway, section 9). Continuous releases are
        coded by the bit pattern of their float32 value (so any change of value is a change of code).

        Args:
          v: points of ``w``'s codebook, same shape as ``w``.
          w: float array defining the codebook.

        Returns:
          int32 array of the shape of ``w`` (for a fixed grid, valid while ``|v / step| < 2^31``).
        """
        v, w = self._check_pair(v, w)
        if w.size == 0:
            return jnp.zeros(w.shape, jnp.int32)
        return _codes(self, v, w)

    def scales(self, w: Array) -> Array:
        """The published scales of ``w``'s release, one per block (tensor, channel, group), in its format.

        Args:
          w: float array of any shape.

        Returns:
          A float array of the block scales (shape ``()`` for one per tensor, ``(1, ..., C)`` per channel,
          ``(G, C)`` per group); ``(0,)`` when the quantizer publishes no scale.
        """
        w = check_float_array(w, "w")
        if not self.scaled or w.size == 0:
            return jnp.zeros((0,), jnp.result_type(w.dtype, jnp.float32))
        return _scales(self, w)

    def scale_codes(self, w: Array) -> Array:
        """Integer codes of the published scales (theory.md section 9): the E8M0 exponent, or the bit pattern of
        the bf16 / f16 / f32 scale; one per block, as :meth:`scales`; ``(0,)`` without a scale.

        >>> import jax.numpy as jnp
        >>> from qmis_jax.quantizers import get
        >>> get("int4@e8m0").scale_codes(jnp.array([0.5, -1.3, 0.2, 0.9])).tolist()  # floor(log2 1.3) - 2
        -2
        """
        w = check_float_array(w, "w")
        if not self.scaled or w.size == 0:
            return jnp.zeros((0,), jnp.int32)
        return _scale_codes(self, w)

    def scale_margins(self, w: Array) -> Array:
        """Decision margins of the scale code's events, differentiable in ``w`` (theory.md section 9).

        Only for discrete scale formats (else ``(0,)``). Absmax: per coordinate ``j`` the rising event
        ``b_up - |w_j|`` and, for a block's largest ``|w_j|`` only, the falling event ``|w_j| - b_lo`` (``+inf``
        elsewhere), interleaved (``2 size`` entries). Absmean-type statistics: per block ``stat(w) - b_lo`` and
        ``b_hi - stat(w)`` (``2 * blocks`` entries). The boundaries are fixed numbers (no gradient), so the delta
        method ``s^2 = grad g^T Sigma grad g`` applies to the statistic alone.

        Args:
          w: float array of any shape.

        Returns:
          A flat float array of margins (``+inf`` where an event does not exist).
        """
        w = check_float_array(w, "w")
        if not self.discrete_scale or w.size == 0:
            return jnp.zeros((0,), jnp.result_type(w.dtype, jnp.float32))
        return _scale_margins(self, w)

    def thresholds(self, w: Array) -> tuple[Array, Array]:
        """Round-to-nearest decision thresholds ``(t_lower, t_upper)`` per coordinate, with the true gradient.

        ``t_lower[k]`` (``t_upper[k]``) is the value of ``w_k`` at which coordinate ``k``'s released level moves
        down (up), as a function of the whole tensor ``w``: a data-dependent scale or quantile is differentiated
        through (no straight-through), so the delta-method margins ``g_k = w_k - t_k(w)`` of theory.md section 3(b)
        can be differentiated with ``jax.grad``. ``-inf`` / ``+inf`` where no level exists below / above and for
        continuous quantizers. Stochastic quantizers return the thresholds of their round-to-nearest grid.

        Args:
          w: float array of any shape.

        Returns:
          ``(t_lower, t_upper)``, each the shape and dtype of ``w``.
        """
        w = check_float_array(w, "w")
        if w.size == 0:
            return w, w
        return _thresholds(self, w)

    # -- helpers -----------------------------------------------------------------------------------------------

    def _check_key(self, key: Array | None) -> None:
        if self.stochastic and key is None:
            raise ValueError(
                f"`key` is required: quantizer {self.name!r} rounds stochastically, got key=None; "
                "pass key=jax.random.key(...)"
            )

    @staticmethod
    def _check_pair(v: Array, w: Array) -> tuple[Array, Array]:
        w = check_float_array(w, "w")
        v = check_float_array(v, "v")
        if v.shape != w.shape:
            raise ValueError(f"`v` must have the shape of `w` {w.shape}, got {v.shape}")
        return v, w

    # -- what a family implements (arrays already in the compute dtype) ----------------------------------------

    def _release(self, w: Array, key: Array | None) -> tuple[Array, Array]:  # pragma: no cover - abstract
        """``(value, ste_mask)`` of the release of ``w`` (no gradient needed)."""
        raise NotImplementedError

    def _levels(self, w: Array, key: Array | None) -> tuple[Array, Array, Array]:  # pragma: no cover
        raise NotImplementedError

    def _neighbors(self, v: Array, w: Array) -> tuple[Array, Array]:  # pragma: no cover
        raise NotImplementedError

    def _codes(self, v: Array, w: Array) -> Array:  # pragma: no cover
        raise NotImplementedError

    def _thresholds(self, w: Array) -> tuple[Array, Array]:  # pragma: no cover
        raise NotImplementedError

    def _scales(self, w: Array) -> Array:  # pragma: no cover - scaled families only
        raise NotImplementedError

    def _scale_codes(self, w: Array) -> Array:  # pragma: no cover - scaled families only
        raise NotImplementedError

    def _scale_margins(self, w: Array) -> Array:  # pragma: no cover - scaled families only
        raise NotImplementedError


# Compiled entry points of the public methods (validation happens before, in plain Python). One compilation per
# (quantizer, shape, dtype): quantizers are hashable static arguments. Inside a caller's jit they are inlined.


@functools.partial(jax.jit, static_argnums=0)
def _quantize(q: Quantizer, w: Array, key: Array | None) -> Array:
    wc = lax.stop_gradient(w).astype(compute_dtype(w.dtype))
    value, mask = q._release(wc, key)
    return straight_through(w, value.astype(w.dtype), jnp.broadcast_to(mask, w.shape))


@functools.partial(jax.jit, static_argnums=0)
def _levels(q: Quantizer, w: Array, key: Array | None) -> tuple[Array, Array, Array]:
    return tuple(x.astype(w.dtype) for x in q._levels(w.astype(compute_dtype(w.dtype)), key))


@functools.partial(jax.jit, static_argnums=0)
def _neighbors(q: Quantizer, v: Array, w: Array) -> tuple[Array, Array]:
    cd = compute_dtype(w.dtype)
    lower, upper = q._neighbors(v.astype(cd), w.astype(cd))
    return lower.astype(w.dtype), upper.astype(w.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _codes(q: Quantizer, v: Array, w: Array) -> Array:
    cd = compute_dtype(w.dtype)
    return q._codes(v.astype(cd), w.astype(cd))


@functools.partial(jax.jit, static_argnums=0)
def _scales(q: Quantizer, w: Array) -> Array:
    return q._scales(w.astype(compute_dtype(w.dtype)))


@functools.partial(jax.jit, static_argnums=0)
def _scale_codes(q: Quantizer, w: Array) -> Array:
    return q._scale_codes(w.astype(compute_dtype(w.dtype)))


@functools.partial(jax.jit, static_argnums=0)
def _scale_margins(q: Quantizer, w: Array) -> Array:
    return q._scale_margins(w.astype(compute_dtype(w.dtype)))


@functools.partial(jax.jit, static_argnums=0)
def _thresholds(q: Quantizer, w: Array) -> tuple[Array, Array]:
    lo, hi = q._thresholds(w.astype(compute_dtype(w.dtype)))
    return lo.astype(w.dtype), hi.astype(w.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LadderQuantizer(Quantizer):
    """A discrete quantizer whose codebook points are indexed by consecutive integers (see module docstring).

    Subclasses implement ``_codebook``, ``_index_range``, ``_nearest``, ``_decode`` and, where they differ from
    the defaults, ``_release_index`` (default: the deterministic rule), ``_rule_index`` (default: nearest point),
    ``_boundary`` (default: midpoint of consecutive points), ``_ste_mask`` (default: identity everywhere) and
    ``_code`` (default: the index itself). Indices are carried as floats (so unbounded ladders work); the public
    codes are int32.
    """

    # -- hooks -------------------------------------------------------------------------------------------------

    def _codebook(self, w: Array) -> tuple[Array, ...]:  # pragma: no cover - abstract
        """Arrays broadcastable to ``w.shape`` that fix the codebook (scale...), with their true gradient."""
        raise NotImplementedError

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:  # pragma: no cover - abstract
        """Index of the codebook point nearest to ``x`` (exact on codebook points)."""
        raise NotImplementedError

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rule_index(self, cb: tuple[Array, ...], w: Array) -> Array:
        """Index of the deterministic release of ``w`` (round to nearest unless the family says otherwise)."""
        return self._nearest(cb, w)

    def _release_index(self, cb: tuple[Array, ...], w: Array, key: Array | None) -> Array:
        return self._rule_index(cb, w)

    def _boundary(self, cb: tuple[Array, ...], i: Array) -> Array:
        """Decision boundary between the points of index ``i`` and ``i + 1`` (default: their midpoint)."""
        return 0.5 * (self._decode(cb, i) + self._decode(cb, i + 1))

    def _ste_mask(self, cb: tuple[Array, ...], w: Array) -> Array:
        return jnp.ones(w.shape, bool)

    def _code(self, i: Array) -> Array:
        return i.astype(jnp.int32)

    # -- scales (families with a data-dependent scale set ``scale_rule`` and implement ``_scale_stat``) --------

    @property
    def qmax(self) -> float | None:
        """Largest element magnitude of an absmax family (the ``qmax`` of the E8M0 rule); None otherwise."""
        return None

    def _scale_stat(self, w: Array) -> Array:  # pragma: no cover - scaled families only
        """The statistic the scale is computed from, one per block (absmax: the clip value ``c max|w|``;
        absmean: the mean magnitude), with its true gradient."""
        raise NotImplementedError

    def _expand(self, blocks: Array, w: Array) -> Array:
        """Broadcast a per-block array to ``w.shape`` (default: plain broadcasting)."""
        return jnp.broadcast_to(blocks, w.shape)

    def _scale(self, w: Array) -> Array:
        """The published scale per coordinate (broadcastable to ``w``), in ``self.scale_format``."""
        stat = self._scale_stat(w)
        return self._expand(publish_scale(stat, self.scale_format, rule=self.scale_rule, qmax=self.qmax), w)

    def _scales(self, w: Array) -> Array:
        return publish_scale(self._scale_stat(w), self.scale_format, rule=self.scale_rule, qmax=self.qmax)

    def _scale_codes(self, w: Array) -> Array:
        return scale_code(self._scale_stat(w), self.scale_format, rule=self.scale_rule, qmax=self.qmax)

    def _scale_margins(self, w: Array) -> Array:
        stat = self._scale_stat(w)
        lo, hi = scale_bounds(stat, self.scale_format, rule=self.scale_rule, qmax=self.qmax)
        inf = jnp.asarray(jnp.inf, w.dtype)
        if self.scale_rule == "absmean":  # a zero statistic (nothing kept, an all-zero leaf) has no event
            live = lax.stop_gradient(stat) > 0
            return jnp.stack([jnp.where(live, stat - lo, inf), jnp.where(live, hi - stat, inf)], axis=-1).reshape(-1)
        ratio = getattr(self, "clip_ratio", 1.0)
        a = ratio * jnp.abs(w)
        stat_e = lax.stop_gradient(self._expand(stat, w))
        live = stat_e > 0
        rising = jnp.where(live, (self._expand(hi, w) - a) / ratio, inf)
        falling = jnp.where(live & (a >= stat_e), (a - self._expand(lo, w)) / ratio, inf)
        return jnp.stack([rising, falling], axis=-1).reshape(-1)

    def _pack(self, code: Array, w: Array) -> Array:
        """Codes of a release with a discrete scale: the element code times ``2^S`` plus the (non-negative) scale
        code, so equal packed codes mean an equal element code and an equal scale."""
        if not self.discrete_scale:
            return code
        sc = lax.stop_gradient(self._scale_codes(w))
        if self.scale_format == "e8m0":
            sc = sc - E8M0_MIN_EXPONENT
        return code * (1 << SCALE_CODE_BITS[self.scale_format]) + self._expand(sc, w)

    # -- shared machinery --------------------------------------------------------------------------------------

    def _level(self, cb: tuple[Array, ...], i: Array) -> Array:
        """The value of index ``i``, a zero level released as ``+0``: a level is a function of its code alone (a
        small negative weight rounded to zero would otherwise give ``-0``, and its re-quantization ``+0``)."""
        value = self._decode(cb, i)
        return jnp.where(value == 0, jnp.zeros_like(value), value)

    def _around(self, cb: tuple[Array, ...], i: Array) -> tuple[Array, Array, Array]:
        i_min, i_max = self._index_range(cb)
        value = self._level(cb, i)
        lower = self._level(cb, jnp.maximum(i - 1, i_min))
        upper = self._level(cb, jnp.minimum(i + 1, i_max))
        return value, lower, upper

    def _release(self, w: Array, key: Array | None) -> tuple[Array, Array]:
        cb = self._codebook(w)
        return self._level(cb, self._release_index(cb, w, key)), self._ste_mask(cb, w)

    def _levels(self, w: Array, key: Array | None) -> tuple[Array, Array, Array]:
        cb = self._codebook(w)
        value, lower, upper = self._around(cb, self._release_index(cb, w, key))
        shape = w.shape
        return tuple(jnp.broadcast_to(x, shape) for x in (value, lower, upper))

    def _neighbors(self, v: Array, w: Array) -> tuple[Array, Array]:
        cb = self._codebook(w)
        _, lower, upper = self._around(cb, lax.stop_gradient(self._nearest(cb, v)))
        return jnp.broadcast_to(lower, w.shape), jnp.broadcast_to(upper, w.shape)

    def _codes(self, v: Array, w: Array) -> Array:
        cb = lax.stop_gradient(self._codebook(w))
        return self._pack(jnp.broadcast_to(self._code(self._nearest(cb, v)), w.shape), w)

    def _thresholds(self, w: Array) -> tuple[Array, Array]:
        cb = self._codebook(w)
        i = lax.stop_gradient(self._rule_index(cb, w))
        i_min, i_max = self._index_range(cb)
        inf = jnp.asarray(jnp.inf, w.dtype)
        below = self._boundary(cb, jnp.maximum(i - 1, i_min))
        above = self._boundary(cb, jnp.minimum(i, i_max - 1))
        t_lower = jnp.where(i > i_min, below, -inf)
        t_upper = jnp.where(i < i_max, above, inf)
        return jnp.broadcast_to(t_lower, w.shape), jnp.broadcast_to(t_upper, w.shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaledLadderQuantizer(LadderQuantizer):
    """A ladder fixed by one data-dependent scale of a fixed rule, published in ``scale_format`` (theory.md section 9).

    A family declares the field ``scale_format: str`` with its default (declared there, so that it keeps its place
    after the family's own fields in ``repr`` and ``info``), sets the class constants ``family``, ``scale_rule``
    (``"absmax"`` or ``"absmean"``) and, for absmax, ``qmax``, and implements ``_scale_stat``. ``__post_init__``
    validates the format; a family with more fields checks them first, then calls ``super().__post_init__()``.
    The default codebook is the scale and its safe divisor (:meth:`_codebook`).
    (``Uniform``, whose rule depends on ``bits``, implements these itself.)
    """

    def __post_init__(self) -> None:
        check_scale_format(self.scale_format)

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        """``(scale, divisor)``: the published scale per coordinate, and the same with zeros read as 1."""
        scale = self._scale(w)
        return scale, safe_positive(scale)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContinuousQuantizer(Quantizer):
    """A release that keeps continuous coordinates: no adjacent levels, no thresholds (theory.md section 4).

    Subclasses implement ``_release``. Codes are the bit patterns of the float32 values (``-0`` coded as ``+0``),
    so two releases have equal codes iff their values are equal (float64 values are compared after rounding to
    float32).
    """

    @property
    def continuous(self) -> bool:
        return True

    def _levels(self, w: Array, key: Array | None) -> tuple[Array, Array, Array]:
        value, _ = self._release(w, key)
        return value, value, value

    def _neighbors(self, v: Array, w: Array) -> tuple[Array, Array]:
        return v, v

    def _codes(self, v: Array, w: Array) -> Array:
        v32 = v.astype(jnp.float32)
        v32 = jnp.where(v32 == 0, jnp.zeros_like(v32), v32)
        return lax.bitcast_convert_type(v32, jnp.int32)

    def _thresholds(self, w: Array) -> tuple[Array, Array]:
        inf = jnp.full(w.shape, jnp.inf, w.dtype)
        return -inf, inf
