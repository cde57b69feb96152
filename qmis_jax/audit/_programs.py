"""The audit's compiled programs, one per (quantizer, problem, options) and cached: chunks, sizes of n that repeat,
and the two attack designs reuse them instead of compiling again."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax import quantizers as _quantizers
from qmis_jax import stats
from qmis_jax.problems import utility
from qmis_jax.stats.options import IndicatorOptions


@functools.lru_cache(maxsize=256)
def release_program(q, problem, opts: IndicatorOptions, shared: bool = False):
    """jit(vmap) over replicates of the release alone (:func:`~qmis_jax.stats.ptq_release`), on per-replicate data
    ``(R, n, ...)`` (the swap coupling), or on one shared pool with per-replicate membership weights (``shared``,
    the pool design)."""

    def one(params, x, y, w, key):
        return stats.ptq_release(q, problem, params, x, y, key=key, weights=w, options=opts)

    in_axes = (0, None, None, 0, 0) if shared else (0, 0, 0, None, 0)
    return jax.jit(jax.vmap(one, in_axes=in_axes))


@functools.lru_cache(maxsize=256)
def single_program(q, problem, opts: IndicatorOptions):
    """jit(vmap) over replicates of the single-model audit, each release's codes compared to ``pop_codes``
    (one program per quantizer, shared by the fresh-data statistics and the embedded-target LiRA chunks)."""

    def one(params, x, y, key, pop_codes):
        single = stats.single_model_indicator(q, problem, params, x, y, key=key, options=opts)
        codes = _quantizers.tree_codes(q, single.release, params, skip=opts.skip)
        same = functools.reduce(
            jnp.logical_and,
            jax.tree_util.tree_leaves(jax.tree.map(lambda a, b: jnp.all(a == b), codes, pop_codes)),
        )
        return single, same

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))


@functools.lru_cache(maxsize=64)
def loss_program(problem, shared: bool = False):
    """jit(vmap) of per-example losses of stacked params on per-replicate (or shared) data."""
    data_axis = None if shared else 0
    return jax.jit(jax.vmap(problem.batch_loss, in_axes=(0, data_axis, data_axis)))


@functools.lru_cache(maxsize=64)
def utility_program(problem):
    """jit(vmap) of the utility metrics of stacked params on one shared test set."""
    return jax.jit(jax.vmap(lambda p, x, y: utility(problem, p, x, y), in_axes=(0, None, None)))


def per_quantizer(fn: Callable[[int, str, Any], Any], qs: Mapping[str, Any]) -> list[Any]:
    """``[fn(j, name, q) for j, (name, q) in enumerate(qs.items())]``, one quantizer after the other.

    Running the quantizers' programs from several Python threads at once deadlocked XLA's CPU client on two cores
    (every thread waiting on a buffer, no thread computing), so the quantizers run in turn; each is still one
    compiled program over all replicates of a chunk."""
    return [fn(j, name, q) for j, (name, q) in enumerate(qs.items())]


def replicate_keys(key: jax.Array, idx: np.ndarray) -> jax.Array:
    """``fold_in(key, i)`` for every replicate number ``i`` in ``idx``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))
