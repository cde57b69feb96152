"""Stage 4 of the audit: per replicate and quantizer, the release, its single-model indicator, whether it left the
population release (the Monte Carlo flip), the LOSS attack's scores and the utility (section 6)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax import indicator, quantizers, train
from qmis_jax.problems import Problem
from qmis_jax.store import Store

from ._plan import AuditPlan
from ._population import Population
from ._programs import (
    differ_program,
    loss_program,
    per_quantizer,
    release_program,
    replicate_keys,
    single_program,
    utility_program,
)
from ._train import Trained


class ReplicateStats(NamedTuple):
    """Per-replicate arrays ``(R,)`` keyed ``"{quantizer}.{field}"`` (fields ``r_hat``, ``r_lo``, ``r_hi``, ``ok``,
    ``flip``, ``swap_changed``, ``member_loss``, ``nonmember_loss``, ``utility.{metric}``) and
    ``"trained.utility.{metric}"``."""

    arrays: dict[str, np.ndarray]

    def of(self, name: str, field: str) -> np.ndarray:
        return self.arrays[f"{name}.{field}"]

    def utility(self, name: str) -> dict[str, float]:
        prefix = f"{name}.utility."
        return {k[len(prefix) :]: float(np.mean(v)) for k, v in self.arrays.items() if k.startswith(prefix)}


def swapped_fit(plan: AuditPlan, problem: Problem, x, y, idx: np.ndarray):
    """The swap coupling of theory.md section 10: replicate ``i`` trained again on its data set with its first point
    replaced by a fresh one (``problem.sample(fold_in(k_swap, i), 1)``), from the same shared initialisation.
    Returns the data ``(x', y')`` and the parameters, committed to the data's device."""
    fresh_x, fresh_y = train.replicate_data(plan.keys.swap, problem, n=1, index=idx)
    xs, ys = x.at[:, 0].set(fresh_x[:, 0]), y.at[:, 0].set(fresh_y[:, 0])
    fit = train.fit_data(plan.keys.train, problem, xs, ys, start=int(idx[0]), **plan.fit_kwargs)
    return xs, ys, jax.device_put(fit.params, xs.sharding)


def _releases_differ(q, release, params, swapped, params_s, skip) -> jax.Array:
    """Per replicate: whether the release of ``params`` and the swapped release of ``params_s`` differ in any
    published number, each read in its own codebook (:func:`~qmis_jax.quantizers.releases_differ`: codes, scale
    codes and the bits of float leaves; theory.md section 10)."""
    return differ_program(q, skip)(release, params, swapped, params_s)


def _population_published(q, audit, theta_star, skip):
    """What the population release publishes in ``theta*``'s codebook (computed here when the audit lacks it)."""
    published = getattr(audit, "published", None)
    if published is not None:
        return published
    return quantizers.tree_published(q, audit.release, theta_star, skip=skip)


def _chunk_statistics(plan: AuditPlan, problem: Problem, params, idx: np.ndarray, pop: Population) -> dict:
    x, y = train.replicate_data(plan.keys.train, problem, n=plan.n, index=idx)
    xo, yo = train.replicate_data(plan.keys.nonmember, problem, n=plan.n, index=idx)
    # committed to the data's device, like the embedded-target chunks' parameters: one compiled program for both
    params = jax.device_put(params, x.sharding)
    xs, ys, params_s = swapped_fit(plan, problem, x, y, idx)
    opts = plan.indicator

    def one(j, name, q):
        keys = replicate_keys(jax.random.fold_in(plan.keys.quantize, j + 1), idx)
        program = single_program(q, problem, opts)
        pop_published = _population_published(q, pop.audits[name], pop.theta_star, opts.skip)
        single, same = program(params, x, y, keys, pop_published)
        swapped = release_program(q, problem, opts)(params_s, xs, ys, keys)
        continuous = indicator.no_exponential_security(q, opts.ptq, pop.theta_star, opts.skip)
        flipped = jnp.ones_like(same) if continuous else ~same
        part = {
            f"{name}.swap_changed": _releases_differ(q, single.release, params, swapped, params_s, opts.skip),
            f"{name}.r_hat": single.r_hat,
            f"{name}.r_lo": single.r_interval[:, 0],
            f"{name}.r_hi": single.r_interval[:, 1],
            f"{name}.ok": single.ok,
            f"{name}.flip": flipped,
            f"{name}.member_loss": loss_program(problem)(single.release, x, y),
            f"{name}.nonmember_loss": loss_program(problem)(single.release, xo, yo),
        }
        for metric, values in utility_program(problem)(single.release, pop.x_test, pop.y_test).items():
            part[f"{name}.utility.{metric}"] = values
        return part

    out = {k: v for part in per_quantizer(one, plan.quantizers) for k, v in part.items()}
    for metric, values in utility_program(problem)(params, pop.x_test, pop.y_test).items():
        out[f"trained.utility.{metric}"] = values
    return out


def statistics_stage(
    plan: AuditPlan, problem: Problem, trained: Trained, pop: Population, store: Store, progress
) -> ReplicateStats:
    """The per-replicate statistics of every quantizer, chunk by chunk through the store."""
    parts = []
    for c, (start, stop) in enumerate(plan.chunks()):
        idx = np.arange(start, stop)

        def compute(idx=idx, c=c):
            return _chunk_statistics(plan, problem, trained.params(c), idx, pop)

        parts.append(store.get_or_compute(f"stats-{c}", compute))
        progress("statistics", c + 1)
    return ReplicateStats({k: np.concatenate([u[k] for u in parts]) for k in parts[0]})
