"""Build a :class:`Problem` from a user's own model: a pure apply function or a Flax NNX module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from ._base import Problem
from ._mixture import logistic_margin_loss
from ._nnx import pure_module

Array = jax.Array

_LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    "logistic": logistic_margin_loss,
    "squared": lambda out, y: 0.5 * (out - y) ** 2,
}


def _scalar_output(out: Array) -> Array:
    return out[..., 0] if out.ndim >= 1 and out.shape[-1] == 1 else out


def custom(
    *,
    name: str,
    loss: str | Callable[[Array, Array], Array],
    sample: Callable[[Array, int], tuple[Array, Array]],
    task: str,
    convex: bool,
    apply_fn: Callable[[Any, Array], Array] | None = None,
    init: Callable[[Array], Any] | None = None,
    module: nnx.Module | Callable[[nnx.Rngs], nnx.Module] | None = None,
    predict: Callable[[Any, Array], Array] | None = None,
    config: Mapping[str, Any] | None = None,
    solve: Callable[[Array, Array, Array], Any] | None = None,
    design: Callable[[Array], Array] | None = None,
    margin_loss: Callable[[Array, Array], Array] | None = None,
    population: Callable[[Array], Any] | None = None,
) -> Problem:
    """A :class:`Problem` for your own model and data, trained and audited like the built-in ones.

    The model is given either as a pure function or as a Flax NNX module:

    * ``apply_fn(params, x) -> outputs`` applied to a batch ``x (n, dx)`` (or one example ``(dx,)``), with
      ``init(key) -> params`` a pytree of arrays; or
    * ``module``: an ``nnx.Module`` instance, or a factory ``module(rngs: nnx.Rngs) -> nnx.Module``. It is split
      with ``nnx.split`` into a pure apply over a plain nested dict of its ``nnx.Param`` arrays (other state is
      frozen). With a factory, ``init(key)`` builds a fresh module from ``nnx.Rngs(params=key)``; with an
      instance, ``init`` returns its current parameters whatever the key (so every replicate starts there).

    The per-example loss is ``loss(output, y_i)`` on the model's scalar output for one example (a trailing axis of
    size 1 is squeezed): ``"logistic"`` (``softplus(-(2y - 1) out)``, ``out`` a logit, labels in {0, 1}),
    ``"squared"`` (``(out - y)^2 / 2``) or your own callable. The training objective is its (weighted) mean, the
    ERM of theory.md section 1. ``predict`` defaults to ``sigmoid(output)`` for ``task="binary"`` and to the
    output for ``"regression"``.

    Args:
      name: identifier used in reports.
      loss: ``"logistic"``, ``"squared"`` or ``loss(output, y_i) -> scalar``.
      sample: ``sample(key, n) -> (x (n, dx), y (n,))``, i.i.d. draws from your data law.
      task: ``"binary"`` or ``"regression"``.
      convex: whether the empirical risk is convex in the parameters (then trained to a gradient tolerance by
        Newton's method; else with a fixed number of optimizer steps from a shared initialisation).
      apply_fn, init: the pure-function model (both required together, exclusive with ``module``).
      module: an NNX module or module factory (exclusive with ``apply_fn``).
      predict: optional ``predict(params, x) -> (n,)``.
      config: JSON-serialisable description for reports.
      solve, design, margin_loss, population: optional, see :class:`Problem`.

    Returns:
      The :class:`Problem`.

    >>> import jax, jax.numpy as jnp
    >>> p = custom(name="probit_free", loss="logistic", task="binary", convex=True,
    ...            apply_fn=lambda p, x: x @ p["w"], init=lambda k: {"w": jnp.zeros(2)},
    ...            sample=lambda k, n: (jax.random.normal(k, (n, 2)), jnp.zeros(n)))
    >>> round(float(p.loss(p.init(None), jnp.ones(2), 0.0)), 6)  # log 2
    0.693147
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if task not in ("binary", "regression"):
        raise ValueError(f"task must be 'binary' or 'regression', got {task!r}")
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise KeyError(f"unknown loss {loss!r}; valid: {sorted(_LOSSES)}")
        out_loss = _LOSSES[loss]
    elif callable(loss):
        out_loss = loss
    else:
        raise ValueError(f"loss must be a name or a callable, got {loss!r}")
    if (apply_fn is None) == (module is None):
        raise ValueError("give exactly one of apply_fn (with init) and module")
    if apply_fn is not None:
        if init is None:
            raise ValueError("init is required with apply_fn")
        apply, init_fn = apply_fn, init
    else:
        if isinstance(module, nnx.Module):
            apply, params0 = pure_module(module)
            init_fn = init if init is not None else (lambda key: params0)
        elif callable(module):
            apply, _ = pure_module(module(nnx.Rngs(0)))
            init_fn = init if init is not None else (lambda key: pure_module(module(nnx.Rngs(params=key)))[1])
        else:
            raise ValueError(f"module must be an nnx.Module or a factory of one, got {module!r}")

    def loss_fn(params, x_i: Array, y_i: Array) -> Array:
        return out_loss(_scalar_output(apply(params, x_i)), y_i)

    if predict is None:
        if task == "binary":

            def predict(params, x):
                return jax.nn.sigmoid(_scalar_output(apply(params, x)))

        else:

            def predict(params, x):
                return _scalar_output(apply(params, x))

    return Problem(
        name=name,
        sample=sample,
        init=init_fn,
        loss=loss_fn,
        predict=predict,
        task=task,
        convex=bool(convex),
        config=dict(config or {}),
        solve=solve,
        design=design,
        margin_loss=margin_loss,
        population=population,
    )
