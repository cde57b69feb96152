"""Argument checks at the public edge: one place for the errors that name a bad argument."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``int(value)`` when it is an integer ``>= minimum`` (or None when allowed), else a ValueError naming it.

    >>> positive_int("replicates", 8)
    8
    >>> positive_int("n", 0)
    Traceback (most recent call last):
    ...
    ValueError: n must be a positive integer, got 0
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``, else a ValueError naming the argument and the choices.

    >>> one_of("ptq", "rtn", ("loss", "rtn"))
    'rtn'
    """
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")
    return value


def check_key(key) -> None:
    """One PRNG key (a typed key, or a raw ``uint32[2]``), else a ValueError."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0
    raw = key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or raw):
        raise ValueError(f"key must be one PRNG key (jax.random.key(seed)), got dtype {key.dtype} shape {key.shape}")


def check_data(problem, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of ``x (N, dx)`` and ``y (N,)``, checked: shapes, finiteness, binary labels."""
    xh, yh = np.asarray(x), np.asarray(y)
    for name, arr in (("x", xh), ("y", yh)):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
            raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if xh.ndim != 2 or xh.shape[0] == 0:
        raise ValueError(f"x must have shape (N, dx) with N >= 1, got {xh.shape}")
    if yh.shape != (xh.shape[0],):
        raise ValueError(f"y must have shape ({xh.shape[0]},) to match x, got {yh.shape}")
    if not np.all(np.isfinite(xh)):
        bad = np.argwhere(~np.isfinite(xh))[0]
        raise ValueError(f"x must be finite, got {xh[tuple(bad)]} at index {tuple(bad.tolist())}")
    if not np.all(np.isfinite(yh)):
        bad = int(np.argwhere(~np.isfinite(yh))[0, 0])
        raise ValueError(f"y must be finite, got {yh[bad]} at index {bad}")
    if problem.task == "binary":
        bad = ~((yh == 0) | (yh == 1))
        if np.any(bad):
            i = int(np.argmax(bad))
            raise ValueError(f"y must hold labels in {{0, 1}} for a binary problem, got {yh[i]} at index {i}")
    return xh, yh


def check_fits_model(problem, params, x, y) -> None:
    """Rows of ``x`` (and entries of ``y``) that the model takes: one example's loss is traced abstractly, so a
    wrong input width is a ValueError naming the shapes instead of an error from inside the traced program."""
    row = jax.ShapeDtypeStruct(tuple(np.shape(x)[1:]), jnp.asarray(x).dtype)
    target = jax.ShapeDtypeStruct((), jnp.asarray(y).dtype)
    try:
        jax.eval_shape(problem.loss, params, row, target)
    except (TypeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"x rows of shape {row.shape} do not fit the model of problem {problem.name!r} ({reason})"
        ) from None
