"""Argument checks shared by the problem constructors."""

from __future__ import annotations

import math

from qmis_jax._checks import positive_int

__all__ = ["finite", "positive_int"]


def finite(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite float (optionally > 0 or >= 0), else ``ValueError`` naming ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (positive and v <= 0) or (nonnegative and v < 0):
        kind = "positive finite" if positive else "non-negative finite" if nonnegative else "finite"
        raise ValueError(f"{name} must be a {kind} number, got {value!r}")
    return v
