"""Turn a Flax NNX module into a pure ``apply(params, x)`` over a plain pytree of its ``nnx.Param`` arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

Array = jax.Array


def pure_module(module: nnx.Module) -> tuple[Callable[[Any, Array], Array], Any]:
    """Split ``module`` into a pure ``apply(params, x)`` and its parameters as a plain nested dict of arrays.

    Only ``nnx.Param`` variables are parameters; any other state (batch statistics, RNG counters) is frozen at its
    current value inside ``apply``. ``apply`` rebuilds the module with ``nnx.merge`` on every call, which costs
    Python time at trace time only, so it is jit/vmap/grad-safe.

    Returns:
      ``(apply, params)``.
    """
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(state)
    treedef = jax.tree.structure(state)
    n_leaves = treedef.num_leaves

    def apply(p, x: Array) -> Array:
        leaves = jax.tree.leaves(p)
        if len(leaves) != n_leaves:
            raise ValueError(f"params has {len(leaves)} arrays, the module has {n_leaves}")
        # the module's own code (flax layers add a bias by rank promotion) runs under JAX's default rule
        with jax.numpy_rank_promotion("allow"):
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest)(x)

    return apply, params
