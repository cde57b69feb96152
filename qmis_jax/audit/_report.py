"""Stage 6 of the audit: one entry per quantizer, the paired comparisons and the ranking, the report itself."""

from __future__ import annotations

import copy
import dataclasses
import math
import platform
from typing import Any

import jax
import numpy as np

from qmis_jax import _memory, _runtime, indicator, stats
from qmis_jax import quantizers as _quantizers
from qmis_jax._version import __version__
from qmis_jax.problems import Problem
from qmis_jax.store import config_hash

from ._plan import SECTION1_ATTACKS, AuditPlan
from ._population import Population
from ._statistics import ReplicateStats
from ._train import Trained
from .tables import report_table


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """The result of :func:`qmis_jax.audit` or :func:`qmis_jax.audit_model`: a JSON-serialisable dictionary in the
    report schema of design.md.

    Use ``report.to_dict()`` for the full dictionary, ``report.ranking`` for the order (most secure first),
    ``report["int4"]`` for one quantizer's entry and ``print(report)`` for a table.
    """

    data: dict[str, Any]
    raw_scores: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def scores(self, quantizer: str, attack: str) -> tuple[np.ndarray, np.ndarray]:
        """``(member_scores, nonmember_scores)`` of one attack on one quantizer's releases, higher = member, one
        entry per attacked pair (section-1 attacks: LOSS over the fresh-data replicates, LiRA and RMIA over the
        attacked embedded-target replicates). Hand them to other tools, e.g.
        ``jax_privacy.auditing.CanaryScoreAuditor(*report.scores("int4", "lira")).attack_auroc()``, which equals
        the report's ``auc_convex_hull``. Pairs from one replicate share its release: bounds computed from them
        must count replicates, not pairs (see :meth:`score_ids`)."""
        sc = self._raw(quantizer, attack)
        return sc.member, sc.nonmember

    def score_ids(self, quantizer: str, attack: str) -> tuple[np.ndarray, np.ndarray]:
        """``(member_ids, nonmember_ids)``: for each pair of :meth:`scores`, its replicate number and its example
        (LOSS) or target (LiRA, RMIA) number, as ``(pairs, 2)`` int arrays."""
        sc = self._raw(quantizer, attack)
        return sc.member_ids, sc.nonmember_ids

    def save_scores(self, path: str) -> None:
        """Every attack's scores and ids in one ``.npz`` (arrays named ``{quantizer}.{attack}.{field}``)."""
        arrays = {
            f"{q}.{a}.{field}": np.asarray(getattr(sc, field))
            for q, attacks in self.raw_scores.items()
            for a, sc in attacks.items()
            for field in sc._fields
        }
        np.savez_compressed(path, **arrays)

    def _raw(self, quantizer: str, attack: str):
        if quantizer not in self.raw_scores:
            raise KeyError(f"quantizer {quantizer!r} has no scores; this report has {sorted(self.raw_scores)}")
        entry = self.data.get("quantizers", {}).get(quantizer, {}).get("attacks", {}).get(attack)
        if attack not in self.raw_scores[quantizer] and entry is not None and entry.get("ran") is False:
            raise KeyError(f"attack {attack!r} did not run on {quantizer!r}: {entry.get('reason')}")
        if attack not in self.raw_scores[quantizer]:
            raise KeyError(
                f"attack {attack!r} has no scores here; this report has {sorted(self.raw_scores[quantizer])}"
            )
        return self.raw_scores[quantizer][attack]

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dictionary (a deep copy)."""
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
        return "\n".join(report_table(self.data))


def environment() -> dict[str, Any]:
    """Versions and devices, recorded in every report."""
    devices = jax.local_devices()
    return {
        "qmis_jax": __version__,
        "jax": jax.__version__,
        "jaxlib": _runtime.jaxlib_version(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "platform": devices[0].platform,
        "x64": bool(jax.config.jax_enable_x64),
    }


def summary(values) -> dict[str, float]:
    """Mean, median and the 5% / 95% quantiles of the finite values (NaN when there are none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return dict.fromkeys(("mean", "median", "q05", "q95"), float("nan"))
    q05, q95 = np.quantile(v, [0.05, 0.95])
    return {"mean": float(np.mean(v)), "median": float(np.median(v)), "q05": float(q05), "q95": float(q95)}


def finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def significant(x, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits (None when not finite): rates and probabilities computed in
    float32 carry no more."""
    x = finite_or_none(x)
    return x if x is None or x == 0 else float(f"{x:.{digits - 1}e}")


SINGLE_NOTE = (
    "each replicate's own indicator on the data that chose its release: every decision holds there, so it is "
    "biased upward (theory.md section 6); its spread shows how reliable one audit is, r_population is the value"
)


def _entry(plan: AuditPlan, name: str, population: Population, per_rep: ReplicateStats, attacks) -> dict:
    pop = population.audits[name]
    opts = plan.indicator
    q = plan.quantizers[name]
    flips = per_rep.of(name, "flip").astype(float)
    continuous = bool(pop.continuous)
    # theory.md section 10: the swap coupling bounds Delta from above, the held-out attacks (thresholds chosen on
    # other replicates) from below; jointly 95%
    # an attack that did not run (too small a design) enters no limit and no Bonferroni share
    ran = [a for a in SECTION1_ATTACKS if a in attacks and attacks[a].get("ran", True)]
    bounds = {a: attacks[a]["advantage_bound"] for a in ran}
    bracket = stats.bracket_report(per_rep.of(name, "swap_changed"), bounds, continuous=continuous)
    regime = (not continuous) and bool(indicator.asymptotic_regime(float(pop.sqrt_n_c_min)))
    return {
        "description": repr(q),
        "continuous": continuous,
        "release": _quantizers.release_info(q, population.theta_star, skip=opts.skip, ptq=opts.ptq),
        "r_population": significant(pop.r),
        "r_population_se": significant(pop.r_se),
        "r_zero_reason": pop.r_zero_reason,
        "events": pop.events,
        "population_sample_size": pop.sample_size,
        "r_codes": significant(pop.r_codes),
        "r_single": summary(per_rep.of(name, "r_hat")),
        "r_single_note": SINGLE_NOTE,
        "r_single_interval_mean": [
            float(np.nanmean(per_rep.of(name, "r_lo"))),
            float(np.nanmean(per_rep.of(name, "r_hi"))),
        ],
        "mis_asymptotic": finite_or_none(pop.mis_asymptotic),
        "mis_asymptotic_method": opts.method,
        "mis_asymptotic_applicable": bool(pop.applicable),
        "asymptotic_regime": regime,
        "sqrt_n_c_min": finite_or_none(pop.sqrt_n_c_min),
        "flip_rate": float(flips.mean()),
        "flip_rate_se": float(flips.std(ddof=1) / math.sqrt(flips.size)) if flips.size > 1 else float("nan"),
        "flip_rate_predicted": None if continuous else significant(pop.flip_rate_predicted),
        "flip_rate_predicted_se": None if continuous else significant(pop.flip_se),
        "flip_union_bound": None if continuous else significant(pop.flip_union_bound),
        "competitors": int(np.sum(np.asarray(pop.valid))),
        "rates_capped": int(np.sum(np.asarray(pop.capped))),
        "attacks": attacks,
        **bracket,
        "utility": per_rep.utility(name),
        "single_audits_not_ok": int(np.sum(~per_rep.of(name, "ok").astype(bool))),
    }


def rank(key, entries: dict[str, dict], r_hats: dict[str, np.ndarray], *, n_boot: int) -> tuple[list[str], list]:
    """Most secure first by the mean single-model indicator, ties broken by the attacks' MIS upper bound, with the
    paired bootstrap interval of each neighbouring pair (replicates where every single audit is finite)."""
    if len(r_hats) < 2:
        return list(r_hats), []
    rows = np.all([np.isfinite(v) for v in r_hats.values()], axis=0)
    upper = {name: entries[name]["mis_empirical_upper"] or 0.0 for name in r_hats}
    if rows.size < 2:  # a single replicate: an order, but no paired interval to put behind it
        mean_r = {name: float(np.nan_to_num(np.mean(v), nan=-np.inf)) for name, v in r_hats.items()}
        return sorted(r_hats, key=lambda nm: (-mean_r[nm], -upper[nm])), []
    if rows.sum() < 2:
        raise ValueError(
            f"only {rows.sum()} of {rows.size} replicates have a finite single-model indicator for every "
            "quantizer; see the report's diagnostics (non-finite parameters, singular Hessians)"
        )
    r_hats = {name: v[rows] for name, v in r_hats.items()}
    ranking, table = stats.rank_quantizers(key, r_hats, n_boot=n_boot)
    mean_r = {name: float(np.mean(v)) for name, v in r_hats.items()}
    ranking = sorted(ranking, key=lambda nm: (-mean_r[nm], -upper[nm]))
    intervals = [
        {
            "better": a,
            "worse": b,
            "r_single_mean_difference": table[a][b].estimate,
            "interval": [table[a][b].lo, table[a][b].hi],
        }
        for a, b in zip(ranking[:-1], ranking[1:])
    ]
    return ranking, intervals


def _config(plan: AuditPlan, problem: Problem) -> dict[str, Any]:
    opts = plan.indicator
    return {
        "n": plan.n,
        "replicates": plan.replicates,
        "ptq": opts.ptq,
        "method": opts.method,
        "attacks": list(plan.attacks),
        "problem": problem.info(),
        "quantizers": {nm: repr(q) for nm, q in plan.quantizers.items()},
        "population_size": plan.population_size,
        "population_max": plan.population_max,
        "star_size": plan.star_size,
        "test_size": plan.test_size,
        "lira_replicates": plan.lira_replicates,
        "lira_targets": plan.lira_targets,
        "tol": plan.fit_kwargs["tol"],
        "max_steps": plan.fit_kwargs["max_steps"],
        "max_sweeps": opts.max_sweeps,
        "z": opts.z,
        "key": np.asarray(jax.random.key_data(plan.key)).tolist(),
    }


def _diagnostics(plan: AuditPlan, trained: Trained, programs_before: int) -> dict[str, Any]:
    return {
        "replicates_not_converged": int(np.sum(~trained.converged)),
        "max_grad_norm": float(np.max(trained.grad_norm)),
        "nonfinite_parameters": int(np.sum(~np.isfinite(trained.theta_all).all(axis=1))),
        "chunk_size": plan.chunk_size,
        "memory_budget_mib": _memory.mib(plan.memory_budget),
        "replicate_estimate_mib": _memory.mib(plan.replicate_bytes),
        "peak_rss_mib": _memory.mib(_memory.peak_rss_bytes()),
        "device_peak_mib": _memory.mib(_memory.device_peak_bytes()),
        **_runtime.diagnostics(programs_before),
    }


def report_stage(
    plan: AuditPlan,
    problem: Problem,
    trained: Trained,
    pop: Population,
    per_rep: ReplicateStats,
    attacks,
    raw,
    *,
    programs_before: int = 0,
) -> AuditReport:
    """Assemble the report: entries, ranking with paired intervals, configuration, diagnostics, environment."""
    entries = {name: _entry(plan, name, pop, per_rep, attacks[name]) for name in plan.quantizers}
    r_hats = {name: per_rep.of(name, "r_hat") for name in plan.quantizers}
    ranking, intervals = rank(plan.keys.bootstrap, entries, r_hats, n_boot=plan.n_boot)
    config = _config(plan, problem)
    trained_utility = per_rep.utility("trained")
    data = {
        "version": __version__,
        "kind": "audit",
        "n": plan.n,
        "replicates": plan.replicates,
        "problem": problem.info(),
        "config_hash": config_hash(config),
        "ptq": plan.indicator.ptq,
        "method": plan.indicator.method,
        "theta_star": pop.source,
        "quantizers": entries,
        "ranking": ranking,
        "ranking_by": "mean single-model indicator r_hat over replicates (paired bootstrap intervals), ties broken "
        "by the empirical MIS upper bound of the attacks",
        "ranking_intervals": intervals,
        "trained_utility": trained_utility,
        "diagnostics": _diagnostics(plan, trained, programs_before),
        "environment": environment(),
        "config": config,
    }
    return AuditReport(data, raw)
