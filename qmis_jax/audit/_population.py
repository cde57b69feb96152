"""Stage 3 of the audit: ``theta*``, the population release of every quantizer and its indicator (section 6)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from qmis_jax import indicator, train
from qmis_jax.problems import Problem

from ._plan import AuditPlan
from ._programs import per_quantizer


class Population(NamedTuple):
    """``theta*`` (and where it came from), each quantizer's :class:`~qmis_jax.indicator.PopulationAudit`, and the
    common test set of the utility metrics."""

    theta_star: Any
    source: str
    audits: dict[str, indicator.PopulationAudit]
    x_test: jax.Array
    y_test: jax.Array


def estimate_theta_star(plan: AuditPlan, problem: Problem) -> tuple[Any, str]:
    """``theta*`` in closed form where the problem has one, else the ERM of one large fresh sample of
    ``plan.star_size`` points (theory.md section 6: the replicate mean's error, of order ``Sigma / (n R)``, would
    enter ``r`` at order ``1 / (n R)``). The fit starts where every replicate starts (their shared
    initialisation), so a non-convex model stays in the replicates' basin (section 8)."""
    k_pop = plan.keys.population
    if problem.population is not None:
        return problem.population(k_pop), "closed form"
    x, y = problem.sample(jax.random.fold_in(k_pop, 2), plan.star_size)
    k_init = train.training_keys(plan.keys.train).init  # the replicates' shared init (train.fit_fresh)
    fit = train.fit_data(
        plan.keys.train, problem, x[None], y[None], init_params=jax.jit(problem.init)(k_init), **plan.fit_kwargs
    )
    return jax.tree.map(lambda a: a[0], fit.params), f"fit on {plan.star_size} fresh points"


def population_stage(plan: AuditPlan, problem: Problem, progress) -> Population:
    """``theta*`` (:func:`estimate_theta_star`), the population release of every quantizer on a large fresh
    sample, its events, rates and asymptotic MIS for training sets of size ``n``; the gap sample grows in chunks of
    ``plan.population_size`` until the predicted flip is precise, up to ``plan.population_max`` points."""
    k_pop = plan.keys.population
    theta_star, source = estimate_theta_star(plan, problem)
    # the gaps are estimated on one fresh sample, the loss-PTQ release chosen on another (theory.md section 6)
    x_big, y_big = problem.sample(jax.random.fold_in(k_pop, 1), plan.population_size)
    select = (
        problem.sample(jax.random.fold_in(k_pop, 3), plan.population_size) if plan.indicator.ptq == "loss" else None
    )
    x_test, y_test = problem.sample(plan.keys.test, plan.test_size)
    opts = plan.indicator
    k_q = jax.random.fold_in(plan.keys.quantize, 0)
    k_flip = jax.random.fold_in(k_pop, 4)
    k_more = jax.random.fold_in(k_pop, 5)

    def more(c):
        """Fresh chunk ``c >= 1`` of the gap sample, drawn when the predicted flip needs more precision."""
        return problem.sample(jax.random.fold_in(k_more, c), plan.population_size)

    def one(j, name, q):
        return indicator.population_indicator(
            q,
            problem,
            theta_star,
            x_big,
            y_big,
            n=plan.n,
            key=k_q if q.stochastic else None,
            options=opts,
            select=select,
            flip_key=k_flip,
            more=more,
            max_size=plan.population_max,
            exact_star=source == "closed form",
        )

    audits = dict(zip(plan.quantizers, per_quantizer(one, plan.quantizers)))
    progress("population", len(audits))
    return Population(theta_star, source, audits, x_test, y_test)
