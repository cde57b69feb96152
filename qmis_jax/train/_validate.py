"""Boundary checks of the replicate engine: clear ``ValueError`` s before anything is traced or compiled."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax.problems._base import Problem


def check_problem(problem) -> None:
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a qmis_jax.problems.Problem, got {type(problem).__name__}")


def check_key(key) -> None:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0
    raw = key.dtype == jnp.uint32 and key.shape == (2,)
    if not (typed or raw):
        raise ValueError(f"key must be one PRNG key (jax.random.key(seed)), got dtype {key.dtype} shape {key.shape}")


def check_positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_tol(tol) -> float:
    try:
        t = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number, got {tol!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    return t


def check_data(problem: Problem, x, y) -> tuple[np.ndarray, np.ndarray]:
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


def check_fits_model(problem: Problem, params, x, y) -> None:
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


def check_weights(weights, n_pool: int) -> np.ndarray:
    """Host copy of membership ``weights (R, N)``: finite, non-negative, every row with a positive sum."""
    wh = np.asarray(weights)
    if wh.ndim != 2 or wh.shape[1] != n_pool or wh.shape[0] == 0:
        raise ValueError(f"weights must have shape (R, {n_pool}) with R >= 1 (one row per replicate), got {wh.shape}")
    if not np.all(np.isfinite(wh)):
        bad = np.argwhere(~np.isfinite(wh))[0]
        raise ValueError(f"weights must be finite, got {wh[tuple(bad)]} at index {tuple(bad.tolist())}")
    if np.any(wh < 0):
        bad = np.argwhere(wh < 0)[0]
        raise ValueError(f"weights must be non-negative, got {wh[tuple(bad)]} at index {tuple(bad.tolist())}")
    zero = ~np.any(wh > 0, axis=1)
    if np.any(zero):
        raise ValueError(f"weights has an all-zero row (replicate {int(np.argmax(zero))} trains on no data)")
    return wh
