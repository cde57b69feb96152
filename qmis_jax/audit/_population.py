"""Stage 3 of the audit: ``theta*``, the population release of every quantizer and its indicator (section 6)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qmis_jax import stats
from qmis_jax.problems import Problem

from ._plan import AuditPlan
from ._programs import per_quantizer
from ._train import Trained


class Population(NamedTuple):
    """``theta*`` (and where it came from), each quantizer's :class:`~qmis_jax.stats.PopulationAudit`, and the
    common test set of the utility metrics."""

    theta_star: Any
    source: str
    audits: dict[str, stats.PopulationAudit]
    x_test: jax.Array
    y_test: jax.Array


def population_stage(plan: AuditPlan, problem: Problem, trained: Trained, progress) -> Population:
    """``theta*`` in closed form where the problem has one (else the replicate mean), the population release of
    every quantizer on a large fresh sample, its rates and asymptotic MIS for training sets of size ``n``."""
    k_pop = plan.keys.population
    if problem.population is not None:
        theta_star, source = problem.population(k_pop), "closed form"
    else:
        theta_star = trained.unravel(jnp.asarray(trained.theta_all.mean(axis=0)))
        source = f"mean of {plan.replicates} replicates"
    x_big, y_big = problem.sample(jax.random.fold_in(k_pop, 1), plan.population_size)
    x_test, y_test = problem.sample(plan.keys.test, plan.test_size)
    opts = plan.indicator
    k_q = jax.random.fold_in(plan.keys.quantize, 0)

    def one(j, name, q):
        return stats.population_indicator(
            q,
            problem,
            theta_star,
            x_big,
            y_big,
            n=plan.n,
            ptq=opts.ptq,
            method=opts.method,
            key=k_q if q.stochastic else None,
            skip=opts.skip,
            max_sweeps=opts.max_sweeps,
        )

    audits = dict(zip(plan.quantizers, per_quantizer(one, plan.quantizers)))
    progress("population", len(audits))
    return Population(theta_star, source, audits, x_test, y_test)
