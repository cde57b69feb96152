"""Learning problems: a data law, a model and its per-example loss (the :class:`Problem` record).

Built-in problems: :func:`gaussian_mean` (closed form, the exact check of theory.md section 5),
:func:`logistic_mixture` and :func:`linear_regression` (convex generalised linear models), :func:`mlp_mixture`
(a Flax NNX MLP, non-convex); :func:`custom` wraps a user's own apply function or NNX module.
"""

from ._base import Problem, utility
from .custom import custom
from .gaussian import gaussian_mean
from .linear import linear_regression
from .logistic import logistic_mixture
from .mlp import MLP, mlp_mixture

__all__ = [
    "MLP",
    "Problem",
    "custom",
    "gaussian_mean",
    "linear_regression",
    "logistic_mixture",
    "mlp_mixture",
    "utility",
]
