"""Uniform quantizers: symmetric absmax integer grids and fixed-step grids (design.md, "Quantizer definitions").

Absmax (``bits=b``): ``s = c * max|w| / (2^(b-1) - 1)`` over the tensor, each output channel (last axis) or each
group of ``group_size`` consecutive input rows of an output channel, with ``c = clip_ratio`` (1 by default), and
``q = s * clip(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)``: ``2^b - 1`` levels, a data-dependent codebook.

Fixed step (``step=h``): ``q = h * round(w / h)``, no calibration and no clipping: the codebook does not depend on
the data nor on ``n`` (the "fixed quantizer" of theory.md section 4); :func:`size_adaptive` gives the step
``h_n = h0 (n / n0)^-alpha`` of the size-adaptive regime.

Stochastic rounding rounds ``x = w / s`` up with probability ``frac(x)``, so ``E[q(w)] = w`` inside the clip range.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax.quantizers._base import LadderQuantizer, check_scale_format, format_name, safe_positive

Array = jax.Array

GRANULARITIES = ("tensor", "channel", "group")
ROUNDINGS = ("nearest", "stochastic")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _as_columns(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(M, C)``: a leaf viewed as rows of output channels (last axis) when ``ndim >= 2``, else one column."""
    if len(shape) >= 2:
        return math.prod(shape[:-1]), shape[-1]
    return math.prod(shape), 1


def group_blocks(a: Array, group_size: int) -> Array:
    """``(G, C)`` maxima of ``a`` over blocks of ``group_size`` consecutive rows of each output channel.

    ``a`` (any shape) is viewed as ``(M, C)`` (see :func:`_as_columns`): for a Flax ``(in, out)`` kernel the blocks
    run along axis 0, the contraction axis; a 1-D leaf is one column. Rows are zero-padded to a multiple of
    ``group_size`` (zeros do not change a maximum of magnitudes), so the last block may be short.
    """
    m, c = _as_columns(a.shape)
    a2 = a.reshape(m, c)
    pad = (-m) % group_size
    a2 = jnp.pad(a2, ((0, pad), (0, 0)))
    return a2.reshape(-1, group_size, c).max(axis=1)


def group_expand(blocks: Array, shape: tuple[int, ...], group_size: int) -> Array:
    """Broadcast ``(G, C)`` per-block values back to ``shape`` (the inverse view of :func:`group_blocks`)."""
    m, _ = _as_columns(shape)
    return jnp.repeat(blocks, group_size, axis=0)[:m].reshape(shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uniform(LadderQuantizer):
    """Uniform grid quantizer (absmax integer grid or fixed step); build it with :func:`uniform`.

    Straight-through rule: identity inside the clip range ``|w| <= clip_ratio * absmax`` of the tensor / channel /
    group, zero outside. With the default ``clip_ratio = 1`` nothing is clipped and the gradient is the identity
    everywhere; a fixed-step grid never clips (identity everywhere).

    Attributes:
      bits: ``b`` in 2..16 for the absmax grid, or None for a fixed step.
      step: the fixed step ``h > 0``, or None for the absmax grid.
      granularity: ``"tensor"``, ``"channel"`` (last axis of leaves with ``ndim >= 2``) or ``"group"``.
      rounding: ``"nearest"`` (half to even) or ``"stochastic"``.
      group_size: rows per group when ``granularity == "group"``.
      clip_ratio: fraction of the absmax used as the clip value, in ``(0, 1]``.
      scale_format: how the absmax scale is published (theory.md section 9): ``"f32"`` (``s = c max|w| / qmax``,
        continuous), ``"bf16"`` / ``"f16"`` (that value rounded to the format) or ``"e8m0"`` (the OCP Microscaling
        shared exponent ``s = 2^(floor(log2(c max|w|)) - floor(log2 qmax))``, elements ``round(w / s)``
        saturating at ``+-qmax``). Fixed-step grids publish no scale and keep ``"f32"``.
    """

    bits: int | None = None
    step: float | None = None
    granularity: str = "tensor"
    rounding: str = "nearest"
    group_size: int | None = None
    clip_ratio: float = 1.0
    scale_format: str = "f32"

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.step is None):
            raise ValueError(
                f"give exactly one of `bits` (absmax grid) and `step` (fixed grid), got bits={self.bits!r}, "
                f"step={self.step!r}"
            )
        if self.bits is not None:
            if not _is_int(self.bits):
                raise ValueError(f"`bits` must be an integer in 2..16, got {self.bits!r}")
            if self.bits == 1:
                raise ValueError("`bits` must be in 2..16, got 1: for a 1-bit quantizer use sign()")
            if not 2 <= self.bits <= 16:
                raise ValueError(f"`bits` must be an integer in 2..16, got {self.bits!r}")
        else:
            if not _is_real(self.step) or not math.isfinite(self.step) or self.step <= 0:
                raise ValueError(f"`step` must be a finite number > 0, got {self.step!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"`rounding` must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.granularity == "group":
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(f"`group_size` must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"`group_size` is only used with granularity='group', got group_size={self.group_size!r} with "
                f"granularity={self.granularity!r}"
            )
        if not _is_real(self.clip_ratio) or not (0.0 < self.clip_ratio <= 1.0):
            raise ValueError(f"`clip_ratio` must lie in (0, 1], got {self.clip_ratio!r}")
        check_scale_format(self.scale_format)
        if self.step is not None and (
            self.granularity != "tensor" or self.clip_ratio != 1.0 or self.scale_format != "f32"
        ):
            bad = next(
                f
                for f, default in (("granularity", "tensor"), ("clip_ratio", 1.0), ("scale_format", "f32"))
                if getattr(self, f) != default
            )
            raise ValueError(
                f"a fixed-step grid has no scale to calibrate: `{bad}` must keep its default, got "
                f"{bad}={getattr(self, bad)!r}"
            )

    @property
    def family(self) -> str:
        return "uniform"

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    @property
    def qmax(self) -> int | None:
        """Largest integer code ``2^(b-1) - 1`` of the absmax grid (None for a fixed step)."""
        return None if self.bits is None else 2 ** (self.bits - 1) - 1

    @property
    def scale_rule(self) -> str | None:
        return None if self.bits is None else "absmax"

    # -- codebook ----------------------------------------------------------------------------------------------

    def _absmax(self, a: Array) -> Array:
        """Per-block maxima of ``a`` (scalar per tensor, ``(1, ..., C)`` per channel, ``(G, C)`` per group)."""
        if self.granularity == "group":
            return group_blocks(a, self.group_size)
        if self.granularity == "channel" and a.ndim >= 2:
            return jnp.max(a, axis=tuple(range(a.ndim - 1)), keepdims=True)
        return jnp.max(a)

    def _expand(self, blocks: Array, w: Array) -> Array:
        if self.granularity == "group":
            return group_expand(blocks, w.shape, self.group_size)
        return blocks

    def _scale_stat(self, w: Array) -> Array:
        clip = self._absmax(jnp.abs(w))
        if self.clip_ratio != 1.0:
            clip = self.clip_ratio * clip
        return clip

    def _codebook(self, w: Array) -> tuple[Array, ...]:
        if self.step is not None:
            h = jnp.asarray(self.step, w.dtype)
            return h, h, jnp.asarray(jnp.inf, w.dtype)
        scale = self._scale(w)
        if self.scale_format == "f32":
            clip = self._expand(self._scale_stat(w), w)
        else:  # the elements saturate at +-qmax s
            clip = self.qmax * scale
        return scale, safe_positive(scale), clip

    def _index_range(self, cb: tuple[Array, ...]) -> tuple[float, float]:
        if self.step is not None:
            return -math.inf, math.inf
        return -float(self.qmax), float(self.qmax)

    def _nearest(self, cb: tuple[Array, ...], x: Array) -> Array:
        i_min, i_max = self._index_range(cb)
        return jnp.clip(jnp.round(x / cb[1]), i_min, i_max)

    def _release_index(self, cb: tuple[Array, ...], w: Array, key: Array | None) -> Array:
        if self.rounding == "nearest":
            return self._nearest(cb, w)
        x = w / cb[1]
        floor = jnp.floor(x)
        u = jax.random.uniform(key, w.shape, dtype=w.dtype)
        i_min, i_max = self._index_range(cb)
        return jnp.clip(floor + (u < x - floor).astype(w.dtype), i_min, i_max)

    def _decode(self, cb: tuple[Array, ...], i: Array) -> Array:
        return cb[0] * i

    def _ste_mask(self, cb: tuple[Array, ...], w: Array) -> Array:
        return jnp.abs(w) <= cb[2]


def uniform(
    *,
    bits: int | None = None,
    step: float | None = None,
    granularity: str = "tensor",
    rounding: str = "nearest",
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    scale_format: str = "f32",
    name: str | None = None,
) -> Uniform:
    """A uniform quantizer: symmetric absmax integer grid (``bits``) or fixed-step grid (``step``).

    Absmax: ``s = clip_ratio * max|w| / (2^(b-1) - 1)`` per tensor / output channel / group,
    ``q = s * clip(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)``. Fixed step: ``q = h * round(w / h)``, unclipped
    (theory.md section 4, "fixed quantizer"). Round-to-nearest thresholds are ``value -/+ s/2`` (section 3(b)),
    none below the lowest / above the top absmax level; their gradient flows through ``max|w|``. Stochastic
    rounding rounds up with probability ``frac(w / s)`` (unbiased inside the clip range) and needs a key; its
    ``thresholds`` are those of the round-to-nearest grid. Straight-through: identity for ``|w| <= clip value``
    (everything unless ``clip_ratio < 1``), zero beyond; fixed step: identity everywhere.

    Args:
      bits: number of bits ``b`` in 2..16 (for 1 bit use :func:`sign`); exclusive with ``step``.
      step: fixed grid step ``h > 0`` (finite); exclusive with ``bits``.
      granularity: ``"tensor"`` (one scale), ``"channel"`` (one per last-axis entry of leaves with ``ndim >= 2``;
        1-D and scalar leaves use one scale) or ``"group"`` (set implicitly by ``group_size``).
      rounding: ``"nearest"`` (half to even) or ``"stochastic"``.
      group_size: scales per group of ``group_size`` consecutive rows of each output channel (the tensor viewed as
        ``(prod(shape[:-1]), shape[-1])``; 1-D leaves as one column), a ragged last group allowed.
      clip_ratio: clip value as a fraction of the absmax, in ``(0, 1]`` (absmax grids only).
      scale_format: ``"f32"`` (default, a continuous scale), ``"bf16"``, ``"f16"`` or ``"e8m0"`` (absmax rule
        of theory.md section 9: the OCP Microscaling shared exponent, elements saturating at ``+-qmax``).
      name: report name; by default ``int{b}`` with ``_channel`` / ``_g{size}`` / ``_clip{c}`` / ``_stochastic``
        suffixes and ``@{scale_format}`` when not ``"f32"``, or ``grid_{h}`` for a fixed step.

    Returns:
      A :class:`Uniform` quantizer.

    >>> import jax.numpy as jnp
    >>> q = uniform(bits=2)
    >>> q(jnp.array([-2.0, 0.4, 1.2, 0.6])).tolist()
    [-2.0, 0.0, 2.0, 0.0]
    >>> uniform(step=0.5)(jnp.array([0.2, 0.8, -1.3])).tolist()
    [0.0, 1.0, -1.5]
    >>> uniform(bits=4, scale_format="e8m0")(jnp.array([0.5, -1.3, 0.2, 0.9])).tolist()  # s = 2^(0 - 2)
    [0.5, -1.25, 0.25, 1.0]
    """
    if group_size is not None and granularity == "tensor":
        granularity = "group"
    if granularity == "group" and group_size is None:
        raise ValueError("`group_size` is required with granularity='group', got group_size=None")
    if _is_real(step):
        step = float(step)
    if _is_real(clip_ratio):
        clip_ratio = float(clip_ratio)
    if _is_int(bits):
        bits = int(bits)
    if _is_int(group_size):
        group_size = int(group_size)
    if name is None:
        name = format_name(_default_name(bits, step, granularity, rounding, group_size, clip_ratio), scale_format)
    return Uniform(
        name=name,
        bits=bits,
        step=step,
        granularity=granularity,
        rounding=rounding,
        group_size=group_size,
        clip_ratio=clip_ratio,
        scale_format=scale_format,
    )


def _default_name(bits, step, granularity, rounding, group_size, clip_ratio) -> str:
    name = f"int{bits}" if bits is not None else f"grid_{step:g}" if _is_real(step) else "uniform"
    if granularity == "channel":
        name += "_channel"
    elif granularity == "group":
        name += f"_g{group_size}"
    if _is_real(clip_ratio) and clip_ratio != 1.0:
        name += f"_clip{clip_ratio:g}"
    if rounding == "stochastic":
        name += "_stochastic"
    return name


def size_adaptive(n: int, *, h0: float, n0: float, alpha: float, rounding: str = "nearest") -> Uniform:
    """The size-adaptive fixed grid ``uniform(step=h0 * (n / n0) ** -alpha)`` (theory.md section 4).

    With ``0 < alpha < 1/2`` the indicator ``r_Q^n -> 0`` but ``n r_Q^n -> infinity``; ``alpha = 0`` is the fixed
    grid of step ``h0``.

    Args:
      n: training-set size (> 0).
      h0: step at the reference size ``n0`` (> 0).
      n0: reference size (> 0).
      alpha: shrink exponent (>= 0).
      rounding: ``"nearest"`` or ``"stochastic"``.

    Returns:
      A fixed-step :class:`Uniform` quantizer.

    >>> size_adaptive(400, h0=1.0, n0=100, alpha=0.25).step
    0.7071067811865476
    """
    for arg, value, lowest in (("n", n, 0.0), ("h0", h0, 0.0), ("n0", n0, 0.0)):
        if not _is_real(value) or not math.isfinite(value) or value <= lowest:
            raise ValueError(f"`{arg}` must be a finite number > 0, got {value!r}")
    if not _is_real(alpha) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"`alpha` must be a finite number >= 0, got {alpha!r}")
    return uniform(step=float(h0) * (float(n) / float(n0)) ** (-float(alpha)), rounding=rounding)
