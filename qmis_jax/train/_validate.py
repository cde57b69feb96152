"""Boundary checks of the replicate engine: clear ``ValueError`` s before anything is traced or compiled."""

from __future__ import annotations

import math

import numpy as np

from qmis_jax._checks import check_data, check_fits_model, check_key
from qmis_jax._checks import positive_int as check_positive_int
from qmis_jax.problems._base import Problem

__all__ = [
    "check_data",
    "check_fits_model",
    "check_key",
    "check_positive_int",
    "check_problem",
    "check_tol",
    "check_weights",
]


def check_problem(problem) -> None:
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a qmis_jax.problems.Problem, got {type(problem).__name__}")


def check_tol(tol) -> float:
    try:
        t = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number, got {tol!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    return t


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
