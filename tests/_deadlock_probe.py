"""A minimal program that deadlocks XLA's CPU runtime on jaxlib 0.10.0 - 0.11.0 (run as a script, needs only jax).

Several independent batched LAPACK kernels (LU solve, symmetric eigendecomposition, Cholesky under ``vmap``) in one
``jit``: XLA may run them at once, one per thread of its intra-op pool. On the affected jaxlib each such kernel
schedules its batch chunks onto that same pool and blocks until they finish; when as many kernels block as the pool
has threads, nothing is left to run the chunks. The process pins itself to ``--cpus`` CPUs first (the pool is sized
from the CPUs the process may use), then runs the program ``--runs`` times and prints ``ok RUNS`` when every run
returned. A caller gives it a timeout: a deadlocked run never returns.

    python tests/_deadlock_probe.py --runs 200 --cpus 2
"""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[: args.cpus])

    import jax  # imported after pinning: the pool is sized when the CPU client starts
    import jax.numpy as jnp

    @jax.jit
    def program(a, b):
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        spd = a @ jnp.swapaxes(a, -1, -2) + 4.0 * eye
        solve = jax.vmap(jnp.linalg.solve)(a + 4.0 * eye, b)
        eigh = jax.vmap(jnp.linalg.eigh)(spd)[0]
        chol = jax.vmap(jnp.linalg.cholesky)(spd)
        solve2 = jax.vmap(jnp.linalg.solve)(spd, b * 2.0)
        return solve.sum() + eigh.sum() + chol.sum() + solve2.sum()

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (256, 24, 24))
    b = jax.random.normal(key_b, (256, 24))
    total = 0.0
    for i in range(args.runs):
        total += float(program(a * (1.0 + i / args.runs), b))
    print(f"ok {args.runs} jax {jax.__version__} finite {bool(total == total)}", flush=True)


if __name__ == "__main__":
    main()
