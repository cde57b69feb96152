"""Named quantizer presets: the quantizers every study and report refers to by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qmis_jax.quantizers._base import SCALE_FORMATS, Quantizer
from qmis_jax.quantizers.binary import sign
from qmis_jax.quantizers.fp8 import fp8
from qmis_jax.quantizers.identity import identity
from qmis_jax.quantizers.mx import fp4
from qmis_jax.quantizers.prune import prune
from qmis_jax.quantizers.ternary import ternary
from qmis_jax.quantizers.uniform import uniform

_PRESETS: dict[str, Callable[[], Quantizer]] = {
    "fp32": identity,
    "int8": lambda: uniform(bits=8),
    "int4": lambda: uniform(bits=4),
    "int2": lambda: uniform(bits=2),
    "int4_channel": lambda: uniform(bits=4, granularity="channel"),
    "int4_stochastic": lambda: uniform(bits=4, rounding="stochastic"),
    "sign": sign,
    "ternary": ternary,
    "ternary_s33": lambda: ternary(sparsity=0.33),
    "ternary_s90": lambda: ternary(sparsity=0.9),
    "prune50": lambda: prune(sparsity=0.5),
    "prune90": lambda: prune(sparsity=0.9),
    "fp8_e4m3": fp8,
    "int4_g32": lambda: uniform(bits=4, group_size=32),
    "mxint8": lambda: uniform(bits=8, group_size=32, scale_format="e8m0", name="mxint8"),
    "mxfp4": fp4,
}


def names() -> tuple[str, ...]:
    """Names of the preset quantizers, in a stable order (full precision first, then coarser releases).

    >>> names()[:4]
    ('fp32', 'int8', 'int4', 'int2')
    """
    return tuple(_PRESETS)


def get(name: str | Quantizer) -> Quantizer:
    """The preset quantizer called ``name`` (a :class:`Quantizer` is returned unchanged).

    Presets: ``fp32`` identity; ``int8``/``int4``/``int2`` per-tensor absmax; ``int4_channel`` per output channel;
    ``int4_stochastic`` stochastic rounding; ``int4_g32`` groups of 32 rows; ``sign``; ``ternary`` (absmean);
    ``ternary_s33``/``ternary_s90`` sparse ternary with 33% / 90% zeros; ``prune50``/``prune90`` magnitude
    pruning; ``fp8_e4m3``; the OCP Microscaling ``mxint8`` and ``mxfp4`` (blocks of 32 along the contraction axis,
    E8M0 scales). Fixed grids are not presets: use ``uniform(step=h)``.

    A scaled preset takes a scale format after ``@`` (theory.md section 9): ``int4@e8m0``, ``sign@e8m0``,
    ``ternary_s90@e8m0``, ``int8@bf16``; the formats are ``f32`` (the bare name: a continuous release), ``bf16``,
    ``f16`` and ``e8m0``.

    Args:
      name: a preset name, optionally ``NAME@FORMAT``, or a quantizer.

    Returns:
      The quantizer; its ``name`` attribute equals ``name``.

    Raises:
      KeyError: unknown name (the message lists the valid ones).
      ValueError: an unknown scale format, or a format on a preset without a scale (``fp32``, ``prune50``...).

    >>> get("ternary_s90").sparsity
    0.9
    >>> q = get("int4@e8m0")
    >>> q.name, q.scale_format
    ('int4@e8m0', 'e8m0')
    """
    if isinstance(name, Quantizer):
        return name
    if not isinstance(name, str):
        raise ValueError(f"`name` must be a preset name (str) or a Quantizer, got {name!r}")
    base, sep, fmt = name.partition("@")
    try:
        factory = _PRESETS[base]
    except KeyError:
        raise KeyError(
            f"unknown quantizer {name!r}; valid names: {', '.join(_PRESETS)} (scaled ones take @FORMAT, "
            f"FORMAT in {', '.join(SCALE_FORMATS)})"
        ) from None
    q = factory()
    if not sep:
        return q
    if fmt not in SCALE_FORMATS:
        raise ValueError(f"scale format of `name` {name!r} must be one of {SCALE_FORMATS}, got {fmt!r}")
    if not q.scaled:
        raise ValueError(f"`name` {name!r}: quantizer {base!r} publishes no scale, so it takes no scale format")
    return dataclasses.replace(q, name=name, scale_format=fmt)
