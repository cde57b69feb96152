"""Helpers shared by the quantizer tests: the canonical tensors and one compiled program per quantizer.

``run_batch`` / ``run_all`` evaluate every public method of a quantizer under ``jit`` and ``vmap`` in one program
(:func:`everything`), so test modules importing them from here share its compilations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import qmis_jax.quantizers as Q

KEY = jax.random.key(20240607)


def normal(seed: int, shape, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


W = normal(1, (48, 8))  # the canonical test tensor
C = normal(2, (48, 8))  # cotangent for straight-through gradients
BATCH = np.stack([W, 2.5 * C, W - 0.3])  # a vmapped batch: its first element is replaced by the tensor under test
KEYS = jax.random.split(KEY, 3)


def one(q, w, key, c):
    """Every public method of `q` on one tensor `w`."""
    out, vjp = jax.vjp(lambda w: q(w, key=key), w)
    value, lower, upper = q.levels(w, key=key)
    t_lo, t_hi = q.thresholds(w)
    points = jnp.stack([value, lower, upper])
    n_lo, n_hi = jax.vmap(q.neighbors, in_axes=(0, None))(points, w)
    codes = jax.vmap(q.codes, in_axes=(0, None))(points, w)
    if q.discrete_scale:  # element codes: unpack the scale code from the low bits (tested apart)
        codes = jnp.right_shift(codes, Q.SCALE_CODE_BITS[q.scale_format])
    return {
        "q": out,
        "grad": vjp(c.astype(out.dtype))[0],
        "value": value,
        "lower": lower,
        "upper": upper,
        "t_lo": t_lo,
        "t_hi": t_hi,
        "n_lo": n_lo[0],
        "n_hi": n_hi[0],
        "up_of_lower": n_hi[1],
        "lo_of_upper": n_lo[2],
        "codes": codes[0],
        "codes_lower": codes[1],
        "codes_upper": codes[2],
    }


@functools.partial(jax.jit, static_argnums=0)
def everything(q, ws, keys, c):
    """`one` under jit and vmap over a batch of 3 tensors: one compilation per (quantizer, shape, dtype)."""
    return jax.vmap(lambda w, k: one(q, w, k, c))(ws, keys)


def run_batch(name_or_q, w=W, c=C):
    """`everything` on (w, 2.5 C, W - 0.3) (or three copies of w when its shape is not W's), as NumPy."""
    w = np.asarray(w)
    ws = np.stack([w, *BATCH[1:].astype(w.dtype)]) if w.shape == W.shape else np.stack([w, w, w])
    out = everything(Q.get(name_or_q), jnp.asarray(ws), KEYS, jnp.asarray(c, w.dtype))
    return {k: np.asarray(v) for k, v in out.items()}


def run_all(name_or_q, w=W, c=C):
    """`everything` on the tensor w (first element of the batch)."""
    return {k: v[0] for k, v in run_batch(name_or_q, w, c).items()}
