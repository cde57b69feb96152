"""The options every training entry point shares (:func:`fit`, :func:`fit_fresh`, :func:`fit_data`), validated once.

:func:`fit_options` checks them at the boundary, before anything is traced or compiled, and returns a
:class:`FitOptions` record with the defaults filled in (solver, step cap, optimizer, devices).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from qmis_jax.problems._base import Problem

from ._validate import check_key, check_positive_int, check_problem, check_tol

PyTree = Any

SOLVERS = ("auto", "closed_form", "glm_lbfgs", "glm_newton", "newton", "optax")
DEFAULT_NEWTON_STEPS = 100
DEFAULT_OPTAX_STEPS = 500
DEFAULT_LEARNING_RATE = 1e-2

_DEFAULT_OPTIMIZER = optax.adam(DEFAULT_LEARNING_RATE)


def default_optimizer() -> optax.GradientTransformation:
    """The optimizer of non-convex problems unless one is given: ``optax.adam(1e-2)``."""
    return _DEFAULT_OPTIMIZER


def resolve_solver(problem: Problem, solver: str) -> str:
    """The training method: closed form, GLM L-BFGS (or Newton), generic Newton (convex), optax steps (non-convex)."""
    if solver not in SOLVERS:
        raise KeyError(f"unknown solver {solver!r}; valid: {list(SOLVERS)}")
    if solver == "auto":
        if problem.solve is not None:
            return "closed_form"
        glm = problem.design is not None and problem.margin_loss is not None and problem.penalty is None
        if problem.convex and glm:
            return "glm_lbfgs"
        return "newton" if problem.convex else "optax"
    if solver == "closed_form" and problem.solve is None:
        raise ValueError(f"solver='closed_form' needs problem.solve, which {problem.name!r} does not have")
    glm = solver in ("glm_newton", "glm_lbfgs")
    if glm and (problem.design is None or problem.margin_loss is None):
        raise ValueError(f"solver={solver!r} needs problem.design and margin_loss, which {problem.name!r} lacks")
    if glm and problem.penalty is not None:
        raise ValueError(f"solver={solver!r} fits unpenalised GLMs; {problem.name!r} has a ridge penalty")
    return solver


class FitOptions(NamedTuple):
    """Validated options of one training call, defaults resolved.

    Attributes:
      solver: the resolved method (never ``"auto"``). tol: gradient-norm tolerance.
      max_steps: Newton iteration cap or number of optimizer steps (default filled in per solver).
      optimizer: the optax optimizer (default :func:`default_optimizer`).
      devices: tuple of devices to shard replicates over (default ``jax.local_devices()``).
      chunk_size, memory_budget, batch_size: positive ints or None, as given.
      shared_init: one initialisation for every replicate. init_params: a start overriding ``problem.init``.
      start: number of the first replicate (0 where the entry point has none).
      n, replicates: sizes of :func:`fit_fresh` (None for the other entry points).
    """

    solver: str
    tol: float
    max_steps: int
    optimizer: optax.GradientTransformation
    devices: tuple
    chunk_size: int | None
    memory_budget: int | None
    batch_size: int | None
    shared_init: bool
    init_params: PyTree | None
    start: int
    n: int | None
    replicates: int | None


def _check_start(start) -> int:
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got start={start!r}")
    return int(start)


TRAINING_DEFAULTS = {
    "tol": 1e-6,
    "max_steps": None,
    "chunk_size": None,
    "memory_budget": None,
    "optimizer": None,
    "batch_size": None,
    "shared_init": True,
    "init_params": None,
    "solver": "auto",
    "devices": None,
}


def fit_options(key, problem, training: Mapping[str, Any], *, start=0, n=None, replicates=None) -> FitOptions:
    """Check the training options shared by the entry points and fill in their defaults.

    Checks run in a fixed order (key; the sizes ``n`` and ``replicates`` where given; ``start``; problem, ``tol``,
    solver, ``max_steps``, ``chunk_size``, ``memory_budget``, ``batch_size``, optimizer, devices), so the first bad
    argument is the one reported, with a ``ValueError`` naming it (``KeyError`` for an unknown solver).

    Args:
      key: the PRNG key of the call. problem: the :class:`~qmis_jax.problems.Problem`.
      training: the options given (names of ``TRAINING_DEFAULTS``; the others keep their defaults).
      start: the first replicate's number. n, replicates: sizes of :func:`qmis_jax.train.fit_fresh`; None where the
        entry point has none.

    Returns:
      :class:`FitOptions`.
    """
    unknown = sorted(set(training) - set(TRAINING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid: {', '.join(TRAINING_DEFAULTS)}")
    t = {**TRAINING_DEFAULTS, **training}
    check_key(key)
    if n is not None:
        n = check_positive_int("n", n)
    if replicates is not None:
        replicates = check_positive_int("replicates", replicates)
    start = _check_start(start)
    check_problem(problem)
    t["tol"] = check_tol(t["tol"])
    t["solver"] = resolve_solver(problem, t["solver"])
    t["max_steps"] = check_positive_int("max_steps", t["max_steps"], allow_none=True)
    if t["max_steps"] is None:
        t["max_steps"] = DEFAULT_OPTAX_STEPS if t["solver"] == "optax" else DEFAULT_NEWTON_STEPS
    for name in ("chunk_size", "memory_budget", "batch_size"):
        check_positive_int(name, t[name], allow_none=True)
    if t["optimizer"] is None:
        t["optimizer"] = default_optimizer()
    elif not isinstance(t["optimizer"], optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got {type(t['optimizer']).__name__}")
    t["devices"] = tuple(jax.local_devices() if t["devices"] is None else t["devices"])
    if not t["devices"]:
        raise ValueError("devices must hold at least one device")
    t["shared_init"] = bool(t["shared_init"])
    return FitOptions(**t, start=start, n=n, replicates=replicates)
