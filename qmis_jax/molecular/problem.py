"""A :class:`~qmis_jax.problems._base.Problem` on featurized molecules: linear (GLM) or one-hidden-layer MLP head.

The data law ``P`` of theory.md section 1 is the EMPIRICAL law of the training pool: ``sample(key, n)`` draws ``n``
molecules uniformly with replacement from it. Members and non-members of the membership game are then both draws
from that finite pool, so the game is the textbook one on the pool's empirical distribution.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..problems._base import Problem
from .data import MolecularData

__all__ = ["DEFAULT_L2", "molecular_problem"]

_HEADS = ("linear", "mlp")
_ACTIVATIONS = {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "relu": jax.nn.relu}
#: Default ridge strength per head. The linear head's 1e-2 makes the ERM unique: with ~1000 fingerprint features
#: and ~1000 molecules the unpenalised least-squares fit is not unique and binary data are separable (no MLE).
DEFAULT_L2 = {"linear": 1e-2, "mlp": 1e-4}


def _margin_loss(task: str):
    if task == "binary":

        def margin_loss(eta, y):
            """Logistic loss ``log(1 + exp(eta)) - y eta``."""
            return jax.nn.softplus(eta) - y * eta

    else:

        def margin_loss(eta, y):
            """Squared loss ``(eta - y)^2 / 2``."""
            return 0.5 * (eta - y) ** 2

    return margin_loss


def molecular_problem(
    data: MolecularData,
    *,
    head: str = "linear",
    hidden: int = 32,
    l2: float | None = None,
    activation: str = "tanh",
) -> Problem:
    """Build the :class:`Problem` of one prepared molecular dataset.

    Per-example loss (theory.md section 1; the training objective is its weighted mean):
    ``l(theta, (x, y)) = m(eta(theta, x), y) + (l2 / 2) ||W||^2`` with ``m(eta, y) = (eta - y)^2 / 2``
    (regression, standardized targets) or ``log(1 + e^eta) - y eta`` (binary), and ``W`` every weight matrix
    (biases are not penalised). The penalty is the same for every example, so the sandwich of section 2 and the
    loss differences of section 3 apply unchanged.

    * ``head="linear"``: params ``{"b": (1,), "w": (f, 1)}``, ``eta = b + x @ w``; convex. It also carries the
      GLM structure ``design(x) = [1, x]`` (ravel order of the params: ``b`` then ``w``), ``margin_loss`` and,
      with ``l2 > 0``, the ridge ``penalty`` ``(0, l2, ..., l2)``, which the statistics' fast paths use.
      For regression, ``solve`` is the closed-form weighted ridge fit.
    * ``head="mlp"``: params ``{"b1": (h,), "b2": (1,), "w1": (f, h), "w2": (h, 1)}``,
      ``eta = b2 + act(x @ w1 + b1) @ w2``; non-convex (share one initialisation across replicates, theory.md
      section 8). ``init`` draws LeCun-normal weights and zero biases.

    ``sample(key, n)`` draws ``n`` indices uniformly with replacement from the training pool (the empirical law);
    ``predict`` gives ``eta`` (regression, standardized units) or ``sigmoid(eta)`` (binary).

    Args:
      data: output of :func:`qmis_jax.molecular.prepare`.
      head: ``"linear"`` or ``"mlp"``.
      hidden: MLP width ``h``.
      l2: ridge strength; ``None`` -> ``DEFAULT_L2[head]`` (linear 1e-2, mlp 1e-4).
      activation: MLP activation, ``"tanh"`` (smooth: the default), ``"gelu"`` or ``"relu"``.

    Returns:
      A :class:`Problem` whose ``config`` records the head, ``l2``, the sampling law and ``data.info``.
    """
    l2 = _check_arguments(data, head=head, hidden=hidden, l2=l2, activation=activation)
    task = data.task
    x_pool = jnp.asarray(data.x_train)
    y_pool = jnp.asarray(data.y_train)
    n_pool, f = x_pool.shape
    margin_loss = _margin_loss(task)
    act = _ACTIVATIONS[activation]

    def sample(key, n):
        idx = jax.random.randint(key, (n,), 0, n_pool)
        return x_pool[idx], y_pool[idx]

    eta_fn, penalty, init = _head_functions(head, f=f, hidden=hidden, l2=l2, act=act)

    def loss(params, x_i, y_i):
        return margin_loss(eta_fn(params, x_i[None, :])[0], y_i) + penalty(params)

    if task == "binary":

        def predict(params, x):
            return jax.nn.sigmoid(eta_fn(params, x))

    else:

        def predict(params, x):
            return eta_fn(params, x)

    design = glm_margin_loss = ridge = solve = None
    if head == "linear":

        def design(x):
            x = jnp.asarray(x)
            return jnp.concatenate([jnp.ones((x.shape[0], 1), x.dtype), x], axis=1)

        glm_margin_loss = margin_loss
        ridge = jnp.concatenate([jnp.zeros((1,)), jnp.full((f,), l2)]) if l2 > 0 else None

    if head == "linear" and task == "regression":
        solve = _ridge_solve(f, l2)

    config = {
        "head": head,
        "l2": l2,
        "penalty": "(l2 / 2) * sum of squared weights (biases unpenalised), added to every example's loss",
        "loss": "logistic" if task == "binary" else "squared / 2 on standardized targets",
        "sampling": "n draws uniformly with replacement from the training pool (its empirical law)",
        "n_pool": int(n_pool),
        "n_features": int(f),
        "data": data.info,
    }
    if head == "mlp":
        config.update(hidden=int(hidden), activation=activation, init="LeCun normal weights, zero biases")
    dataset = data.info.get("dataset", {}).get("name", "molecular")
    return Problem(
        name=f"molecular_{head}",
        sample=sample,
        init=init,
        loss=loss,
        predict=predict,
        task=task,
        convex=head == "linear",
        config={"dataset": dataset, "featurizer": data.info.get("featurizer"), **config},
        solve=solve,
        design=design,
        margin_loss=glm_margin_loss,
        penalty=ridge,
        population=None,
    )


def _check_arguments(data, *, head: str, hidden, l2, activation: str) -> float:
    """Check the arguments of :func:`molecular_problem`; return the ridge strength with its default filled in."""
    if not isinstance(data, MolecularData):
        raise ValueError(f"data: expected a MolecularData from prepare(), got {type(data).__name__}")
    if head not in _HEADS:
        raise ValueError(f"head: must be one of {_HEADS}, got {head!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int | np.integer) or hidden < 1:
        raise ValueError(f"hidden: must be a positive integer, got {hidden!r}")
    if l2 is None:
        l2 = DEFAULT_L2[head]
    if isinstance(l2, bool) or not isinstance(l2, int | float) or not math.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2: must be a finite number >= 0, got {l2!r}")
    l2 = float(l2)
    if data.task not in ("regression", "binary"):
        raise ValueError(f"data: task must be 'regression' or 'binary', got {data.task!r}")
    return l2


def _head_functions(head: str, *, f: int, hidden: int, l2: float, act):
    """``(eta_fn, penalty, init)`` of the linear or MLP head (see :func:`molecular_problem`)."""
    if head == "linear":

        def eta_fn(params, x):
            return x @ params["w"][:, 0] + params["b"][0]

        def penalty(params):
            return 0.5 * l2 * jnp.sum(params["w"] ** 2)

        def init(key):
            del key  # convex: the starting point does not matter
            return {"b": jnp.zeros((1,)), "w": jnp.zeros((f, 1))}

    else:

        def eta_fn(params, x):
            bias = params["b1"].reshape((1,) * (x.ndim - 1) + (-1,))  # over the rows of a batch, explicitly
            h = act(x @ params["w1"] + bias)
            return h @ params["w2"][:, 0] + params["b2"][0]

        def penalty(params):
            return 0.5 * l2 * (jnp.sum(params["w1"] ** 2) + jnp.sum(params["w2"] ** 2))

        def init(key):
            k1, k2 = jax.random.split(key)
            return {
                "b1": jnp.zeros((hidden,)),
                "b2": jnp.zeros((1,)),
                "w1": jax.random.normal(k1, (f, hidden)) / math.sqrt(f),
                "w2": jax.random.normal(k2, (hidden, 1)) / math.sqrt(hidden),
            }

    return eta_fn, penalty, init


def _ridge_solve(f: int, l2: float):
    """The closed-form weighted ridge fit of the linear regression head."""

    def solve(x, y, w):
        """Weighted ridge: minimise ``sum_i w_i l_i / sum_i w_i`` in closed form (minimum-norm if l2 = 0)."""
        z = jnp.concatenate([jnp.ones((x.shape[0], 1), x.dtype), x], axis=1)
        wsum = jnp.sum(w)
        a = (z * w[:, None]).T @ z / wsum
        rhs = (z * w[:, None]).T @ y / wsum
        pen = jnp.concatenate([jnp.zeros((1,)), jnp.full((f,), l2)]).astype(a.dtype)
        a = a + jnp.diag(pen)
        theta = jnp.linalg.solve(a, rhs) if l2 > 0 else jnp.linalg.pinv(a, hermitian=True) @ rhs
        return {"b": theta[:1], "w": theta[1:, None]}

    return solve
