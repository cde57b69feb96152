"""Stage 5 of the audit: the attacks (theory.md section 7).

- LOSS on the fresh-data replicates (their scores come from the statistics stage);
- LiRA, online and offline, on the embedded-target design: ``lira_replicates`` more models, each trained on a random
  half of ``2k`` fixed targets plus ``n - k`` fresh points, Gaussians fitted on half of them (shadows), the other
  half attacked;
- optionally the classic pool design (:func:`pool_design_scores`), reported apart as ``lira_pool``: a different
  game, whose advantage bounds nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax import stats, train
from qmis_jax.problems import Problem
from qmis_jax.stats.options import IndicatorOptions
from qmis_jax.store import Store

from ._plan import SECTION1_ATTACKS, AuditPlan
from ._population import Population
from ._programs import loss_program, per_quantizer, release_program, replicate_keys, single_program
from ._statistics import ReplicateStats

LIRA_ATTACKS = ("lira", "lira_offline")


@functools.lru_cache(maxsize=64)
def _lira_data_program(problem, n: int, k: int):
    """jit(vmap) of the embedded-target training sets: replicate ``i``'s ``k`` in-targets, then ``n - k`` fresh
    points ``problem.sample(fold_in(key, i), n - k)`` (compiled once per problem and sizes)."""

    def one(key, targets_x, targets_y, membership_row, i):
        order = jnp.argsort(~membership_row, stable=True)[:k]
        xf, yf = problem.sample(jax.random.fold_in(key, i), n - k)
        return jnp.concatenate([targets_x[order], xf]), jnp.concatenate([targets_y[order], yf])

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


def embedded_target_scores(
    plan: AuditPlan, problem: Problem, pop: Population, store: Store, progress
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores ``(R, 2k)`` of every quantizer's releases on the targets, and the membership ``(R, 2k)``.

    The releases come from the same compiled program as the fresh-data statistics (same shapes), so the
    embedded-target design compiles nothing new per quantizer."""
    n, k = plan.n, plan.lira_targets
    k_targets, k_member, k_fresh, k_fit = jax.random.split(plan.keys.lira, 4)
    tx, ty = problem.sample(k_targets, 2 * k)
    membership = np.asarray(stats.embedded_target_membership(k_member, replicates=plan.lira_replicates, targets=2 * k))
    make = _lira_data_program(problem, n, k)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in plan.quantizers}
    for c, (start, stop) in enumerate(plan.chunks(plan.lira_replicates)):

        def chunk(start=start, stop=stop):
            idx = np.arange(start, stop)
            x, y = make(k_fresh, tx, ty, jnp.asarray(membership[start:stop]), jnp.asarray(idx, jnp.uint32))
            # on one device, like the fresh-data chunks' parameters, so the compiled programs are shared
            fit = train.fit_data(k_fit, problem, x, y, start=start, **plan.fit_kwargs)
            params = jax.device_put(fit.params, x.sharding)

            def one(j, label, q):
                keys = replicate_keys(jax.random.fold_in(plan.keys.quantize, 1000 + j), idx)
                single, _ = single_program(q, problem, plan.indicator)(params, x, y, keys, pop.audits[label].codes)
                return stats.score_from_loss(loss_program(problem, True)(single.release, tx, ty), problem.task)

            return dict(zip(plan.quantizers, per_quantizer(one, plan.quantizers)))

        done = store.get_or_compute(f"lira-{c}", chunk)
        for name in plan.quantizers:
            scores[name].append(done[name])
        progress("lira", c + 1)
    return {name: np.concatenate(v) for name, v in scores.items()}, membership


def pool_design_scores(
    key: jax.Array,
    problem: Problem,
    quantizers: dict,
    *,
    n: int,
    replicates: int,
    indicator: IndicatorOptions,
    fit_kwargs: dict[str, Any],
    store: Store,
    key_quantize: jax.Array,
    pool=None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The classic pool design (theory.md section 7, reported as ``lira_pool``): one pool of ``2n`` points (or the
    given ``pool`` ``(x, y)``), each replicate trains on a random half.

    Returns:
      each quantizer's scores ``(R, pool size)`` and the membership ``(R, pool size)``.
    """
    k_data, k_member, k_fit = jax.random.split(key, 3)
    px, py = problem.sample(k_data, 2 * n) if pool is None else (jnp.asarray(pool[0]), jnp.asarray(pool[1]))
    membership = np.asarray(stats.pool_membership(k_member, replicates=replicates, pool=px.shape[0]))

    def compute():
        weights = jnp.asarray(membership, px.dtype)
        res = train.fit(k_fit, problem, px, py, weights=weights, **fit_kwargs)

        def one(j, name, q):
            keys = replicate_keys(jax.random.fold_in(key_quantize, 2000 + j), np.arange(replicates))
            release = release_program(q, problem, indicator)(res.params, px, py, weights, keys)
            return stats.score_from_loss(loss_program(problem, True)(release, px, py), problem.task)

        return dict(zip(quantizers, per_quantizer(one, quantizers)))

    return store.get_or_compute("lira_pool", compute), membership


def attack_stage(
    plan: AuditPlan, problem: Problem, pop: Population, per_rep: ReplicateStats, store: Store, progress
) -> dict[str, dict[str, Any]]:
    """``{quantizer: {attack: metrics}}`` for the attacks the plan asks for."""
    results: dict[str, dict[str, Any]] = {name: {} for name in plan.quantizers}
    # each section-1 attack's one-sided bound at its Bonferroni share of the bracket's level (theory.md section 10)
    bound_level = stats.bracket_levels(max(1, len([a for a in plan.attacks if a in SECTION1_ATTACKS])))[1]
    if "loss" in plan.attacks:
        for name in plan.quantizers:
            m, nm = stats.loss_attack(per_rep.of(name, "member_loss"), per_rep.of(name, "nonmember_loss"))
            key = jax.random.fold_in(plan.keys.nonmember, 7)
            metrics = stats.attack_metrics(m, nm, key=key, by_replicate=True, bound_level=bound_level)
            results[name]["loss"] = metrics.to_dict()
    lira = [a for a in plan.attacks if a in LIRA_ATTACKS]
    if lira:
        scores, membership = embedded_target_scores(plan, problem, pop, store, progress)
        shadow = stats.shadow_mask(plan.lira_replicates, shadows=plan.lira_replicates // 2)
        for name in plan.quantizers:
            for attack in lira:
                results[name][attack] = stats.lira_metrics(
                    scores[name],
                    membership,
                    shadow=shadow,
                    online=attack == "lira",
                    key=jax.random.fold_in(plan.keys.lira, 7),
                    bound_level=bound_level,
                )
    if "lira_pool" in plan.attacks:
        scores, membership = pool_design_scores(
            plan.keys.pool,
            problem,
            plan.quantizers,
            n=plan.n,
            replicates=plan.lira_replicates,
            indicator=plan.indicator,
            fit_kwargs=plan.fit_kwargs,
            store=store,
            key_quantize=plan.keys.quantize,
        )
        progress("lira_pool", 1)
        shadow = stats.shadow_mask(plan.lira_replicates, shadows=plan.lira_replicates // 2)
        for name in plan.quantizers:
            results[name]["lira_pool"] = stats.lira_metrics(
                scores[name], membership, shadow=shadow, pool=True, key=jax.random.fold_in(plan.keys.pool, 7)
            )
    return results
