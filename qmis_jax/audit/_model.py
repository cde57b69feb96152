"""The single-model audit: one trained model and its training set, what a practitioner has (theory.md section 6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qmis_jax import _runtime, attacks, indicator
from qmis_jax import quantizers as _quantizers
from qmis_jax._checks import check_data, check_fits_model, check_key, positive_int
from qmis_jax._version import __version__
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import Problem, utility
from qmis_jax.store import MemoryStore, Store, config_hash

from ._attacks import pool_design_scores
from ._plan import resolve_quantizers
from ._report import AuditReport, environment, finite_or_none

POOL_GAME = (
    "pool game: members and non-members come from one fixed data set, so the advantage is descriptive and bounds "
    "nothing (theory.md section 7)"
)


def _single_entry(q, problem, params, x, y, key, opts: IndicatorOptions, utility_of) -> dict[str, Any]:
    single = indicator.single_model_indicator(q, problem, params, x, y, key=key, options=opts)
    flat = indicator.no_exponential_security(q, opts.ptq, params, opts.skip)
    mis = indicator.mis_asymptotic(x.shape[0], single.delta, single.sigma, single.valid, continuous=flat)
    r_hat = float(single.r_hat)
    lo, hi = (float(v) for v in np.asarray(single.r_interval))
    entry = {
        "description": repr(q),
        "continuous": flat,
        "release": _quantizers.release_info(q, params, skip=opts.skip, ptq=opts.ptq),
        "r_population": None,
        "r_codes": finite_or_none(single.r_codes),
        "r_hat": r_hat,
        "r_hat_interval": [lo, hi],
        "r_single": {"mean": r_hat, "median": r_hat, "q05": lo, "q95": hi},
        "mis_asymptotic": finite_or_none(mis.mis),
        "mis_asymptotic_method": "gaussian (plug-in at the trained model)",
        "flip_rate": None,
        "asymptotic_regime": (not flat) and bool(indicator.asymptotic_regime(float(mis.sqrt_n_c_min))),
        "flip_rate_predicted": None if flat else finite_or_none(mis.flip_probability),
        "flip_union_bound": None if flat else finite_or_none(mis.flip_union_bound),
        "attacks": {},
        "mis_empirical_upper": None,
        "single_audit_ok": bool(single.ok),
        "n_moves": int(single.n_moves),
    }
    if utility_of is not None:
        entry["utility"] = {k: float(v) for k, v in utility_of(single.release).items()}
    return entry, single.release


def _loss_reference(problem, release, x, y, xr, yr, key) -> dict[str, Any]:
    """LOSS attack of one release: its training points against reference non-members (the pool game)."""
    m, nm = attacks.loss_attack(problem.batch_loss(release, x, y)[None], problem.batch_loss(release, xr, yr)[None])
    out = attacks.attack_metrics(key, m, nm).to_dict()
    out["game"] = POOL_GAME
    return out


def audit_model(
    key: jax.Array,
    problem: Problem,
    params,
    x,
    y,
    quantizers,
    *,
    reference: tuple | None = None,
    test: tuple | None = None,
    utility_fn: Callable[[Any, jax.Array, jax.Array], dict] | None = None,
    pool_replicates: int = 0,
    ptq: str = "loss",
    method: str = "gaussian",
    z: float = 1.96,
    skip=None,
    max_sweeps: int | None = None,
    memory_budget: int | None = None,
    store: Store | None = None,
) -> AuditReport:
    """Audit one trained model ``params`` and its training set ``(x, y)`` for every quantizer.

    Per quantizer (theory.md section 6): the release of ``ptq``, the single-model indicator ``r_hat`` with its
    interval (biased upward at O(1/n); one audit's view, not the population value), the plug-in asymptotic MIS
    (section 5) and, with ``test``, the release's utility. With one model there is no flip rate, no population
    indicator and no section-1 attack, so no bracket: attacks on fixed data play the pool game and are labelled so.

    Args:
      key: PRNG key (stochastic quantizers, attack splits, shadow training).
      problem: any :class:`~qmis_jax.problems.Problem` (``qj.problems.custom`` wraps a Flax NNX module).
      params: the trained model (a pytree of ``problem.init``'s structure).
      x: ``(n, ...)`` training inputs. y: ``(n,)`` targets.
      quantizers: preset names, Quantizer objects, or a dict name -> either.
      reference: optional ``(x_ref, y_ref)`` non-members from the same source: the LOSS attack of each release
        (``"loss_pool"``, the pool game).
      test: optional ``(x_test, y_test)``: utility of each release and of ``params``.
      utility_fn: ``utility_fn(params, x_test, y_test) -> {metric: value}`` (default
        :func:`qmis_jax.problems.utility`).
      pool_replicates: if > 0, that many shadow models trained on random halves of ``(x, y)`` and LiRA in the pool
        design (``"lira_pool"``, the pool game).
      ptq, method, z, skip, max_sweeps: the indicator's options (:class:`~qmis_jax.indicator.IndicatorOptions`).
      memory_budget: bytes the shadow training may use.
      store: where the shadow scores are kept (a resumable :class:`~qmis_jax.store.ResultStore`, or in memory).

    Returns:
      :class:`AuditReport` with ``replicates = 1``, ranked by ``r_hat`` (then the lower pool-attack advantage).
    """
    check_key(key)
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a qmis_jax.problems.Problem, got {type(problem).__name__}")
    opts = IndicatorOptions(ptq=ptq, method=method, z=z, skip=skip, max_sweeps=max_sweeps)
    qs = resolve_quantizers(quantizers)
    _runtime.check_backend()
    xh, yh = check_data(problem, x, y)
    check_fits_model(problem, params, xh, yh)
    if xh.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 training examples, got {xh.shape[0]}")
    pool_replicates = positive_int("pool_replicates", pool_replicates, minimum=0)
    if 0 < pool_replicates < 4:
        raise ValueError(f"pool_replicates must be 0 or at least 4, got pool_replicates={pool_replicates}")
    x, y = jnp.asarray(x), jnp.asarray(y)
    ref = test_xy = None
    if reference is not None:
        ref = tuple(jnp.asarray(a) for a in check_data(problem, *reference))
    if test is not None:
        test_xy = tuple(jnp.asarray(a) for a in check_data(problem, *test))
    utility_fn = utility_fn or (lambda p, xt, yt: utility(problem, p, xt, yt))
    utility_of = None if test_xy is None else (lambda p: utility_fn(p, *test_xy))
    k_q, k_ref, k_pool = jax.random.split(key, 3)
    entries = {}
    for j, (name, q) in enumerate(qs.items()):
        qkey = jax.random.fold_in(k_q, j) if q.stochastic else None
        entries[name], release = _single_entry(q, problem, params, x, y, qkey, opts, utility_of)
        if ref is not None:
            entries[name]["attacks"]["loss_pool"] = _loss_reference(problem, release, x, y, *ref, k_ref)
    if pool_replicates:
        _pool_lira(k_pool, problem, qs, x, y, entries, opts, pool_replicates, memory_budget, store or MemoryStore())
    return _model_report(problem, params, qs, entries, opts, x.shape[0], utility_of)


def _pool_lira(key, problem, qs, x, y, entries, opts, replicates, memory_budget, store) -> None:
    half = x.shape[0] // 2
    fit_kwargs = dict(tol=1e-6, max_steps=None, chunk_size=None, memory_budget=memory_budget)
    k_scores, k_quant, k_metrics = jax.random.split(key, 3)
    scores, membership = pool_design_scores(
        k_scores,
        problem,
        qs,
        n=half,
        replicates=replicates,
        indicator=opts,
        fit_kwargs=fit_kwargs,
        store=store,
        key_quantize=k_quant,
        pool=(x[: 2 * half], y[: 2 * half]),
    )
    shadow = attacks.shadow_mask(replicates, shadows=replicates // 2)
    for name in qs:
        try:
            res = attacks.lira_metrics(k_metrics, scores[name], membership, shadow=shadow, pool=True)
            res["ran"] = True
        except attacks.AttackNotRun as err:  # too small a pool for LiRA's fits: reported, not raised
            res = attacks.not_run_dict(str(err), ("fallbacks", "fixed_variance"))
        res["game"] = POOL_GAME
        entries[name]["attacks"]["lira_pool"] = res


def _model_report(problem, params, qs, entries, opts: IndicatorOptions, n: int, utility_of) -> AuditReport:
    def pool_advantage(name):
        attacks = entries[name]["attacks"]
        return max((a["advantage"] for a in attacks.values() if a.get("advantage") is not None), default=0.0)

    ranking = sorted(qs, key=lambda nm: (-entries[nm]["r_hat"], pool_advantage(nm)))
    config = {
        "kind": "single-model audit",
        "n": n,
        "problem": problem.info(),
        "quantizers": {nm: repr(q) for nm, q in qs.items()},
        **{k: v for k, v in opts.estimator_kwargs().items() if k != "skip"},
        "skip": repr(opts.skip),
    }
    data = {
        "version": __version__,
        "kind": "single-model audit",
        "n": n,
        "replicates": 1,
        "problem": problem.info(),
        "config_hash": config_hash(config),
        "ptq": opts.ptq,
        "method": opts.method,
        "quantizers": entries,
        "ranking": ranking,
        "ranking_by": "single-model indicator r_hat, then the lower pool-game attack advantage",
        "trained_utility": None if utility_of is None else {k: float(v) for k, v in utility_of(params).items()},
        "environment": environment(),
        "config": config,
    }
    return AuditReport(data)
