"""The engine's result record."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class FitResult(NamedTuple):
    """Trained replicates.

    Attributes:
      params: the parameter pytree with a leading replicate axis ``R`` on every leaf.
      grad_norm: ``(R,)`` Euclidean norm of the gradient of each replicate's weighted empirical risk at the end.
      converged: ``(R,)`` bool, ``grad_norm <= tol``. For non-convex problems (fixed number of steps) it is
        informative only.
      steps: ``(R,)`` int, Newton iterations (convex), optimizer steps (non-convex), 0 for closed forms.
    """

    params: Any
    grad_norm: jax.Array
    converged: jax.Array
    steps: jax.Array
