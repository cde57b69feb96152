"""Stage 5 of the audit: the attacks (theory.md section 7).

- LOSS on the fresh-data replicates (their scores come from the statistics stage);
- LiRA, online and offline, on the embedded-target design: ``lira_replicates`` more models, each trained on a random
  half of ``2k`` fixed targets plus ``n - k`` fresh points, Gaussians fitted on half of them (shadows), the other
  half attacked;
- optionally the classic pool design (:func:`pool_design_scores`), reported apart as ``lira_pool``: a different
  game, whose advantage bounds nothing.

An attack that cannot be held out at the audit's sizes (theory.md section 10: too few replicates, targets or
shadows) is reported as not run, with its reason, and takes no share of the bracket's Bonferroni split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax import attacks, stats, train
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import Problem
from qmis_jax.store import Store

from ._plan import EMBEDDED_ATTACKS, SECTION1_ATTACKS, AuditPlan
from ._population import Population
from ._programs import loss_program, per_quantizer, release_program, replicate_keys
from ._statistics import ReplicateStats

LIRA_ATTACKS = ("lira", "lira_offline")
RMIA_ATTACKS = ("rmia", "rmia_offline")
RMIA_POPULATION = 512  # fresh population points z of RMIA: its scores lie on the grid k / Z


@functools.lru_cache(maxsize=64)
def _lira_data_program(problem, n: int, k: int):
    """jit(vmap) of the embedded-target training sets: replicate ``i``'s ``k`` in-targets, then ``n - k`` fresh
    points ``problem.sample(fold_in(key, i), n - k)`` (compiled once per problem and sizes)."""

    def one(key, targets_x, targets_y, membership_row, i):
        order = jnp.argsort(~membership_row, stable=True)[:k]
        xf, yf = problem.sample(jax.random.fold_in(key, i), n - k)
        return jnp.concatenate([targets_x[order], xf]), jnp.concatenate([targets_y[order], yf])

    return jax.jit(jax.vmap(one, in_axes=(None, None, None, 0, 0)))


class Embedded(NamedTuple):
    """The embedded-target design's outputs per quantizer: LiRA statistics ``(R, 2k)``, log-likelihoods of the
    targets ``(R, 2k)`` and of ``RMIA_POPULATION`` fresh population points ``(R, Z)`` (RMIA), the membership."""

    scores: dict[str, np.ndarray]
    log_px: dict[str, np.ndarray]
    log_pz: dict[str, np.ndarray]
    membership: np.ndarray


def embedded_target_scores(plan: AuditPlan, problem: Problem, pop: Population, store: Store, progress) -> Embedded:
    """Every quantizer's releases on the targets (and on fresh population points), with the membership.

    The releases come from the same compiled release program as the swap coupling of the fresh-data statistics
    (same shapes), so the embedded-target design compiles nothing new per quantizer."""
    n, k = plan.n, plan.lira_targets
    k_targets, k_member, k_fresh, k_fit = jax.random.split(plan.keys.lira, 4)
    tx, ty = problem.sample(k_targets, 2 * k)
    zx, zy = problem.sample(jax.random.fold_in(plan.keys.lira, 11), RMIA_POPULATION)
    membership = np.asarray(
        attacks.embedded_target_membership(k_member, replicates=plan.lira_replicates, targets=2 * k)
    )
    make = _lira_data_program(problem, n, k)
    parts = []
    for c, (start, stop) in enumerate(plan.chunks(plan.lira_replicates)):

        def chunk(start=start, stop=stop):
            idx = np.arange(start, stop)
            x, y = make(k_fresh, tx, ty, jnp.asarray(membership[start:stop]), jnp.asarray(idx, jnp.uint32))
            # on one device, like the fresh-data chunks' parameters, so the compiled programs are shared
            fit = train.fit_data(k_fit, problem, x, y, start=start, **plan.fit_kwargs)
            params = jax.device_put(fit.params, x.sharding)

            def one(j, label, q):
                keys = replicate_keys(jax.random.fold_in(plan.keys.quantize, 1000 + j), idx)
                release = release_program(q, problem, plan.indicator)(params, x, y, keys)
                loss_t = loss_program(problem, True)(release, tx, ty)
                return {
                    f"{label}.score": attacks.score_from_loss(loss_t, problem.task),
                    f"{label}.log_px": attacks.rmia_probability(loss_t, task=problem.task),
                    f"{label}.log_pz": attacks.rmia_probability(
                        loss_program(problem, True)(release, zx, zy), task=problem.task
                    ),
                }

            return {key: v for part in per_quantizer(one, plan.quantizers) for key, v in part.items()}

        parts.append(store.get_or_compute(f"lira-{c}", chunk))
        progress("lira", c + 1)

    def joined(field):
        return {name: np.concatenate([u[f"{name}.{field}"] for u in parts]) for name in plan.quantizers}

    return Embedded(joined("score"), joined("log_px"), joined("log_pz"), membership)


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
    membership = np.asarray(attacks.pool_membership(k_member, replicates=replicates, pool=px.shape[0]))

    def compute():
        weights = jnp.asarray(membership, px.dtype)
        res = train.fit(k_fit, problem, px, py, weights=weights, **fit_kwargs)

        def one(j, name, q):
            keys = replicate_keys(jax.random.fold_in(key_quantize, 2000 + j), np.arange(replicates))
            release = release_program(q, problem, indicator, shared=True)(res.params, px, py, weights, keys)
            return attacks.score_from_loss(loss_program(problem, True)(release, px, py), problem.task)

        return dict(zip(quantizers, per_quantizer(one, quantizers)))

    return store.get_or_compute("lira_pool", compute), membership


class Scores(NamedTuple):
    """One attack's scores on one quantizer's releases (higher = member), one entry per attacked pair, with the
    replicate and example (or target) number of each pair."""

    member: np.ndarray
    nonmember: np.ndarray
    member_ids: np.ndarray  # (pairs, 2): replicate, example or target
    nonmember_ids: np.ndarray


def _matrix_scores(matrix: np.ndarray, membership: np.ndarray, rows: np.ndarray) -> Scores:
    """Pairs of an embedded-target score matrix restricted to the attacked ``rows``."""
    m, mem = np.asarray(matrix)[rows], np.asarray(membership, bool)[rows]
    r, t = np.meshgrid(np.flatnonzero(rows), np.arange(m.shape[1]), indexing="ij")
    ids = np.stack([r, t], axis=-1)
    return Scores(m[mem], m[~mem], ids[mem], ids[~mem])


def _fresh_scores(member: np.ndarray, nonmember: np.ndarray) -> Scores:
    """Pairs of the fresh-data design: ``(R, n)`` member and non-member scores."""

    def ids(a):
        r, j = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
        return np.stack([r.ravel(), j.ravel()], axis=-1)

    return Scores(np.ravel(member), np.ravel(nonmember), ids(member), ids(nonmember))


def _per_replicate_epsilon(key, sc: Scores, level: float = 0.95) -> dict[str, Any]:
    """An epsilon lower bound from one member and one non-member decision per replicate (pairs of one replicate
    share its release, theory.md section 7): the rule is chosen on the pairs of the first half of the replicates and
    applied to the first member and first non-member pair of each replicate of the other half."""
    reps = np.unique(sc.member_ids[:, 0])
    if reps.size < 4:
        return {"epsilon": None, "replicates": int(reps.size)}
    select = reps[: reps.size // 2]
    sel_m, sel_n = np.isin(sc.member_ids[:, 0], select), np.isin(sc.nonmember_ids[:, 0], select)
    # only the in-sample rule (threshold, direction) is read, which no key changes
    rule = attacks.attack_metrics(key, sc.member[sel_m], sc.nonmember[sel_n])
    t, direction = rule.threshold, rule.direction

    def first(scores, ids):
        keep = ~np.isin(ids[:, 0], select)
        _, where = np.unique(ids[keep, 0], return_index=True)
        return scores[keep][where]

    flag = (lambda v: v >= t) if direction > 0 else (lambda v: v < t)
    m, nm = first(sc.member, sc.member_ids), first(sc.nonmember, sc.nonmember_ids)
    bound = attacks.epsilon_lower_bound(
        float(np.mean(flag(m))), float(np.mean(flag(nm))), n_members=m.size, n_nonmembers=nm.size, level=level
    )
    return {"epsilon": float(bound.epsilon), "replicates": int(m.size), "level": level}


def _with_roc_extras(key, metrics: dict[str, Any], sc: Scores) -> dict[str, Any]:
    """The jax_privacy-compatible convex-hull AUC, the TPR at 0% FPR and the per-replicate epsilon bound (``key``:
    the split of its rule's metrics, of which only the in-sample rule is read)."""
    metrics["auc_convex_hull"] = attacks.auc_convex_hull(sc.member, sc.nonmember)
    metrics["tpr_at_0pct_fpr"] = float(attacks.tpr_at_fpr(sc.member, sc.nonmember, fpr=0.0))
    metrics["epsilon_lower_bound"] = _per_replicate_epsilon(key, sc)
    return metrics


def _rmia(emb: Embedded, name: str, shadow, online: bool, key, bound_level) -> tuple[dict, np.ndarray]:
    """RMIA of one quantizer (offline: its scaling ``a`` tuned on the shadow replicates), its metrics and matrix."""
    args = (emb.log_px[name], emb.log_pz[name], emb.membership)
    a = 1.0 if online else attacks.rmia_tune_a(*args, shadow=shadow)[0]
    matrix = np.asarray(attacks.rmia_scores(*args, shadow, online=online, a=a))
    rows = ~np.asarray(shadow, bool)
    metrics = attacks.attack_metrics_embedded(key, matrix[rows], emb.membership[rows], bound_level=bound_level)
    out = metrics.to_dict()
    out["a"] = None if online else float(a)
    return out, matrix


# fields an attack's entry carries besides AttackMetrics.to_dict(): None in the entry of an attack that did not run
ROC_EXTRAS = ("auc_convex_hull", "tpr_at_0pct_fpr", "epsilon_lower_bound")
EXTRA_FIELDS = {
    "loss": ROC_EXTRAS,
    "lira": (*ROC_EXTRAS, "fallbacks", "fixed_variance"),
    "lira_offline": (*ROC_EXTRAS, "fallbacks", "fixed_variance"),
    "rmia": (*ROC_EXTRAS, "a"),
    "rmia_offline": (*ROC_EXTRAS, "a"),
    "lira_pool": ("fallbacks", "fixed_variance"),
}

# an attack ready to run on one quantizer: bound level -> (metrics, raw Scores or None); raises AttackNotRun
Run = Callable[[float], tuple[dict[str, Any], Scores | None]]


def _loss_run(plan: AuditPlan, per_rep: ReplicateStats, name: str) -> Run:
    """LOSS on the fresh-data replicates of one quantizer (held out by replicate)."""
    m, nm = attacks.loss_attack(per_rep.of(name, "member_loss"), per_rep.of(name, "nonmember_loss"))
    key, k_epsilon = jax.random.fold_in(plan.keys.nonmember, 7), jax.random.fold_in(plan.keys.nonmember, 8)

    def run(bound_level):
        metrics = attacks.attack_metrics_by_replicate(key, m, nm, bound_level=bound_level)
        sc = _fresh_scores(np.asarray(m), np.asarray(nm))
        return _with_roc_extras(k_epsilon, metrics.to_dict(), sc), sc

    return run


def _embedded_runs(plan: AuditPlan, emb: Embedded, name: str) -> dict[str, Run]:
    """LiRA and RMIA (online and offline) of one quantizer on the embedded-target design, as the plan asks."""
    shadow = np.asarray(attacks.shadow_mask(plan.lira_replicates, shadows=plan.lira_replicates // 2))
    key, k_epsilon = jax.random.fold_in(plan.keys.lira, 7), jax.random.fold_in(plan.keys.lira, 8)

    def make(attack):
        def run(bound_level):
            if attack in LIRA_ATTACKS:
                metrics, matrix = attacks.lira_metrics_with_matrix(
                    key,
                    emb.scores[name],
                    emb.membership,
                    shadow=shadow,
                    online=attack == "lira",
                    bound_level=bound_level,
                )
            else:
                metrics, matrix = _rmia(emb, name, shadow, attack == "rmia", key, bound_level)
            sc = _matrix_scores(matrix, emb.membership, ~shadow)
            return _with_roc_extras(k_epsilon, metrics, sc), sc

        return run

    return {a: make(a) for a in plan.runnable_attacks if a in EMBEDDED_ATTACKS}


def run_attacks(runs: dict[str, Run], planned: int) -> tuple[dict[str, Any], dict[str, Scores], dict[str, str]]:
    """Run one quantizer's attacks with the Bonferroni share of the attacks that ran (theory.md section 10).

    Each section-1 attack's held-out lower limit is computed at ``bracket_levels(J)[1]``. ``J`` is first the
    number of attacks the sizes allow (``planned``); an attack whose held-out split turns out impossible on the
    membership design (:class:`~qmis_jax.attacks.AttackNotRun`) is dropped and, when ``J`` shrinks, the others are
    computed again at the level of the attacks that ran. Which attacks run depends on the design only, never on
    the scores, so the bracket stays valid.

    Args:
      runs: attack name -> :data:`Run`, in report order.
      planned: the number of section-1 attacks among ``runs``.

    Returns:
      ``(metrics, raw, not_run)``: the metrics of the attacks that ran, their raw scores, and the reason of each
      attack that did not.
    """
    level = stats.bracket_levels(max(1, planned))[1]
    done: dict[str, tuple[dict[str, Any], Scores | None]] = {}
    not_run: dict[str, str] = {}
    for attack, run in runs.items():
        try:
            done[attack] = run(level)
        except attacks.AttackNotRun as err:
            not_run[attack] = str(err)
    ran = [a for a in done if a in SECTION1_ATTACKS]
    final = stats.bracket_levels(max(1, len(ran)))[1]
    if final != level:
        done.update({a: runs[a](final) for a in ran})
    metrics = {a: {"ran": True, **m} for a, (m, _) in done.items()}
    raw = {a: sc for a, (_, sc) in done.items() if sc is not None}
    return metrics, raw, not_run


def attack_stage(
    plan: AuditPlan, problem: Problem, pop: Population, per_rep: ReplicateStats, store: Store, progress
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Scores]]]:
    """``{quantizer: {attack: metrics}}`` for the attacks the plan asks for, and their raw :class:`Scores`.

    An attack that cannot be held out at the audit's sizes (``plan.not_run``, or found so on the membership design)
    keeps its entry with ``"ran": False``, its ``"reason"`` and every numeric field None
    (:func:`~qmis_jax.attacks.not_run_dict`); it enters no bracket limit and takes no Bonferroni share. The others
    carry ``"ran": True``. The embedded-target design is trained only when one of its attacks can run."""
    runnable = plan.runnable_attacks
    runs: dict[str, dict[str, Run]] = {name: {} for name in plan.quantizers}
    if "loss" in runnable:
        for name in plan.quantizers:
            runs[name]["loss"] = _loss_run(plan, per_rep, name)
    if any(a in EMBEDDED_ATTACKS for a in runnable):
        emb = embedded_target_scores(plan, problem, pop, store, progress)
        for name in plan.quantizers:
            runs[name].update(_embedded_runs(plan, emb, name))
    if "lira_pool" in runnable:
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
        shadow = attacks.shadow_mask(plan.lira_replicates, shadows=plan.lira_replicates // 2)
        for name in plan.quantizers:

            def pool_run(_level, name=name):  # a different game: no bound, no share of the bracket
                key = jax.random.fold_in(plan.keys.pool, 7)
                return attacks.lira_metrics(key, scores[name], membership, shadow=shadow, pool=True), None

            runs[name]["lira_pool"] = pool_run
    results: dict[str, dict[str, Any]] = {}
    raw: dict[str, dict[str, Scores]] = {}
    for name in plan.quantizers:
        planned = sum(a in SECTION1_ATTACKS for a in runs[name])
        metrics, raw[name], not_run = run_attacks(runs[name], planned)
        not_run = {**plan.not_run, **not_run}
        results[name] = {
            a: metrics[a] if a in metrics else attacks.not_run_dict(not_run[a], EXTRA_FIELDS.get(a, ()))
            for a in plan.attacks
        }
    return results, raw
