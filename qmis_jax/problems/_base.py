"""The `Problem` record: a data law, a model and its per-example loss.

Every estimator of qmis_jax is written against this record, so a user's own model plugs in by building one
(see :func:`qmis_jax.problems.custom`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A learning problem: data sampler, parameter init, per-example loss and utility.

    Attributes:
      name: short identifier used in reports (``"gaussian_mean"``, ``"logistic_mixture"``...).
      sample: ``sample(key, n) -> (x, y)`` draws ``n`` i.i.d. examples; ``x`` is ``(n, dx)`` float, ``y`` is
        ``(n,)`` (float targets, or 0/1 labels for binary problems). Replicate ``i`` of a fresh-data design draws
        ``sample(jax.random.fold_in(k_data, i), n)``, ``k_data`` a subkey used for data only
        (:func:`qmis_jax.train.fit_fresh`).
      init: ``init(key) -> params`` a parameter pytree for one model.
      loss: ``loss(params, x_i, y_i) -> scalar`` the loss of ONE example (``x_i`` is ``(dx,)``, ``y_i`` a scalar).
        The training objective is the (weighted) mean of it (theory.md section 1).
      predict: ``predict(params, x) -> (n,)`` batched prediction: the mean for regression, P(y = 1) for binary.
      task: ``"regression"`` or ``"binary"``.
      convex: whether the empirical risk is convex in ``params`` (trained to a gradient-norm tolerance), else trained
        with a fixed number of optimizer steps.
      config: JSON-serialisable description (goes into the report's ``"problem"`` entry).
      solve: optional closed-form weighted ERM, ``solve(x, y, w) -> params`` (``w`` is ``(n,)`` weights).
      design: optional, for generalised linear models: ``design(x) -> (n, p)`` with
        ``margin(params, x) = design(x) @ ravel_pytree(params)[0]``; lets statistics compute the loss of many
        one-coordinate moves in O(1) per (move, example) instead of one forward pass each.
      margin_loss: optional, with ``design``: ``margin_loss(eta, y) -> loss`` elementwise, so that
        ``loss(params, x_i, y_i) == margin_loss(design(x_i[None])[0] @ theta, y_i)``.
      penalty: optional, with ``design``: ``(p,)`` ridge weights ``lambda`` (ravel order) when the loss carries a
        ridge term, ``loss(params, x_i, y_i) == margin_loss(eta_i, y_i) + sum_j lambda_j theta_j^2 / 2``.
      population: optional ``population(key) -> params`` the population optimum theta* when it is known in closed
        form (Gaussian mean: ``mu``); otherwise estimated from replicates.
    """

    name: str
    sample: Callable[[Array, int], tuple[Array, Array]]
    init: Callable[[Array], PyTree]
    loss: Callable[[PyTree, Array, Array], Array]
    predict: Callable[[PyTree, Array], Array]
    task: str
    convex: bool
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    solve: Callable[[Array, Array, Array], PyTree] | None = None
    design: Callable[[Array], Array] | None = None
    margin_loss: Callable[[Array, Array], Array] | None = None
    penalty: Array | None = None
    population: Callable[[Array], PyTree] | None = None

    def batch_loss(self, params: PyTree, x: Array, y: Array) -> Array:
        """Per-example losses ``(n,)`` of one model on ``n`` examples."""
        return jax.vmap(self.loss, in_axes=(None, 0, 0))(params, x, y)

    def info(self) -> dict[str, Any]:
        """JSON-serialisable description for reports."""
        return {"name": self.name, "task": self.task, "convex": self.convex, **dict(self.config)}


def utility(problem: Problem, params: PyTree, x: Array, y: Array) -> dict[str, Array]:
    """Utility of one model on held-out data: mean loss, and accuracy (binary) or RMSE (regression).

    Args:
      problem: the problem whose ``loss`` and ``predict`` are used.
      params: one model's parameters (no replicate axis; ``vmap`` this function for a stack).
      x: ``(n, dx)`` inputs. y: ``(n,)`` targets.

    Returns:
      ``{"loss": scalar, "accuracy": scalar}`` for binary tasks, ``{"loss": scalar, "rmse": scalar}`` otherwise.
    """
    import jax.numpy as jnp

    out = {"loss": jnp.mean(problem.batch_loss(params, x, y))}
    pred = problem.predict(params, x)
    if problem.task == "binary":
        out["accuracy"] = jnp.mean((pred > 0.5) == (y > 0.5))
    else:
        out["rmse"] = jnp.sqrt(jnp.mean((pred - y) ** 2))
    return out
