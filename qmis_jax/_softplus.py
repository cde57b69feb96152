"""``softplus`` with the values and derivatives of ``jnp.logaddexp(0, z)``, at half its cost on CPU.

``logaddexp`` guards ``log(exp(x1) + exp(x2))`` against two infinities of the same sign with a NaN test and a
select; with ``x1 = 0`` that case cannot arise. Alone in a loop on XLA's CPU backend the guarded form costs 1.3 ns
an element against 0.65 ns without it (two cores); the GLM solvers, which evaluate the logistic loss in every line
search, train 6-16% faster with it. The same operations (``max(z, 0) + log1p(exp(-|z|))``) and the same
derivative rule (``exp(z - softplus(z))``, with ``+inf`` replaced by 0 as ``logaddexp`` does) give values, first
and second derivatives bitwise equal to those of ``logaddexp`` (``tests/test_problems.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _no_pos_inf(a):
    return jnp.where(a == jnp.inf, 0.0, a)


@jax.custom_jvp
def softplus(z: jax.Array) -> jax.Array:
    """``log(1 + exp(z))`` elementwise, computed stably; ``z`` a real floating array."""
    return jnp.maximum(z, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (z,), (t,) = primals, tangents
    out = softplus(z)
    return out, t * jnp.exp(_no_pos_inf(z) - _no_pos_inf(out))
