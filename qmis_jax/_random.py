"""Host-side randomness drawn from JAX PRNG keys: the one way a NumPy generator is seeded inside the package.

Public functions take a JAX key first; where the work is host-side NumPy (random splits of scores, the exact
oracles' Monte Carlo) the generator is derived from that key here, so the same key gives the same draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _seed_words(key):
    return jax.random.bits(key, (4,), dtype=jnp.uint32)


def numpy_rng(key) -> np.random.Generator:
    """A NumPy generator seeded from a JAX PRNG key (typed or raw ``uint32``): ``default_rng`` of four random
    ``uint32`` words drawn from the key.

    Raises:
      ValueError: ``key`` is not a JAX PRNG key (an int seed or None included).

    >>> import jax
    >>> a = numpy_rng(jax.random.key(0)).standard_normal(3)
    >>> bool((a == numpy_rng(jax.random.key(0)).standard_normal(3)).all())
    True
    """
    arr = jnp.asarray(key) if not isinstance(key, (int, np.integer, type(None))) else None
    if arr is not None and (jnp.issubdtype(arr.dtype, jax.dtypes.prng_key) or arr.dtype == jnp.uint32):
        return np.random.default_rng(np.asarray(_seed_words(key)).tolist())
    raise ValueError(f"key must be a JAX PRNG key, got key={key!r}")
