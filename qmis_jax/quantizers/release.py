"""What a quantized release publishes, and whether it is continuous (theory.md section 9).

The game of theory.md section 1 sees every number the publisher ships: the integer codes, each block's scale in
its storage format, and every leaf left unquantized. A release is *continuous* (``r = 0``, ``Delta = Theta(n^-1/2)``)
when any of those numbers is a continuous function of the trained weights; by convention float32 counts as
continuous (section 10). :func:`is_continuous` is the one rule every estimator and report uses:

- the quantizer keeps continuous values (``fp32``, pruning);
- stochastic rounding under ``ptq="rtn"`` (the law of the release is smooth in the weights);
- a data-dependent scale published in float32 (every absmax / absmean family with ``scale_format="f32"``,
  including a one-element leaf whose scale is the element itself);
- a leaf left unquantized by ``skip`` (published in float32).

:func:`release_info` says which parts are continuous, :func:`published` returns the published numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import tree_util

from qmis_jax.quantizers._base import Quantizer
from qmis_jax.quantizers.registry import get
from qmis_jax.quantizers.tree import Skip, _element_codes, _flatten, _match, tree_codes

Array = jax.Array
PyTree = Any

PTQS = ("loss", "rtn")

__all__ = [
    "Published",
    "is_continuous",
    "published",
    "release_info",
    "tree_scale_codes",
    "tree_scale_margins",
]


def _check_ptq(ptq: Any) -> str:
    if ptq not in PTQS:
        raise ValueError(f"`ptq` must be one of {PTQS}, got {ptq!r}")
    return ptq


def _float32_scale(q: Quantizer) -> bool:
    """Whether ``q`` publishes a float32 scale (its own families, and recipes such as qwix's that say so)."""
    return (q.scaled and q.scale_format == "f32") or bool(getattr(q, "release_continuous", False))


def _leaf_parts(q: Quantizer, path: str, skipped: bool, ptq: str) -> list[str]:
    name = path or "params"
    if skipped:
        return [f"{name}: skipped (float32)"]
    if q.continuous:
        what = "float32 values of the kept entries" if q.family == "prune" else "float32 values"
        return [f"{name}: {what}"]
    parts = []
    if _float32_scale(q):
        parts.append(f"{name}: float32 scale")
    if ptq == "rtn" and q.stochastic:
        parts.append(f"{name}: stochastic rounding (its law is a smooth function of the weights)")
    return parts


def release_info(q: Quantizer | str, params: PyTree, *, skip: Skip = None, ptq: str = "loss") -> dict[str, Any]:
    """Describe the release of ``params`` under ``q``: is it continuous, which parts, which scale format.

    theory.md section 9: the release is continuous when any published number is a continuous function of the
    weights (float32 counts as continuous, section 10).

    Args:
      q: a quantizer or a preset name.
      params: the parameter pytree (its leaf paths name the parts).
      skip: leaves left unquantized (see :func:`~qmis_jax.quantizers.quantize_tree`).
      ptq: ``"loss"`` or ``"rtn"`` (stochastic rounding is continuous under ``"rtn"`` only).

    Returns:
      ``{"continuous": bool, "continuous_parts": [str, ...], "scale_format": str | None}``: one entry per
      continuous part (``"b: float32 scale"``, ``"w: skipped (float32)"``, ``"w: float32 values"``); the scale
      format is None for a quantizer without a data-dependent scale.

    >>> import jax.numpy as jnp
    >>> params = {"b": jnp.array([0.37]), "w": jnp.array([0.5, -1.3])}
    >>> release_info("int4", params)["continuous_parts"]
    ['b: float32 scale', 'w: float32 scale']
    >>> release_info("int4@e8m0", params, skip=["b"])
    {'continuous': True, 'continuous_parts': ['b: skipped (float32)'], 'scale_format': 'e8m0'}
    >>> release_info("sign@e8m0", params)["continuous"]
    False
    """
    q = get(q)
    ptq = _check_ptq(ptq)
    leaves, _ = _flatten(params, skip)
    parts = [part for path, _, skipped in leaves for part in _leaf_parts(q, path, skipped, ptq)]
    return {
        "continuous": bool(parts),
        "continuous_parts": parts,
        "scale_format": getattr(q, "scale_format", None) if (q.scaled or _float32_scale(q)) else None,
    }


def is_continuous(q: Quantizer | str, params: PyTree = None, *, skip: Skip = None, ptq: str = "loss") -> bool:
    """Whether the release has no exponential security (``r = 0``): some published number is continuous.

    The one rule of theory.md sections 4 and 9 (see the module docstring); :func:`release_info` lists the parts.
    Without ``params`` only the quantizer is judged (``skip`` then needs ``params``).

    Args:
      q: a quantizer or a preset name.
      params: the parameter pytree (needed to judge ``skip``), or None.
      skip: leaves left unquantized.
      ptq: ``"loss"`` or ``"rtn"``.

    Returns:
      A Python bool.

    >>> is_continuous("int4"), is_continuous("int4@e8m0"), is_continuous("fp32"), is_continuous(
    ...     "int4_stochastic@e8m0", ptq="rtn")
    (True, False, True, True)
    """
    q = get(q)
    ptq = _check_ptq(ptq)
    if q.continuous or (ptq == "rtn" and q.stochastic) or _float32_scale(q):
        return True
    if skip is None:
        return False
    if params is None:
        raise ValueError("`params` is required to judge `skip`, got params=None")
    return release_info(q, params, skip=skip, ptq=ptq)["continuous"]


class Published(NamedTuple):
    """The numbers a release publishes (theory.md section 9), each a pytree like ``params``.

    Attributes:
      codes: int32 element codes (the ladder index of each coordinate; zeros for skipped leaves; for continuous
        quantizers the bit pattern of the float32 value).
      scale_codes: int32 codes of the published scales, one per block (E8M0 exponent, bf16 / f16 / f32 bit
        pattern); ``(0,)`` for leaves without a scale.
      continuous: float32 arrays of the continuous parts: a skipped leaf, the values of a continuous quantizer,
        a float32 scale; ``(0,)`` where the leaf publishes nothing continuous.
    """

    codes: PyTree
    scale_codes: PyTree
    continuous: PyTree


def published(q: Quantizer | str, release: PyTree, params: PyTree, *, skip: Skip = None) -> Published:
    """The published numbers of ``release`` (quantized with ``q`` from ``params``): codes, scale codes, the
    continuous parts (theory.md section 9).

    Args:
      q: a quantizer or a preset name.
      release: the released pytree (codebook points of ``params``' codebooks).
      params: the pytree that fixed the codebooks (the trained weights).
      skip: leaves left unquantized.

    Returns:
      :class:`Published`.

    >>> import jax.numpy as jnp
    >>> from qmis_jax.quantizers import quantize_tree
    >>> params = {"w": jnp.array([0.5, -1.3, 0.2, 0.9])}
    >>> pub = published("int4@e8m0", quantize_tree("int4@e8m0", params), params)
    >>> pub.codes["w"].tolist(), pub.scale_codes["w"].tolist(), pub.continuous["w"].shape
    ([2, -5, 1, 4], -2, (0,))
    """
    q = get(q)
    v_leaves = _match(release, params)
    codes = tree_util.tree_leaves(tree_codes(q, release, params, skip=skip))
    leaves, treedef = _flatten(params, skip)
    empty_f = jnp.zeros((0,), jnp.float32)
    out_codes, out_scales, out_cont = [], [], []
    for v, c, (_, leaf, skipped) in zip(v_leaves, codes, leaves, strict=True):
        if skipped:
            out_codes.append(c)
            out_scales.append(jnp.zeros((0,), jnp.int32))
            out_cont.append(jnp.asarray(leaf, jnp.float32))
            continue
        out_codes.append(_element_codes(q, c))
        out_scales.append(q.scale_codes(leaf))
        if q.continuous:
            out_cont.append(jnp.asarray(v, jnp.float32))
        elif q.scaled and q.scale_format == "f32":
            out_cont.append(jnp.asarray(q.scales(leaf), jnp.float32))
        else:
            out_cont.append(empty_f)
    unflatten = tree_util.tree_unflatten
    return Published(unflatten(treedef, out_codes), unflatten(treedef, out_scales), unflatten(treedef, out_cont))


def tree_scale_codes(q: Quantizer | str, params: PyTree, *, skip: Skip = None) -> PyTree:
    """``q.scale_codes`` leaf by leaf (``(0,)`` int32 for skipped leaves and quantizers without a scale)."""
    q = get(q)
    leaves, treedef = _flatten(params, skip)
    out = [jnp.zeros((0,), jnp.int32) if skipped else q.scale_codes(leaf) for _, leaf, skipped in leaves]
    return tree_util.tree_unflatten(treedef, out)


def tree_scale_margins(q: Quantizer | str, params: PyTree, *, skip: Skip = None) -> Array:
    """The scale events' margins of every non-skipped leaf, concatenated in flattening order (theory.md section 9).

    Differentiable in ``params`` (the boundaries are fixed numbers), so ``jax.grad`` of one entry is the
    ``grad stat`` of the delta method. Empty for quantizers without a discrete scale.

    Returns:
      A flat float array (``+inf`` where an event does not exist).
    """
    q = get(q)
    leaves, _ = _flatten(params, skip)
    parts = [jnp.ravel(q.scale_margins(leaf)) for _, leaf, skipped in leaves if not skipped]
    parts = [p for p in parts if p.size]
    if not parts:
        return jnp.zeros((0,), jnp.float32)
    dtype = jnp.result_type(*parts)
    return jnp.concatenate([p.astype(dtype) for p in parts])
