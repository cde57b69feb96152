"""Stage 2 of the audit: train the fresh-data replicates, chunk by chunk, through the store."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from qmis_jax import train
from qmis_jax.problems import Problem
from qmis_jax.store import Store

from ._plan import AuditPlan


class Trained(NamedTuple):
    """The fresh-data replicates: flat parameters per chunk and the convergence record of all of them."""

    theta: list[np.ndarray]  # per chunk, (replicates in the chunk, p)
    grad_norm: np.ndarray  # (R,)
    converged: np.ndarray  # (R,) bool
    unravel: object  # flat vector -> parameter pytree

    def params(self, chunk: int):
        """The parameter pytree of chunk ``chunk``, with a leading replicate axis."""
        return jax.vmap(self.unravel)(jax.numpy.asarray(self.theta[chunk]))

    @property
    def theta_all(self) -> np.ndarray:
        return np.concatenate(self.theta)


def train_replicates(plan: AuditPlan, problem: Problem, store: Store, progress) -> Trained:
    """Replicate ``i`` trains on its own fresh data set ``problem.sample(fold_in(k, i), n)`` (section 7)."""
    parts = []
    for c, (start, stop) in enumerate(plan.chunks()):

        def train_chunk(start=start, stop=stop):
            res = train.fit_fresh(
                plan.keys.train, problem, n=plan.n, replicates=stop - start, start=start, **plan.fit_kwargs
            )
            theta = jax.vmap(lambda prm: ravel_pytree(prm)[0])(res.params)
            return {"theta": theta, "grad_norm": res.grad_norm, "converged": res.converged}

        parts.append(store.get_or_compute(f"train-{c}", train_chunk))
        progress("train", c + 1)
    theta0, unravel = ravel_pytree(problem.init(jax.random.key(0)))
    return Trained(
        theta=[np.asarray(t["theta"], theta0.dtype) for t in parts],
        grad_norm=np.concatenate([t["grad_norm"] for t in parts]),
        converged=np.concatenate([t["converged"] for t in parts]).astype(bool),
        unravel=unravel,
    )
