"""Pytree helpers: apply a quantizer leaf by leaf to a whole parameter tree.

Leaves are visited in ``jax.tree_util`` flattening order; leaf ``j`` (counting every leaf, skipped or not) uses
the key ``fold_in(key, j)``, so skipping a leaf never changes the randomness of the others. A leaf's path is the
``/``-joined names of its keys (``"dense/kernel"``, ``"layers/0/bias"``). Skipped leaves pass through: value and
levels equal to the leaf, thresholds ``-inf`` / ``+inf``, codes 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import tree_util

from qmis_jax.quantizers._base import Quantizer
from qmis_jax.quantizers.registry import get

Array = jax.Array
PyTree = Any
Skip = Callable[[str, Any], bool] | Iterable[str] | str | None


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def leaf_path(path: tuple[Any, ...]) -> str:
    """The ``/``-joined names of a ``jax.tree_util`` key path (``"dense/kernel"``)."""
    return "/".join(_key_name(entry) for entry in path)


def _skip_fn(skip: Skip) -> Callable[[str, Any], bool]:
    if skip is None:
        return lambda path, leaf: False
    if callable(skip):
        return skip
    patterns = (skip,) if isinstance(skip, str) else tuple(skip) if isinstance(skip, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"`skip` must be None, a callable (path, leaf) -> bool or an iterable of name substrings, got {skip!r}"
        )
    return lambda path, leaf: any(p in path for p in patterns)


def _flatten(params: PyTree, skip: Skip) -> tuple[list[tuple[str, Any, bool]], Any]:
    """``[(path, leaf, skipped)]`` and the treedef; non-float leaves that are not skipped are an error."""
    pairs, treedef = tree_util.tree_flatten_with_path(params)
    should_skip = _skip_fn(skip)
    out = []
    for path, leaf in pairs:
        name = leaf_path(path)
        skipped = bool(should_skip(name, leaf))
        if not skipped and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"`params` leaf {name!r} has dtype {jnp.result_type(leaf)}, not floating point; exclude it with `skip`"
            )
        out.append((name, leaf, skipped))
    return out, treedef


def _leaf_key(key: Array | None, index: int) -> Array | None:
    return None if key is None else jax.random.fold_in(key, index)


def _match(values: PyTree, params: PyTree) -> list[Any]:
    leaves, treedef = tree_util.tree_flatten(values)
    if treedef != tree_util.tree_structure(params):
        raise ValueError(
            f"`values` must have the tree structure of `params`, got {treedef} vs {tree_util.tree_structure(params)}"
        )
    return leaves


def quantize_tree(q: Quantizer | str, params: PyTree, *, key: Array | None = None, skip: Skip = None) -> PyTree:
    """Quantize every (non-skipped) leaf of ``params`` with ``q`` (straight-through gradient per leaf).

    Args:
      q: a quantizer or a preset name.
      params: a pytree of float arrays.
      key: PRNG key (required for stochastic quantizers); leaf ``j`` uses ``fold_in(key, j)``.
      skip: None, a callable ``(path, leaf) -> bool``, or name substrings (a leaf is skipped when its path contains
        one of them), e.g. ``skip=("bias",)``.

    Returns:
      A pytree like ``params`` of released weights.

    >>> import jax.numpy as jnp
    >>> out = quantize_tree("sign", {"w": jnp.array([-2.0, 1.0]), "b": jnp.array([0.3])}, skip=["b"])
    >>> out["w"].tolist(), out["b"].tolist()
    ([-1.5, 1.5], [0.30000001192092896])
    """
    q = get(q)
    q._check_key(key)
    leaves, treedef = _flatten(params, skip)
    out = [leaf if skipped else q(leaf, key=_leaf_key(key, j)) for j, (_, leaf, skipped) in enumerate(leaves)]
    return tree_util.tree_unflatten(treedef, out)


def tree_levels(
    q: Quantizer | str, params: PyTree, *, key: Array | None = None, skip: Skip = None
) -> tuple[PyTree, PyTree, PyTree]:
    """``q.levels`` leaf by leaf: ``(values, lowers, uppers)``, each a pytree like ``params``.

    Args:
      q: a quantizer or a preset name.
      params: a pytree of float arrays.
      key: PRNG key (required for stochastic quantizers); leaf ``j`` uses ``fold_in(key, j)``.
      skip: see :func:`quantize_tree`; skipped leaves have value = lower = upper = the leaf.

    Returns:
      Three pytrees like ``params``.
    """
    q = get(q)
    q._check_key(key)
    leaves, treedef = _flatten(params, skip)
    triples = [
        (leaf, leaf, leaf) if skipped else q.levels(leaf, key=_leaf_key(key, j))
        for j, (_, leaf, skipped) in enumerate(leaves)
    ]
    return tuple(tree_util.tree_unflatten(treedef, [t[i] for t in triples]) for i in range(3))


def tree_neighbors(q: Quantizer | str, values: PyTree, params: PyTree, *, skip: Skip = None) -> tuple[PyTree, PyTree]:
    """``q.neighbors`` leaf by leaf: adjacent levels of the codebook points ``values`` in ``params``' codebooks.

    Args:
      q: a quantizer or a preset name.
      values: a pytree like ``params`` of codebook points (e.g. a release).
      params: the pytree that defines the codebooks (scales held fixed).
      skip: see :func:`quantize_tree`; skipped leaves return the value twice.

    Returns:
      ``(lowers, uppers)``, pytrees like ``params``.
    """
    q = get(q)
    v_leaves = _match(values, params)
    leaves, treedef = _flatten(params, skip)
    pairs = [
        (v, v) if skipped else q.neighbors(v, leaf) for v, (_, leaf, skipped) in zip(v_leaves, leaves, strict=True)
    ]
    return tuple(tree_util.tree_unflatten(treedef, [p[i] for p in pairs]) for i in range(2))


def tree_codes(q: Quantizer | str, values: PyTree, params: PyTree, *, skip: Skip = None) -> PyTree:
    """``q.codes`` leaf by leaf: int32 codes of ``values`` in ``params``' codebooks (skipped leaves: zeros).

    Args:
      q: a quantizer or a preset name.
      values: a pytree like ``params`` of codebook points.
      params: the pytree that defines the codebooks.
      skip: see :func:`quantize_tree`.

    Returns:
      A pytree like ``params`` of int32 arrays.
    """
    q = get(q)
    v_leaves = _match(values, params)
    leaves, treedef = _flatten(params, skip)
    out = [
        jnp.zeros(jnp.shape(leaf), jnp.int32) if skipped else q.codes(v, leaf)
        for v, (_, leaf, skipped) in zip(v_leaves, leaves, strict=True)
    ]
    return tree_util.tree_unflatten(treedef, out)


def tree_thresholds(q: Quantizer | str, params: PyTree, *, skip: Skip = None) -> tuple[PyTree, PyTree]:
    """``q.thresholds`` leaf by leaf, with the true gradient (theory.md section 3(b)).

    Args:
      q: a quantizer or a preset name.
      params: a pytree of float arrays.
      skip: see :func:`quantize_tree`; skipped leaves get ``-inf`` / ``+inf`` (in the default float dtype for
        non-float leaves).

    Returns:
      ``(t_lowers, t_uppers)``, pytrees like ``params``.
    """
    q = get(q)
    leaves, treedef = _flatten(params, skip)
    pairs = []
    for _, leaf, skipped in leaves:
        if skipped:
            dtype = jnp.result_type(leaf)
            dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)
            inf = jnp.full(jnp.shape(leaf), jnp.inf, dtype)
            pairs.append((-inf, inf))
        else:
            pairs.append(q.thresholds(leaf))
    return tuple(tree_util.tree_unflatten(treedef, [p[i] for p in pairs]) for i in range(2))
