"""Pytree helpers: apply a quantizer leaf by leaf to a whole parameter tree.

Leaves are visited in ``jax.tree_util`` flattening order; leaf ``j`` (counting every leaf, skipped or not) uses
the key ``fold_in(key, j)``, so skipping a leaf never changes the randomness of the others. A leaf's path is the
``/``-joined names of its keys (``"dense/kernel"``, ``"layers/0/bias"``). Skipped leaves pass through: value and
levels equal to the leaf, thresholds ``-inf`` / ``+inf``, codes 0.

:func:`tree_published` is what a release publishes, as integers (theory.md sections 9-10), and
:func:`releases_differ` the one test of whether two releases differ: the Monte Carlo flip and the swap coupling
both use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax, tree_util

from qmis_jax.quantizers._base import SCALE_CODE_BITS, Quantizer
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


# ----------------------------------------------------------------------------------------------------------------
# What a release publishes, and whether two releases differ (theory.md sections 9-10)
# ----------------------------------------------------------------------------------------------------------------


class PublishedLeaf(NamedTuple):
    """What one leaf of a release publishes (theory.md section 9), every number as the integer it is stored as.

    Two releases are the same iff every field of every leaf is equal (:func:`releases_differ`). A part the leaf
    does not publish is an empty array ``(0,)``, so the fields of one quantizer and parameter shape always have
    the same shapes (``vmap``-able, comparable).

    Attributes:
      codes: int32, the leaf's shape: the element codes (the ladder index of each coordinate, the scale code
        unpacked); ``(0,)`` for a leaf published in float.
      scale_codes: int32, one per block (as ``Quantizer.scale_codes``): the E8M0 exponent, the bf16 / f16 bit
        pattern, or the float32 bit pattern of a float32 scale; ``(0,)`` without a data-dependent scale.
      float_bits: the bit pattern of a leaf published in float (a skipped leaf, the values of a continuous
        quantizer such as ``fp32`` or ``prune50``), in the unsigned integer of the leaf's width (``uint32`` for
        float32); non-float skipped leaves as they are; ``(0,)`` (uint32) for a quantized leaf. Bits are compared
        as stored: ``-0.0`` and ``+0.0`` differ (a publisher storing ``-0.0`` ships different bits) and a NaN
        equals the same NaN.
    """

    codes: Array
    scale_codes: Array
    float_bits: Array


def _element_codes(q: Quantizer, codes: Array) -> Array:
    """The element codes of ``Quantizer.codes``: with a discrete scale they pack ``element * 2^S + scale code``
    (``0 <= scale code < 2^S``), unpacked here."""
    if q.discrete_scale:
        return jnp.right_shift(codes, SCALE_CODE_BITS[q.scale_format])
    return codes


def _stored_bits(x: Array) -> Array:
    """The bit pattern of a float array as stored (unsigned integer of its width); other arrays unchanged."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return x


@functools.partial(jax.jit, static_argnums=(0, 3))
def _published_leaf(q: Quantizer, v: Array, leaf: Array, skipped: bool) -> PublishedLeaf:
    none_i = jnp.zeros((0,), jnp.int32)
    if skipped or q.continuous:
        return PublishedLeaf(none_i, none_i, _stored_bits(v))
    return PublishedLeaf(_element_codes(q, q.codes(v, leaf)), q.scale_codes(leaf), jnp.zeros((0,), jnp.uint32))


def tree_published(q: Quantizer | str, release: PyTree, params: PyTree, *, skip: Skip = None) -> PyTree:
    """What ``release`` publishes, every number as stored (theory.md sections 9-10): a :class:`PublishedLeaf`
    per leaf.

    ``params`` fixes the codebooks (the scales): the release of a replicate is read in that replicate's codebook,
    the population release in ``theta*``'s. A quantized leaf publishes its element codes and its scale codes (the
    E8M0 exponent, the bf16 / f16 bits, or the float32 bits of a float32 scale); a skipped leaf and the values of
    a continuous quantizer are published in float, as their bit patterns. Pure and ``jit`` / ``vmap``-safe.

    Args:
      q: a quantizer or a preset name.
      release: the released pytree (codebook points of ``params``' codebooks; skipped leaves as released).
      params: the pytree that fixed the codebooks, structured like ``release``.
      skip: see :func:`quantize_tree`.

    Returns:
      A pytree with the structure of ``params`` whose leaves are :class:`PublishedLeaf`.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.array([0.5, -1.3, 0.2, 0.9])}
    >>> pub = tree_published("int4@e8m0", quantize_tree("int4@e8m0", params), params)["w"]
    >>> pub.codes.tolist(), pub.scale_codes.tolist(), pub.float_bits.shape
    ([2, -5, 1, 4], -2, (0,))
    """
    q = get(q)
    v_leaves = _match(release, params)
    leaves, treedef = _flatten(params, skip)
    out = [_published_leaf(q, v, leaf, skipped) for v, (_, leaf, skipped) in zip(v_leaves, leaves, strict=True)]
    return tree_util.tree_unflatten(treedef, out)


def published_differ(a: PyTree, b: PyTree) -> Array:
    """Whether two published representations (:func:`tree_published`) differ in any number (theory.md section 10).

    Args:
      a, b: outputs of :func:`tree_published` for the same quantizer and parameter structure.

    Returns:
      A bool scalar (``vmap`` it over replicates).

    Raises:
      ValueError: ``b`` is not structured like ``a`` or a field has another shape.
    """
    leaves_a, tree_a = tree_util.tree_flatten(a)
    leaves_b, tree_b = tree_util.tree_flatten(b)
    if tree_a != tree_b:
        raise ValueError(f"`b` must have the tree structure of `a`, got {tree_b} vs {tree_a}")
    differ = jnp.zeros((), bool)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(f"`b` must have the shapes of `a`, got a field of shape {jnp.shape(y)} vs {jnp.shape(x)}")
        if jnp.result_type(x) != jnp.result_type(y):  # stored in another format: different numbers
            return jnp.ones((), bool)
        differ = differ | jnp.any(x != y)
    return differ


def releases_differ(
    q: Quantizer | str, release_a: PyTree, params_a: PyTree, release_b: PyTree, params_b: PyTree, *, skip: Skip = None
) -> Array:
    """Whether two releases of ``q`` differ in any published number: ``R != R'`` of theory.md section 10.

    Compares everything published, as stored (:func:`tree_published`): element codes, scale codes, and the bits of
    every leaf published in float. Two code patterns that decode to the same values are different releases:
    ``int4@e8m0`` codes ``[3, 2]`` at scale ``2^-2`` and ``[6, 4]`` at ``2^-3`` both decode to ``[0.75, 0.5]``.
    The Monte Carlo flip (a replicate's release against the population release) and the swap coupling (a
    replicate's release against the release trained with one point swapped) both use it.

    Args:
      q: a quantizer or a preset name.
      release_a, params_a: a release and the parameters that fixed its codebooks.
      release_b, params_b: another release of ``q`` and its parameters, structured like the first.
      skip: see :func:`quantize_tree`.

    Returns:
      A bool scalar; ``vmap`` it over stacked replicates.

    >>> import jax.numpy as jnp
    >>> release = {"w": jnp.array([0.75, 0.5])}  # codes [3, 2] at 2^-2 in a's codebook, [6, 4] at 2^-3 in b's
    >>> a, b = {"w": jnp.array([1.0, 0.5])}, {"w": jnp.array([0.75, 0.5])}
    >>> bool(releases_differ("int4@e8m0", release, a, release, b)), bool(releases_differ("int4@e8m0", release, a,
    ...     release, a))
    (True, False)
    """
    q = get(q)
    pub_a = tree_published(q, release_a, params_a, skip=skip)
    return published_differ(pub_a, tree_published(q, release_b, params_b, skip=skip))
