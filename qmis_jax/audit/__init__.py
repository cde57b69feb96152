"""The audit: a problem, a set of quantizers and many shadow replicates -> an :class:`AuditReport`.

:func:`audit` is a pipeline of stages, each a function whose NamedTuple result the next one takes::

    plan        check arguments, size chunks from the memory budget, split the key      -> AuditPlan
    train       fresh-data replicates, chunk by chunk                                   -> Trained
    population  theta*, each quantizer's population release, r and asymptotic MIS      -> Population
    statistics  per replicate: release, r_hat, flip, LOSS scores, utility              -> ReplicateStats
    attacks     LOSS; LiRA on embedded targets; optionally the pool design; those      -> {quantizer: {attack: ...}}
                the sizes rule out are reported as not run, with the reason
    report      entries, paired comparisons, ranking                                   -> AuditReport

:func:`audit_model` audits one trained model and its training set (what a practitioner has): no replicates, so no
flip rate, no population indicator and no section-1 attack; the single-model indicator, the release description and,
with reference data, the pool-game attacks.

Every chunk of work goes through a :class:`~qmis_jax.store.Store`: with a :class:`~qmis_jax.store.ResultStore`,
finished chunks survive a crash and are reused on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from qmis_jax import _runtime, _watchdog
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import Problem
from qmis_jax.store import MemoryStore, Store

from ._attacks import attack_stage, pool_design_scores
from ._model import audit_model
from ._plan import ATTACKS, SECTION1_ATTACKS, AuditPlan, plan, resolve_quantizers
from ._population import Population, population_stage
from ._report import AuditReport, environment, report_stage
from ._statistics import ReplicateStats, statistics_stage
from ._train import Trained, train_replicates

__all__ = [
    "ATTACKS",
    "SECTION1_ATTACKS",
    "AuditPlan",
    "AuditReport",
    "Population",
    "ReplicateStats",
    "Trained",
    "audit",
    "audit_model",
    "environment",
    "pool_design_scores",
    "resolve_quantizers",
]


def audit(
    key: jax.Array,
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
    population_max: int | None = None,
    star_size: int | None = None,
    test_size: int = 10_000,
    lira_replicates: int | None = None,
    lira_targets: int | None = None,
    tol: float = 1e-6,
    max_steps: int | None = None,
    max_sweeps: int | None = None,
    skip=None,
    z: float = 1.96,
    n_boot: int = 2000,
    store: Store | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> AuditReport:
    """Audit quantizers on ``replicates`` shadow models of ``problem`` trained on ``n`` points each.

    The stages are listed in the module docstring; theory.md sections 4-7 define the quantities.

    Args:
      key: PRNG key; everything is a deterministic function of it (replicate ``i`` uses ``fold_in``), whatever
        the chunking.
      problem: a :class:`~qmis_jax.problems.Problem`.
      quantizers: preset names, Quantizer objects, or a dict name -> either.
      n: training-set size per replicate, at least 2.
      replicates: number of fresh-data replicates ``R`` (flip rates, ``r_single``, LOSS attack).
      ptq: ``"loss"`` (loss-minimising PTQ, section 3(a)) or ``"rtn"`` (round-to-nearest, section 3(b)).
      method: ``"gaussian"`` or ``"cramer"`` rates (section 4).
      attacks: any of ``"loss"`` (fresh-data design), ``"lira"`` / ``"lira_offline"`` and ``"rmia"`` /
        ``"rmia_offline"`` (embedded-target design, sharing its shadow replicates; section-1 games that enter the
        bracket), and ``"lira_pool"`` (pool design, a different game, reported apart). An attack that cannot be
        held out at these sizes (LOSS: fewer than 4 replicates; LiRA and RMIA: fewer than 4 targets, i.e.
        ``lira_targets < 2``, which is the default below n = 20, or fewer than 4 attacked replicates) is reported
        with ``"ran": false`` and its ``"reason"``, its numbers null; it enters no limit of the bracket and takes no
        share of its Bonferroni split (theory.md section 10).
      chunk_size: replicates per chunk (default: from ``memory_budget``).
      memory_budget: bytes a chunk may use (default 2 GiB); refused when one replicate alone needs more (rough
        estimate). The report's ``diagnostics`` record it with the chunk size and the peak memory.
      population_size: size of each of the two large fresh samples of the population quantities, one to choose the
        loss-PTQ release, one to start estimating its gaps (default ``max(50 n, 20000)``). The gap sample then
        grows by chunks of this size until the predicted flip's relative standard error is at most 10% wherever
        ``sqrt(n) c_min <= 3.5`` (the standard error of ``sqrt(n) c_k`` is about ``sqrt(n / m)`` for ``m`` points).
      population_max: the gap sample's largest size (default ``max(1500 n, population_size)``).
      star_size: size of the fresh sample ``theta*`` is fitted on where the problem has no closed form (default
        ``max(100 n, 20000)``, theory.md section 6).
      test_size: size of the common test set for utility.
      lira_replicates: replicates of the LiRA designs (default ``replicates``), half shadows, half attacked; the
        embedded-target attacks need at least 7 (4 attacked), ``lira_pool`` at least 4 (2 shadows).
      lira_targets: ``k``: ``2k`` targets, each replicate trains on ``k`` of them plus ``n - k`` fresh points
        (default ``max(1, n // 10)``).
      tol, max_steps: training tolerance and step cap (see :func:`qmis_jax.train.fit`).
      max_sweeps: cap of the loss-PTQ sweeps.
      skip: leaves left in full precision (see :func:`qmis_jax.quantizers.quantize_tree`).
      z: normal quantile of the single-model intervals.
      n_boot: bootstrap draws of the paired comparisons.
      store: a :class:`~qmis_jax.store.Store`: a :class:`~qmis_jax.store.ResultStore` (resumable) or None (in
        memory).
      progress: optional callback ``progress(stage, units_done)``.

    Returns:
      :class:`AuditReport`.
    """
    indicator = IndicatorOptions(ptq=ptq, method=method, z=z, skip=skip, max_sweeps=max_sweeps)
    the_plan = plan(
        key,
        problem,
        quantizers,
        n=n,
        replicates=replicates,
        attacks=attacks,
        indicator=indicator,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        population_size=population_size,
        population_max=population_max,
        star_size=star_size,
        test_size=test_size,
        lira_replicates=lira_replicates,
        lira_targets=lira_targets,
        tol=tol,
        max_steps=max_steps,
        n_boot=n_boot,
    )
    store = MemoryStore() if store is None else store
    _runtime.check_backend()
    _runtime.release_if_crowded()
    programs_before = _runtime.counters().compiled
    progress = _with_heartbeat(progress)
    trained = train_replicates(the_plan, problem, store, progress)
    pop = population_stage(the_plan, problem, progress)
    per_rep = statistics_stage(the_plan, problem, trained, pop, store, progress)
    attack_results, raw_scores = attack_stage(the_plan, problem, pop, per_rep, store, progress)
    return report_stage(
        the_plan, problem, trained, pop, per_rep, attack_results, raw_scores, programs_before=programs_before
    )


def _with_heartbeat(progress: Callable[[str, int], None] | None) -> Callable[[str, int], None]:
    """``progress`` that also tells the stall watchdog of the progress, and releases compiled programs when their
    memory mappings crowd the process (see :mod:`qmis_jax._runtime`)."""

    def report(stage: str, done: int) -> None:
        _watchdog.beat(f"{stage} {done}")
        _runtime.release_if_crowded()
        if progress is not None:
            progress(stage, done)

    return report
