"""The audit's compiled programs, one per (quantizer, problem, options) and cached: chunks, sizes of n that repeat,
and the two attack designs reuse them instead of compiling again."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax import _runtime, indicator
from qmis_jax import quantizers as _quantizers
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import utility


@functools.lru_cache(maxsize=256)
def release_program(q, problem, opts: IndicatorOptions, shared: bool = False):
    """jit of the releases alone: on per-replicate data ``(R, n, ...)`` (the swap coupling, the embedded-target
    design) by :func:`~qmis_jax.indicator.ptq_release_batched`, whose settled replicates leave the batch; or, with
    ``shared``, ``vmap`` on one shared pool with per-replicate membership weights (the pool design)."""
    if not shared:
        return jax.jit(lambda params, x, y, keys: indicator.ptq_release_batched(q, problem, params, x, y, keys=keys,
                                                                            options=opts)[0])  # fmt: skip

    def one(params, w, key, x, y):
        return indicator.ptq_release(q, problem, params, x, y, key=key, weights=w, options=opts)

    return jax.jit(lambda params, x, y, w, keys: jax.vmap(one, in_axes=(0, 0, 0, None, None))(params, w, keys, x, y))


@functools.lru_cache(maxsize=256)
def single_program(q, problem, opts: IndicatorOptions):
    """jit over replicates of the single-model audit: the releases at once
    (:func:`~qmis_jax.indicator.ptq_release_batched`), then per replicate the indicator and whether the release left
    the population release: everything it publishes (:func:`~qmis_jax.quantizers.tree_published`, read in the
    replicate's codebook) compared to ``pop_published``, the population release's in ``theta*``'s (theory.md
    sections 9-10; one program per quantizer, shared by every chunk of the fresh-data statistics).

    The releases stay inside this program: run as a separate release program whose outputs feed an indicator
    program, the audit hung in XLA's CPU client (about one audit in three on two cores, every thread idle)."""

    def one(params, x, y, key, pop_published, released):
        single = indicator.single_model_indicator(q, problem, params, x, y, key=key, options=opts, released=released)
        published = _quantizers.tree_published(q, single.release, params, skip=opts.skip)
        return single, ~_quantizers.published_differ(published, pop_published)

    def program(params, x, y, keys, pop_published):
        if opts.ptq == "loss":  # the descents with every comparison they made: the release's events
            released = indicator.ptq_paths_batched(q, problem, params, x, y, keys=keys, options=opts)
        else:
            released = indicator.ptq_release_batched(q, problem, params, x, y, keys=keys, options=opts)
        return jax.vmap(one, in_axes=(0, 0, 0, 0, None, 0))(params, x, y, keys, pop_published, released)

    return jax.jit(program)


@functools.lru_cache(maxsize=256)
def differ_program(q, skip):
    """jit(vmap) of :func:`~qmis_jax.quantizers.releases_differ` over replicates: whether each replicate's release
    ``(release_a, params_a)`` and ``(release_b, params_b)`` differ in any published number (theory.md section 10)."""

    def one(release_a, params_a, release_b, params_b):
        return _quantizers.releases_differ(q, release_a, params_a, release_b, params_b, skip=skip)

    return jax.jit(jax.vmap(one))


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
    """``[fn(j, name, q) for j, (name, q) in enumerate(qs.items())]``, one quantizer after the other, releasing the
    compiled programs after any quantizer that leaves the process's memory mappings crowded
    (:func:`~qmis_jax._runtime.release_if_crowded`).

    Running the quantizers' programs from several Python threads at once deadlocked XLA's CPU client on two cores
    (every thread waiting on a buffer, no thread computing), so the quantizers run in turn; each is still one
    compiled program over all replicates of a chunk. Each quantizer compiles programs of its own: when releases
    waited for the end of a stage, the population stage of the default study's 22 quantizers at d = 128 ended at
    59,030 of the kernel's 65,530 mappings, and the statistics stage after it passed the limit."""
    out = []
    for j, (name, q) in enumerate(qs.items()):
        out.append(fn(j, name, q))
        _runtime.release_if_crowded()
    return out


def replicate_keys(key: jax.Array, idx: np.ndarray) -> jax.Array:
    """``fold_in(key, i)`` for every replicate number ``i`` in ``idx``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))
