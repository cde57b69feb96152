"""Loops over a batch of independent problems that stop at different times."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def compacting_while(step: Callable, carry, active: Callable, *, shrink: int = 4, min_size: int = 16):
    """``while any(active(carry)): carry = step(carry)`` over a batch (leading axis) of independent problems,
    compacting: once at most ``1 / shrink`` of the batch is active, the active members are gathered into a batch
    ``shrink`` times smaller, iterated there, and scattered back.

    ``step`` must act on each member independently and leave inactive members unchanged (a vmapped step with a
    ``done`` guard), so every member's iterates are those of the plain loop: a vmapped ``while_loop`` instead runs
    every member as long as the slowest. Stages are unrolled at trace time (``log_shrink(size / min_size)``).
    """
    size = jax.tree.leaves(carry)[0].shape[0]
    if size <= min_size:
        return jax.lax.while_loop(lambda c: jnp.any(active(c)), step, carry)
    part = -(-size // shrink)
    carry = jax.lax.while_loop(lambda c: jnp.sum(active(c)) > part, step, carry)
    top = jnp.argsort(~active(carry), stable=True)[:part]  # the active members first
    sub = compacting_while(step, jax.tree.map(lambda a: a[top], carry), active, shrink=shrink, min_size=min_size)
    return jax.tree.map(lambda a, b: a.at[top].set(b), carry, sub)
