"""The `Quantizer` record and the codebook machinery its families share.

A quantizer maps a weight tensor ``w`` to a point of a codebook that ``w`` itself may define (an absmax scale, a
mean magnitude, a quantile). Every discrete family here is a *ladder*: its codebook points are indexed by
consecutive integers ``i`` in ``[i_min, i_max]`` (possibly unbounded), increasing in value, so "the adjacent
levels" of a point are the points at ``i - 1`` and ``i + 1`` and the round-to-nearest decision thresholds are the
boundaries between consecutive points (theory.md section 3(b)). A family only says how ``w`` fixes the codebook,
how an index is decoded to a value, how a value or a weight is encoded to an index, and where the boundaries lie;
``levels``, ``neighbors``, ``codes`` and ``thresholds`` are written once here. Continuous releases (fp32, pruning)
have no ladder: no adjacent levels and no thresholds.

Internally everything is computed in ``promote_types(w.dtype, float32)`` (float32 for bfloat16/float16 inputs,
float64 for float64 inputs) and cast back to ``w.dtype``.
"""

from __future__ import annotations

import dataclasses
import functools
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

        Scale fluctuations are ignored: two releases of one quantizer are "the same" iff their codes are equal
        (used for Monte Carlo flip rates, theory.md section 6). Continuous releases are coded by the bit pattern of
        their float32 value (so any change of value is a change of code).

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

    # -- shared machinery --------------------------------------------------------------------------------------

    def _around(self, cb: tuple[Array, ...], i: Array) -> tuple[Array, Array, Array]:
        i_min, i_max = self._index_range(cb)
        value = self._decode(cb, i)
        lower = self._decode(cb, jnp.maximum(i - 1, i_min))
        upper = self._decode(cb, jnp.minimum(i + 1, i_max))
        return value, lower, upper

    def _release(self, w: Array, key: Array | None) -> tuple[Array, Array]:
        cb = self._codebook(w)
        return self._decode(cb, self._release_index(cb, w, key)), self._ste_mask(cb, w)

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
        return jnp.broadcast_to(self._code(self._nearest(cb, v)), w.shape)

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
