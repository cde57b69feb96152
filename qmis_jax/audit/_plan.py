"""Stage 1 of the audit: check the arguments, size the chunks, split the key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from qmis_jax import _memory
from qmis_jax import quantizers as _quantizers
from qmis_jax._checks import positive_int
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import Problem

ATTACKS = ("loss", "lira", "lira_offline", "rmia", "rmia_offline", "lira_pool")
SECTION1_ATTACKS = ("loss", "lira", "lira_offline", "rmia", "rmia_offline")
EMBEDDED_ATTACKS = ("lira", "lira_offline", "rmia", "rmia_offline")  # the embedded-target design's attacks
MIN_SPLIT = 4  # a held-out split needs two halves of at least 2 (replicates, or targets)
DEFAULT_MEMORY_BUDGET = 2 * 2**30


class AuditKeys(NamedTuple):
    """Independent subkeys of the audit's key, one per use (never reused)."""

    train: jax.Array  # fresh-data training sets and fits
    nonmember: jax.Array  # fresh non-members of the LOSS attack
    population: jax.Array  # theta* and the large fresh samples
    test: jax.Array  # the common test set
    lira: jax.Array  # the embedded-target design
    bootstrap: jax.Array  # paired comparisons
    pool: jax.Array  # the pool design
    quantize: jax.Array  # stochastic quantizers
    swap: jax.Array  # the fresh points of the swap coupling


class AuditPlan(NamedTuple):
    """Everything the later stages need to know, checked: sizes, options, chunks and keys."""

    quantizers: dict[str, _quantizers.Quantizer]
    n: int
    replicates: int
    attacks: tuple[str, ...]
    indicator: IndicatorOptions
    population_size: int
    population_max: int
    star_size: int
    test_size: int
    lira_replicates: int
    lira_targets: int
    n_boot: int
    chunk_size: int
    memory_budget: int
    replicate_bytes: int
    fit_kwargs: dict[str, Any]
    keys: AuditKeys
    key: jax.Array
    not_run: dict[str, str]  # requested attacks that cannot be held out at these sizes -> the reason

    @property
    def runnable_attacks(self) -> tuple[str, ...]:
        """The requested attacks the sizes allow (:func:`attacks_not_run`); others are reported as not run."""
        return tuple(a for a in self.attacks if a not in self.not_run)

    def chunks(self, total: int | None = None) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` covering ``total`` replicates (default: the fresh-data replicates)."""
        total = self.replicates if total is None else total
        return [(s, min(s + self.chunk_size, total)) for s in range(0, total, self.chunk_size)]


def resolve_quantizers(quantizers) -> dict[str, _quantizers.Quantizer]:
    """Normalise ``quantizers`` (preset names, Quantizer objects, or a dict name -> either) to a dict."""
    if isinstance(quantizers, (str, _quantizers.Quantizer)):
        quantizers = [quantizers]
    if isinstance(quantizers, Mapping):
        items = list(quantizers.items())
    elif isinstance(quantizers, Sequence):
        items = []
        for q in quantizers:
            if not isinstance(q, (str, _quantizers.Quantizer)):
                raise ValueError(f"quantizers must hold preset names or Quantizer objects, got {q!r}")
            items.append((q if isinstance(q, str) else q.name, q))
    else:
        raise ValueError(
            f"quantizers must be a preset name, a Quantizer, a sequence of them or a dict, got {type(quantizers)}"
        )
    if not items:
        raise ValueError("quantizers must name at least one quantizer")
    out: dict[str, _quantizers.Quantizer] = {}
    for name, q in items:
        q = _quantizers.get(q) if isinstance(q, str) else q
        if not isinstance(q, _quantizers.Quantizer):
            raise ValueError(f"quantizers[{name!r}] must be a preset name or a Quantizer, got {q!r}")
        if name in out:
            raise ValueError(f"quantizers names must be unique, {name!r} appears twice")
        out[str(name)] = q
    return out


def _attacks(attacks) -> tuple[str, ...]:
    attacks = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    for a in attacks:
        if a not in ATTACKS:
            raise ValueError(f"attacks must be among {ATTACKS}, got {a!r}")
    return attacks


def attacks_not_run(
    attacks: tuple[str, ...], *, n: int, replicates: int, lira_replicates: int, lira_targets: int
) -> dict[str, str]:
    """The requested attacks that cannot be held out at these sizes, each with its reason (theory.md sections 7, 10).

    Sizes only, so the decision is made before any data are seen: such an attack is reported as not run and takes
    no Bonferroni share of the bracket. A held-out split needs two halves of at least 2 (:data:`MIN_SPLIT`):

    - LOSS (fresh-data design): ``replicates >= 4``;
    - LiRA and RMIA (embedded-target design): ``2 k >= 4`` targets, since the threshold is chosen on other targets
      than it is evaluated on, and ``lira_replicates - lira_replicates // 2 >= 4`` attacked replicates (the others
      are shadows), i.e. ``lira_replicates >= 7``;
    - ``lira_pool``: at least 2 shadows for LiRA's fits, ``lira_replicates >= 4``.

    Conditions of the random membership design (a selection half without both classes, a target with too few in-
    or out-shadows) are found when the attack runs, and reported the same way.

    Returns:
      ``{attack: reason}`` for the attacks of ``attacks`` that cannot run (empty when all can).
    """
    out: dict[str, str] = {}
    k, shadows = lira_targets, lira_replicates // 2
    attacked = lira_replicates - shadows
    for a in attacks:
        if a == "loss" and replicates < MIN_SPLIT:
            out[a] = (
                f"too few replicates: the held-out split by replicate needs >= {MIN_SPLIT} (2 to choose the "
                f"threshold on, 2 to evaluate it on), got replicates={replicates}"
            )
        elif a in EMBEDDED_ATTACKS and 2 * k < MIN_SPLIT:
            out[a] = (
                f"too few targets: {2 * k} embedded targets (lira_targets={k} at n={n}), the held-out split over "
                f"targets needs >= {MIN_SPLIT} (lira_targets >= 2, the default from n = 20 on)"
            )
        elif a in EMBEDDED_ATTACKS and attacked < MIN_SPLIT:
            out[a] = (
                f"too few replicates: lira_replicates={lira_replicates} leaves {attacked} attacked replicates "
                f"({shadows} shadows), the held-out split by replicate needs >= {MIN_SPLIT} (lira_replicates >= 7)"
            )
        elif a == "lira_pool" and shadows < 2:
            out[a] = (
                f"too few shadows: lira_replicates={lira_replicates} gives {shadows} shadow replicates, LiRA's fits "
                "need >= 2 (lira_replicates >= 4)"
            )
    return out


def _chunk_size(problem: Problem, n: int, replicates: int, chunk_size, memory_budget) -> tuple[int, int, int]:
    """``(chunk_size, memory_budget, bytes per replicate)``; refuses a budget that cannot hold one replicate."""
    budget_given = memory_budget is not None
    memory_budget = positive_int("memory_budget", memory_budget if budget_given else DEFAULT_MEMORY_BUDGET)
    x_spec = jax.eval_shape(lambda k: problem.sample(k, n), jax.random.key(0))[0]
    dx = int(np.prod(x_spec.shape[1:]))
    p = ravel_pytree(problem.init(jax.random.key(0)))[0].size
    per = _memory.replicate_bytes(n=n, p=p, dx=dx)
    if budget_given or chunk_size is None:
        _memory.check_budget(memory_budget, per, f" at n={n} with {p} parameters")
    if chunk_size is None:
        chunk_size = max(1, min(replicates, memory_budget // per))
    return positive_int("chunk_size", chunk_size), memory_budget, per


def plan(
    key: jax.Array,
    problem: Problem,
    quantizers,
    *,
    n: int,
    replicates: int,
    attacks,
    indicator: IndicatorOptions,
    chunk_size: int | None,
    memory_budget: int | None,
    population_size: int | None,
    population_max: int | None,
    star_size: int | None,
    test_size: int,
    lira_replicates: int | None,
    lira_targets: int | None,
    tol: float,
    max_steps: int | None,
    n_boot: int,
) -> AuditPlan:
    """Check every argument of :func:`qmis_jax.audit` (a ValueError names the first bad one) and plan the work.

    Sizes too small for an attack's held-out split are not errors: :func:`attacks_not_run` records the attack and
    its reason in ``not_run``, and the audit reports it as not run."""
    if not isinstance(problem, Problem):
        raise ValueError(f"problem must be a qmis_jax.problems.Problem, got {type(problem).__name__}")
    qs = resolve_quantizers(quantizers)
    n = positive_int("n", n)
    if n < 2:
        raise ValueError(
            "n must be >= 2 (the single-model indicator estimates sigma_k from the spread of the per-sample D_k over "
            f"the training set, theory.md section 6: one point has none), got n={n}"
        )
    replicates = positive_int("replicates", replicates)
    attacks = _attacks(attacks)
    if population_size is None:
        population_size = max(50 * n, 20_000)
    population_size = positive_int("population_size", population_size)
    # the gap sample grows in chunks of population_size until the predicted flip is precise (theory.md section 6)
    population_max = max(1500 * n, population_size) if population_max is None else population_max
    population_max = positive_int("population_max", population_max)
    star_size = positive_int("star_size", max(100 * n, 20_000) if star_size is None else star_size, minimum=2)
    test_size = positive_int("test_size", test_size)
    # too few for an attack is not an error: the attack is reported as not run (attacks_not_run)
    lira_replicates = positive_int("lira_replicates", replicates if lira_replicates is None else lira_replicates)
    k_targets = positive_int("lira_targets", max(1, n // 10) if lira_targets is None else lira_targets)
    if k_targets >= n:
        raise ValueError(f"lira_targets must be smaller than n={n}, got lira_targets={k_targets}")
    n_boot = positive_int("n_boot", n_boot)
    chunk_size, memory_budget, per = _chunk_size(problem, n, replicates, chunk_size, memory_budget)
    return AuditPlan(
        quantizers=qs,
        n=n,
        replicates=replicates,
        attacks=attacks,
        indicator=indicator,
        population_size=population_size,
        population_max=population_max,
        star_size=star_size,
        test_size=test_size,
        lira_replicates=lira_replicates,
        lira_targets=k_targets,
        n_boot=n_boot,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        replicate_bytes=per,
        fit_kwargs=dict(tol=tol, max_steps=max_steps, chunk_size=chunk_size, memory_budget=memory_budget),
        # fold_in(key, 1445) is a derivation that split(key, 8) never makes: the other keys stay as they were
        keys=AuditKeys(*jax.random.split(key, 8), swap=jax.random.fold_in(key, 1445)),
        key=key,
        not_run=attacks_not_run(
            attacks, n=n, replicates=replicates, lira_replicates=lira_replicates, lira_targets=k_targets
        ),
    )
