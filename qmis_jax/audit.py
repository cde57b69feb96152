"""One audit: a problem, a set of quantizers and many shadow replicates -> an :class:`AuditReport`.

``audit`` runs the population study of theory.md section 6 and the attacks of section 7 on the same replicates:

1. train ``replicates`` models, replicate ``i`` on its own fresh data set (fresh-data design), in chunks;
2. estimate ``theta*`` (known in closed form, else the replicate mean) and, on a large fresh sample, the population
   release of every quantizer, its indicator ``r_population`` and the asymptotic MIS (sections 4-5);
3. per replicate and quantizer: the released model (``ptq``), the single-model indicator ``r_hat`` (its spread is
   ``r_single``), whether the release differs from the population release (Monte Carlo flip rate), the LOSS
   attack's member and non-member scores, and the utility on a common test set;
4. LiRA on the embedded-target design (section 7): ``lira_replicates`` more models, each trained on a random half of
   ``2k`` fixed targets plus fresh points; per-target Gaussians fitted on half of them (shadows), the other half
   attacked. Optionally the classic pool design, reported apart as ``lira_pool`` (a different game);
5. paired comparisons of the quantizers across replicates (paired bootstrap) and the ranking.

Every chunk of work goes through a store (``store.get_or_compute``): with a
:class:`~qmis_jax.studies.store.ResultStore`, finished chunks survive a crash and are reused on resume.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from qmis_jax import quantizers as _quantizers
from qmis_jax import stats, train
from qmis_jax._version import __version__
from qmis_jax.problems import Problem, utility
from qmis_jax.studies.store import MemoryStore, config_hash

Array = jax.Array
PyTree = Any

ATTACKS = ("loss", "lira", "lira_offline", "lira_pool")
SECTION1_ATTACKS = ("loss", "lira", "lira_offline")


def resolve_quantizers(quantizers) -> dict[str, _quantizers.Quantizer]:
    """Normalise ``quantizers`` (preset names, Quantizer objects, or a dict name -> either) to a dict."""
    if isinstance(quantizers, (str, _quantizers.Quantizer)):
        quantizers = [quantizers]
    if isinstance(quantizers, Mapping):
        items = list(quantizers.items())
    elif isinstance(quantizers, Sequence):
        items = []
        for q in quantizers:
            if isinstance(q, str):
                items.append((q, q))
            elif isinstance(q, _quantizers.Quantizer):
                items.append((q.name, q))
            else:
                raise ValueError(f"quantizers must hold preset names or Quantizer objects, got {q!r}")
    else:
        raise ValueError(
            f"quantizers must be a preset name, a Quantizer, a sequence of them or a dict, got {type(quantizers)}"
        )
    if not items:
        raise ValueError("quantizers must name at least one quantizer")
    out: dict[str, _quantizers.Quantizer] = {}
    for name, q in items:
        if isinstance(q, str):
            q = _quantizers.get(q)
        if not isinstance(q, _quantizers.Quantizer):
            raise ValueError(f"quantizers[{name!r}] must be a preset name or a Quantizer, got {q!r}")
        if name in out:
            raise ValueError(f"quantizers names must be unique, {name!r} appears twice")
        out[str(name)] = q
    return out


def environment() -> dict[str, Any]:
    """Versions and devices, recorded in every report."""
    devices = jax.local_devices()
    return {
        "qmis_jax": __version__,
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "platform": devices[0].platform,
        "x64": bool(jax.config.jax_enable_x64),
    }


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The result of :func:`audit`: a JSON-serialisable dictionary in the report schema of design.md.

    Use ``report.to_dict()`` for the full dictionary, ``report.ranking`` for the order (most secure first),
    ``report["int4"]`` for one quantizer's entry and ``print(report)`` for a table.
    """

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dictionary (a deep copy)."""
        import copy

        return copy.deepcopy(self.data)

    @property
    def ranking(self) -> list[str]:
        return list(self.data["ranking"])

    @property
    def quantizers(self) -> dict[str, dict[str, Any]]:
        return self.data["quantizers"]

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.data["quantizers"][name]

    def __str__(self) -> str:
        from qmis_jax.studies.markdown import quantizer_table

        return "\n".join(quantizer_table(self.data))


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return int(value)


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "q05": float("nan"), "q95": float("nan")}
    return {
        "mean": float(np.mean(v)),
        "median": float(np.median(v)),
        "q05": float(np.quantile(v, 0.05)),
        "q95": float(np.quantile(v, 0.95)),
    }


def _float(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, total)) for s in range(0, total, size)]


@functools.lru_cache(maxsize=256)
def _pool_release_program(q, problem, ptq: str, skip, max_sweeps):
    """jit(vmap) of the per-replicate release on one shared pool with per-replicate membership weights."""

    def one(params, x, y, w, key):
        if ptq == "rtn":
            return stats.ptq_rtn(q, params, key=key, skip=skip)
        release, _ = stats.ptq_loss(
            q,
            problem.loss,
            params,
            x,
            y,
            key=key,
            skip=skip,
            weights=w,
            max_sweeps=max_sweeps,
            design=problem.design,
            margin_loss=problem.margin_loss,
            penalty=problem.penalty,
        )
        return release

    return jax.jit(jax.vmap(one, in_axes=(0, None, None, 0, 0)))


@functools.lru_cache(maxsize=256)
def _single_program(q, problem, ptq: str, method: str, skip, z: float, max_sweeps):
    """jit(vmap) over replicates of the single-model audit, with each release's codes compared to ``pop_codes``
    (one program per quantizer, shared by the fresh-data statistics and the embedded-target LiRA chunks)."""

    def one(params, x, y, key, pop_codes):
        single = stats.single_model_indicator(
            q, problem, params, x, y, ptq=ptq, method=method, z=z, key=key, skip=skip, max_sweeps=max_sweeps
        )
        codes = _quantizers.tree_codes(q, single.release, params, skip=skip)
        same = functools.reduce(
            jnp.logical_and,
            jax.tree_util.tree_leaves(jax.tree.map(lambda a, b: jnp.all(a == b), codes, pop_codes)),
        )
        return single, same

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))


@functools.lru_cache(maxsize=64)
def _loss_program(problem, shared: bool = False):
    """jit(vmap) of per-example losses of stacked params on per-replicate (or shared) data."""
    data_axis = None if shared else 0
    return jax.jit(jax.vmap(problem.batch_loss, in_axes=(0, data_axis, data_axis)))


@functools.lru_cache(maxsize=64)
def _utility_program(problem):
    return jax.jit(jax.vmap(lambda p, x, y: utility(problem, p, x, y), in_axes=(0, None, None)))


def _per_quantizer(fn: Callable[[int, str, Any], Any], qs: Mapping[str, Any]) -> list[Any]:
    """``[fn(j, name, q) for j, (name, q) in enumerate(qs.items())]``, run on a few threads.

    Each quantizer has its own compiled programs; compiling them is single-threaded and dominates small audits, so
    overlapping the quantizers' compilations (and runs) uses the cores XLA leaves idle. The results do not depend on
    the number of threads (each call is a pure function of its own keys)."""
    items = list(enumerate(qs.items()))
    workers = min(len(items), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [fn(j, name, q) for j, (name, q) in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: fn(item[0], *item[1]), items))


def _keys(key: Array, idx: np.ndarray) -> Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))


def _stochastic_key(q, key: Array):
    return key if q.stochastic else None


def audit(
    key: Array,
    problem: Problem,
    quantizers,
    *,
    n: int,
    replicates: int,
    ptq: str = "loss",
    method: str = "gaussian",
    attacks: Sequence[str] = ("loss", "lira"),
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    population_size: int | None = None,
    test_size: int = 10_000,
    lira_replicates: int | None = None,
    lira_targets: int | None = None,
    tol: float = 1e-6,
    max_steps: int | None = None,
    max_sweeps: int | None = None,
    skip=None,
    z: float = 1.96,
    n_boot: int = 2000,
    store=None,
    progress: Callable[[str, int], None] | None = None,
) -> AuditReport:
    """Audit quantizers on ``replicates`` shadow models of ``problem`` trained on ``n`` points each.

    See the module docstring for the steps; theory.md sections 4-7 for the quantities.

    Args:
      key: PRNG key; everything is a deterministic function of it (replicate ``i`` uses ``fold_in``), whatever
        the chunking.
      problem: a :class:`~qmis_jax.problems.Problem`.
      quantizers: preset names, Quantizer objects, or a dict name -> either.
      n: training-set size per replicate.
      replicates: number of fresh-data replicates ``R`` (flip rates, ``r_single``, LOSS attack).
      ptq: ``"loss"`` (loss-minimising PTQ, section 3(a)) or ``"rtn"`` (round-to-nearest, section 3(b)).
      method: ``"gaussian"`` or ``"cramer"`` rates (section 4).
      attacks: any of ``"loss"``, ``"lira"`` (online), ``"lira_offline"`` (embedded-target design, section 1
        games) and ``"lira_pool"`` (pool design, a different game, reported apart).
      chunk_size: replicates per chunk (default: from ``memory_budget``).
      memory_budget: bytes a chunk may use (default 2 GiB); refused when one replicate alone needs more (rough
        estimate). The report's ``diagnostics`` record it with the chunk size and the peak memory.
      population_size: size of the large fresh sample for the population quantities (default ``max(20 n, 20000)``).
      test_size: size of the common test set for utility.
      lira_replicates: replicates of the LiRA designs (default ``replicates``), half shadows, half attacked.
      lira_targets: ``k``: ``2k`` targets, each replicate trains on ``k`` of them plus ``n - k`` fresh points
        (default ``max(1, n // 10)``).
      tol, max_steps: training tolerance and step cap (see :func:`qmis_jax.train.fit`).
      max_sweeps: cap of the loss-PTQ sweeps.
      skip: leaves left in full precision (see :func:`qmis_jax.quantizers.quantize_tree`).
      z: normal quantile of the single-model intervals.
      n_boot: bootstrap draws of the paired comparisons.
      store: a :class:`~qmis_jax.studies.store.ResultStore` (resumable) or None (in memory).
      progress: optional callback ``progress(stage, units_done)``.

    Returns:
      :class:`AuditReport`.
    """
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a qmis_jax.problems.Problem, got {type(problem).__name__}")
    qs = resolve_quantizers(quantizers)
    n = _check_int("n", n)
    replicates = _check_int("replicates", replicates)
    if ptq not in stats.PTQ_METHODS:
        raise ValueError(f"ptq must be one of {stats.PTQ_METHODS}, got ptq={ptq!r}")
    if method not in stats.MIS_METHODS:
        raise ValueError(f"method must be one of {stats.MIS_METHODS}, got method={method!r}")
    attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"attacks must be among {ATTACKS}, got {a!r}")
    population_size = _check_int("population_size", max(20 * n, 20_000) if population_size is None else population_size)
    test_size = _check_int("test_size", test_size)
    lira_replicates = _check_int(
        "lira_replicates", replicates if lira_replicates is None else lira_replicates, minimum=4
    )
    k_targets = _check_int("lira_targets", max(1, n // 10) if lira_targets is None else lira_targets)
    if k_targets >= n:
        raise ValueError(f"lira_targets must be smaller than n={n}, got lira_targets={k_targets}")
    from qmis_jax import _memory

    budget_given = memory_budget is not None
    memory_budget = _check_int("memory_budget", memory_budget if budget_given else 2 * 2**30)
    store = MemoryStore() if store is None else store
    progress = progress or (lambda stage, done: None)

    x_spec = jax.eval_shape(lambda k: problem.sample(k, n), jax.random.key(0))[0]
    dx = int(np.prod(x_spec.shape[1:]))
    theta_init, unravel = ravel_pytree(problem.init(jax.random.key(0)))
    p = theta_init.size
    per = _memory.replicate_bytes(n=n, p=p, dx=dx)
    if per > memory_budget and (budget_given or chunk_size is None):
        raise ValueError(
            f"memory_budget={memory_budget} bytes ({memory_budget / _memory.MIB:.3g} MiB) cannot hold one replicate, "
            f"which needs about {per / _memory.MIB:.3g} MiB at n={n} with {p} parameters; raise memory_budget or "
            "lower n"
        )
    if chunk_size is None:
        chunk_size = max(1, min(replicates, memory_budget // per))
    chunk_size = _check_int("chunk_size", chunk_size)

    k_train, k_out, k_pop, k_test, k_lira, k_boot, k_pool, k_q = jax.random.split(key, 8)
    fit_opts = dict(tol=tol, max_steps=max_steps, chunk_size=chunk_size, memory_budget=memory_budget)

    # 1. Fresh-data replicates, chunk by chunk.
    chunks = _chunks(replicates, chunk_size)
    trained = []
    for c, (start, stop) in enumerate(chunks):

        def train_chunk(start=start, stop=stop):
            res = train.fit_fresh(k_train, problem, n=n, replicates=stop - start, start=start, **fit_opts)
            theta = jax.vmap(lambda prm: ravel_pytree(prm)[0])(res.params)
            return {"theta": theta, "grad_norm": res.grad_norm, "converged": res.converged}

        trained.append(store.get_or_compute(f"train-{c}", train_chunk))
        progress("train", c + 1)
    theta_all = np.concatenate([t["theta"] for t in trained])
    grad_norm = np.concatenate([t["grad_norm"] for t in trained])
    converged = np.concatenate([t["converged"] for t in trained])

    # 2. Population quantities.
    if problem.population is not None:
        theta_star = problem.population(k_pop)
        star_source = "closed form"
    else:
        theta_star = unravel(jnp.asarray(theta_all.mean(axis=0), theta_init.dtype))
        star_source = f"mean of {replicates} replicates"
    x_big, y_big = problem.sample(jax.random.fold_in(k_pop, 1), population_size)
    x_test, y_test = problem.sample(k_test, test_size)

    def population(j, name, q):
        return stats.population_indicator(
            q,
            problem,
            theta_star,
            x_big,
            y_big,
            n=n,
            ptq=ptq,
            method=method,
            key=_stochastic_key(q, jax.random.fold_in(k_q, 0)),
            skip=skip,
            max_sweeps=max_sweeps,
        )

    pops = dict(zip(qs, _per_quantizer(population, qs)))
    progress("population", len(pops))

    # 3. Per-replicate statistics, chunk by chunk.
    per_rep: list[dict[str, np.ndarray]] = []
    for c, (start, stop) in enumerate(chunks):

        def stats_chunk(start=start, stop=stop, c=c):
            idx = np.arange(start, stop)
            params = jax.vmap(unravel)(jnp.asarray(trained[c]["theta"], theta_init.dtype))
            x, y = train.replicate_data(k_train, problem, n=n, index=idx)
            xo, yo = train.replicate_data(k_out, problem, n=n, index=idx)

            def one(j, name, q):
                keys = _keys(jax.random.fold_in(k_q, j + 1), idx)
                prog = _single_program(q, problem, ptq, method, skip, float(z), max_sweeps)
                single, same = prog(params, x, y, keys, pops[name].codes)
                flipped = jnp.ones_like(same) if (q.continuous or (q.stochastic and ptq == "rtn")) else ~same
                part = {
                    f"{name}.r_hat": single.r_hat,
                    f"{name}.r_lo": single.r_interval[:, 0],
                    f"{name}.r_hi": single.r_interval[:, 1],
                    f"{name}.ok": single.ok,
                    f"{name}.flip": flipped,
                    f"{name}.member_loss": _loss_program(problem)(single.release, x, y),
                    f"{name}.nonmember_loss": _loss_program(problem)(single.release, xo, yo),
                }
                for metric, values in _utility_program(problem)(single.release, x_test, y_test).items():
                    part[f"{name}.utility.{metric}"] = values
                return part

            out = {k: v for part in _per_quantizer(one, qs) for k, v in part.items()}
            fp = _utility_program(problem)(params, x_test, y_test)
            for metric, values in fp.items():
                out[f"trained.utility.{metric}"] = values
            return out

        per_rep.append(store.get_or_compute(f"stats-{c}", stats_chunk))
        progress("statistics", c + 1)
    cat = {k: np.concatenate([u[k] for u in per_rep]) for k in per_rep[0]}

    # 4. LiRA designs.
    lira_results: dict[str, dict[str, Any]] = {name: {} for name in qs}
    section1_lira = [a for a in attacks if a in ("lira", "lira_offline")]
    if section1_lira:
        scores, membership = _lira_embedded(
            k_lira,
            problem,
            qs,
            n=n,
            k=k_targets,
            replicates=lira_replicates,
            ptq=ptq,
            skip=skip,
            max_sweeps=max_sweeps,
            chunk_size=chunk_size,
            fit_opts=fit_opts,
            store=store,
            progress=progress,
            key_q=k_q,
            z=z,
            method=method,
            pops=pops,
        )
        shadow = stats.shadow_mask(lira_replicates, shadows=lira_replicates // 2)
        for name in qs:
            for attack in section1_lira:
                lira_results[name][attack] = lira_metrics(
                    scores[name], membership, shadow=shadow, online=attack == "lira", key=jax.random.fold_in(k_lira, 7)
                )
    if "lira_pool" in attacks:
        scores, membership = pool_design_scores(
            k_pool,
            problem,
            qs,
            n=n,
            replicates=lira_replicates,
            ptq=ptq,
            skip=skip,
            max_sweeps=max_sweeps,
            fit_opts=fit_opts,
            store=store,
            progress=progress,
            key_q=k_q,
        )
        shadow = stats.shadow_mask(lira_replicates, shadows=lira_replicates // 2)
        for name in qs:
            lira_results[name]["lira_pool"] = lira_metrics(
                scores[name], membership, shadow=shadow, pool=True, key=jax.random.fold_in(k_pool, 7)
            )

    # 5. Assemble, compare, rank.
    entries: dict[str, dict[str, Any]] = {}
    for name, q in qs.items():
        pop = pops[name]
        flips = cat[f"{name}.flip"].astype(float)
        attack_entries: dict[str, Any] = {}
        if "loss" in attacks:
            m, nm = stats.loss_attack(cat[f"{name}.member_loss"], cat[f"{name}.nonmember_loss"])
            attack_entries["loss"] = stats.attack_metrics(m, nm, key=jax.random.fold_in(k_out, 7)).to_dict()
        attack_entries.update(lira_results[name])
        # Held-out advantages (rule chosen on one half, evaluated on the other) are unbiased for a fixed rule, so
        # 1 - advantage estimates an upper bound on the MIS; the interval's lower end gives a 95% upper bound.
        section1 = [attack_entries[a]["advantage_heldout"] for a in SECTION1_ATTACKS if a in attack_entries]
        section1_lo = [attack_entries[a]["advantage_heldout_ci"][0] for a in SECTION1_ATTACKS if a in attack_entries]
        continuous = bool(q.continuous or (q.stochastic and ptq == "rtn"))
        entries[name] = {
            "description": repr(q),
            "continuous": continuous,
            "r_population": float(pop.r),
            "r_single": _summary(cat[f"{name}.r_hat"]),
            "r_single_interval_mean": [float(np.nanmean(cat[f"{name}.r_lo"])), float(np.nanmean(cat[f"{name}.r_hi"]))],
            "mis_asymptotic": _float(pop.mis_asymptotic),
            "mis_asymptotic_method": method,
            "mis_asymptotic_applicable": bool(pop.applicable),
            "flip_rate": float(flips.mean()),
            "flip_rate_se": float(flips.std(ddof=1) / math.sqrt(flips.size)) if flips.size > 1 else float("nan"),
            "flip_rate_predicted": 1.0 if continuous else float(pop.flip_rate_predicted),
            "competitors": int(np.sum(np.asarray(pop.valid))),
            "rates_capped": int(np.sum(np.asarray(pop.capped))),
            "attacks": attack_entries,
            "mis_empirical_upper": (1.0 - max(section1)) if section1 else None,
            "mis_empirical_upper_95": (1.0 - max(section1_lo)) if section1 else None,
            "utility": {
                metric.split(".", 2)[2]: float(np.mean(cat[metric]))
                for metric in cat
                if metric.startswith(f"{name}.utility.")
            },
            "single_audits_not_ok": int(np.sum(~cat[f"{name}.ok"].astype(bool))),
        }
    if len(qs) >= 2:
        # Paired comparisons on the replicates where every quantizer's single audit is finite (NaN flags a failed
        # one, counted in single_audits_not_ok).
        r_hats = {name: cat[f"{name}.r_hat"] for name in qs}
        rows = np.all([np.isfinite(v) for v in r_hats.values()], axis=0)
        if rows.sum() < 2:
            raise ValueError(
                f"only {rows.sum()} of {rows.size} replicates have a finite single-model indicator for every "
                "quantizer; see the report's diagnostics (non-finite parameters, singular Hessians)"
            )
        r_hats = {name: v[rows] for name, v in r_hats.items()}
        ranking, table = stats.rank_quantizers(k_boot, r_hats, n_boot=n_boot)
        # Ties in the mean indicator (all releases with r = 0) are broken by the attacks: more secure first.
        mean_r = {name: float(np.mean(v)) for name, v in r_hats.items()}
        upper = {name: entries[name]["mis_empirical_upper"] for name in qs}
        ranking = sorted(ranking, key=lambda nm: (-mean_r[nm], -(upper[nm] if upper[nm] is not None else 0.0)))
        intervals = [
            {
                "better": a,
                "worse": b,
                "r_single_mean_difference": table[a][b].estimate,
                "interval": [table[a][b].lo, table[a][b].hi],
            }
            for a, b in zip(ranking[:-1], ranking[1:])
        ]
    else:
        ranking, intervals = list(qs), []
    config = {
        "n": n,
        "replicates": replicates,
        "ptq": ptq,
        "method": method,
        "attacks": list(attacks),
        "problem": problem.info(),
        "quantizers": {nm: (repr(q)) for nm, q in qs.items()},
        "population_size": population_size,
        "test_size": test_size,
        "lira_replicates": lira_replicates,
        "lira_targets": k_targets,
        "tol": tol,
        "max_steps": max_steps,
        "max_sweeps": max_sweeps,
        "z": z,
        "key": np.asarray(jax.random.key_data(key)).tolist(),
    }
    data = {
        "version": __version__,
        "n": n,
        "replicates": replicates,
        "problem": problem.info(),
        "config_hash": config_hash(config),
        "ptq": ptq,
        "method": method,
        "theta_star": star_source,
        "quantizers": entries,
        "ranking": ranking,
        "ranking_by": "mean single-model indicator r_hat over replicates (paired bootstrap intervals), ties broken "
        "by the empirical MIS upper bound of the attacks",
        "ranking_intervals": intervals,
        "trained_utility": {m.split(".", 2)[2]: float(np.mean(cat[m])) for m in cat if m.startswith("trained.")},
        "diagnostics": {
            "replicates_not_converged": int(np.sum(~converged.astype(bool))),
            "max_grad_norm": float(np.max(grad_norm)),
            "nonfinite_parameters": int(np.sum(~np.isfinite(theta_all).all(axis=1))),
            "chunk_size": chunk_size,
            "memory_budget_mib": _memory.mib(memory_budget),
            "replicate_estimate_mib": _memory.mib(per),
            "peak_rss_mib": _memory.mib(_memory.peak_rss_bytes()),
            "device_peak_mib": _memory.mib(_memory.device_peak_bytes()),
        },
        "environment": environment(),
        "config": config,
    }
    return AuditReport(data)


def _lira_train_data(key, problem, targets_x, targets_y, membership_row, i, n, k):
    """Replicate ``i`` of the embedded-target design: its ``k`` in-targets followed by ``n - k`` fresh points."""
    order = jnp.argsort(~membership_row, stable=True)[:k]
    xf, yf = problem.sample(jax.random.fold_in(key, i), n - k)
    return jnp.concatenate([targets_x[order], xf]), jnp.concatenate([targets_y[order], yf])


def _lira_embedded(
    key,
    problem,
    qs,
    *,
    n,
    k,
    replicates,
    ptq,
    skip,
    max_sweeps,
    chunk_size,
    fit_opts,
    store,
    progress,
    key_q,
    z,
    method,
    pops,
):
    """Scores ``(R, 2k)`` of every quantizer's releases on the targets, and the membership ``(R, 2k)``.

    The releases come from the same compiled program as the fresh-data statistics (same shapes), so the
    embedded-target design compiles nothing new per quantizer."""
    k_targets, k_member, k_fresh, k_fit = jax.random.split(key, 4)
    tx, ty = problem.sample(k_targets, 2 * k)
    membership = np.asarray(stats.embedded_target_membership(k_member, replicates=replicates, targets=2 * k))
    make = jax.jit(jax.vmap(lambda row, i: _lira_train_data(k_fresh, problem, tx, ty, row, i, n, k)))
    scores: dict[str, list[np.ndarray]] = {name: [] for name in qs}
    for c, (start, stop) in enumerate(_chunks(replicates, chunk_size)):

        def chunk(start=start, stop=stop):
            idx = np.arange(start, stop)
            x, y = make(jnp.asarray(membership[start:stop]), jnp.asarray(idx, jnp.uint32))
            # on one device, like the fresh-data chunks' parameters, so the compiled programs are shared
            params = jax.device_put(train.fit_data(k_fit, problem, x, y, start=start, **fit_opts).params, x.sharding)

            def one(j, label, q):
                keys = _keys(jax.random.fold_in(key_q, 1000 + j), idx)
                prog = _single_program(q, problem, ptq, method, skip, float(z), max_sweeps)
                single, _ = prog(params, x, y, keys, pops[label].codes)
                return stats.score_from_loss(_loss_program(problem, True)(single.release, tx, ty), problem.task)

            return dict(zip(qs, _per_quantizer(one, qs)))

        done = store.get_or_compute(f"lira-{c}", chunk)
        for name in qs:
            scores[name].append(done[name])
        progress("lira", c + 1)
    return {name: np.concatenate(v) for name, v in scores.items()}, membership


FIX_VARIANCE_BELOW = 64


def lira_metrics(scores, membership, *, shadow, online: bool = True, pool: bool = False, key: Array) -> dict[str, Any]:
    """LiRA on one quantizer's scores (embedded-target design, or the pool design with ``pool=True``) -> the
    :func:`~qmis_jax.stats.attack_metrics` dictionary, with the fallback counts of the fit.

    Below ``FIX_VARIANCE_BELOW`` shadow replicates every target shares one variance per side (Carlini et al. 2022
    do the same with few shadow models: per-target variances from a handful of scores hurt the test).
    """
    fix = int(np.sum(np.asarray(shadow))) < FIX_VARIANCE_BELOW
    attack = stats.lira_pool if pool else stats.lira
    result = attack(scores, membership, shadow=shadow, online=online, fix_variance=fix)
    out = stats.attack_metrics(*result, key=key).to_dict()
    out["fallbacks"] = result.fallbacks.to_dict()
    out["fixed_variance"] = fix
    return out


def pool_design_scores(
    key, problem, qs, *, n, replicates, ptq, skip, max_sweeps, fit_opts, store, progress, key_q, pool=None
):
    """The classic pool design (theory.md section 7, reported as ``lira_pool``): one pool of ``2n`` points (or the
    given ``pool``), each replicate trains on a random half. Returns each quantizer's scores ``(R, pool size)`` and
    the membership ``(R, pool size)``."""
    k_data, k_member, k_fit = jax.random.split(key, 3)
    px, py = problem.sample(k_data, 2 * n) if pool is None else (jnp.asarray(pool[0]), jnp.asarray(pool[1]))
    membership = np.asarray(stats.pool_membership(k_member, replicates=replicates, pool=px.shape[0]))

    def compute():
        weights = jnp.asarray(membership, px.dtype)
        res = train.fit(k_fit, problem, px, py, weights=weights, **fit_opts)

        def one(j, name, q):
            keys = _keys(jax.random.fold_in(key_q, 2000 + j), np.arange(replicates))
            release = _pool_release_program(q, problem, ptq, skip, max_sweeps)(res.params, px, py, weights, keys)
            return stats.score_from_loss(_loss_program(problem, True)(release, px, py), problem.task)

        return dict(zip(qs, _per_quantizer(one, qs)))

    done = store.get_or_compute("lira_pool", compute)
    progress("lira_pool", 1)
    return done, membership
