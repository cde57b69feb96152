"""The synthetic study, in two parts: a validation of the theory where it can be seen, then the paper's setting.

Part one (validation, theory.md sections 4, 5 and 10): logistic regression in low dimension (``validation_dim``,
2 to 16), a fixed grid, a size-adaptive grid and discrete-scale (E8M0) presets, plus one float32-scale preset as the
continuous reference. A pilot audit at ``validation_pilot_n`` gives each quantizer's population indicator ``r``
(from the population stage: one large fit for ``theta*``, fresh samples for the gaps), and with it each
quantizer's own sweep of training-set sizes, chosen so that ``n r`` runs over ``validation_targets`` (about 0.3 to
5; beyond, flips are too rare to count): ``n = T / r`` for a codebook fixed in advance (its ``r`` does not depend on
n), ``n = (T / (r0 n0^(2 alpha)))^(1 / (1 - 2 alpha))`` for the size-adaptive grid (its step, hence ``r``, scales as
``n^-alpha``, ``n^(-2 alpha)``). Sizes are rounded to a grid of ratio ``2^(1/4)`` so that quantizers share audits,
and clipped to ``[validation_n_min, validation_n_max]``; the realised ``n r`` (with the point's own ``r``) is what
the tables show. A quantizer whose smallest target needs ``n > validation_n_max`` is listed as out of reach, one with
``r = 0`` at the pilot (continuous, or a release on a decision threshold) gets no sweep; both stay in the pilot's
ranking. ``grid_fixed`` stands for one fixed grid per step of ``validation_grid_steps`` (their rates differ by
orders of magnitude, so at least one usually falls in range). The part reports ``-log(flip)/n`` against ``r``, the
certified bracket around the asymptotic MIS, the bracket's width against the replicate count (one quantizer at
``n r`` near 1, ``validation_width_replicates``), and, at the pilot, the ranking by ``r`` against the ranking by the
bracket and by the held-out attacks.

Part two (the paper's setting): Gaussian mixtures in R^dim (128 by default), logistic and MLP models, the presets
with the E8M0 variants of the scaled ones next to their float32 originals, the two grids, a sweep over n.

Each audit is one :func:`qmis_jax.audit` on its own replicates; its chunks and its finished report are kept in the
study's :class:`~qmis_jax.store.ResultStore`, so ``--resume`` loses nothing. The study writes ``report.json`` (the
report schema of design.md for part two's main point, the largest n of the first model, with every part-two point
under ``"runs"`` and part one under ``"validation"``), ``report.md`` and the figures.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from qmis_jax import problems
from qmis_jax import quantizers as Q
from qmis_jax._memory import replicate_bytes
from qmis_jax._progress import progress_bar
from qmis_jax.audit import audit, environment
from qmis_jax.store import ResultStore, config_hash, write_json
from qmis_jax.studies import markdown, plots
from qmis_jax.studies._points import study_diagnostics, study_point

MODELS = ("logistic", "mlp")
GRIDS = ("grid_fixed", "grid_adaptive")
# E8M0 variants run next to their float32 originals in part two (theory.md section 9)
E8M0_VARIANTS = ("int8@e8m0", "int4@e8m0", "sign@e8m0", "ternary@e8m0")
QUICK_QUANTIZERS = (
    "fp32",
    "int8",
    "int4",
    "int2",
    "ternary",
    "sign",
    "prune50",
    "int4@e8m0",
    "sign@e8m0",
    *GRIDS,
)
VALIDATION_QUANTIZERS = ("grid_fixed", "grid_adaptive", "int2@e8m0", "int4@e8m0", "ternary@e8m0", "sign@e8m0", "int4")
QUICK_VALIDATION_QUANTIZERS = ("grid_fixed", "grid_adaptive", "int4@e8m0", "int4")
SIZE_GRID_RATIO = 2.0**0.25


def default_quantizers() -> tuple[str, ...]:
    """Part two's quantizers: every preset, the E8M0 variants of :data:`E8M0_VARIANTS` and the two grids."""
    return (*Q.names(), *E8M0_VARIANTS, *GRIDS)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Configuration of the synthetic study (all sizes validated by :func:`validate`)."""

    n_values: tuple[int, ...] = (1000, 2000, 4000)
    replicates: int = 256
    models: tuple[str, ...] = ("logistic",)
    quantizers: tuple[str, ...] | None = None
    dim: int = 128
    k_modes: int = 4
    hidden: int = 32
    grid_step: float = 0.05
    adaptive_alpha: float = 0.25
    seed: int = 0
    ptq: str = "loss"
    method: str = "gaussian"
    attacks: tuple[str, ...] = ("loss", "lira")
    memory_budget: int = 2 * 2**30
    validation: bool = True
    validation_dim: int = 2
    validation_quantizers: tuple[str, ...] = VALIDATION_QUANTIZERS
    validation_grid_steps: tuple[float, ...] = (0.5, 1.0)
    validation_targets: tuple[float, ...] = (0.3, 1.0, 2.0, 5.0)
    validation_pilot_n: int = 500
    validation_n_min: int = 50
    validation_n_max: int = 20_000
    validation_replicates: int | None = None
    validation_width_replicates: tuple[int, ...] = (32, 64, 128, 256)

    @classmethod
    def quick(cls, **overrides) -> SyntheticConfig:
        """A miniature of both parts that finishes in a minute or two on two CPU cores."""
        base = dict(
            n_values=(800,),
            replicates=64,
            models=("logistic",),
            dim=16,
            quantizers=QUICK_QUANTIZERS,
            validation_dim=2,
            validation_quantizers=QUICK_VALIDATION_QUANTIZERS,
            validation_grid_steps=(1.0,),
            validation_targets=(0.5, 4.0),
            validation_pilot_n=300,
            validation_n_max=5000,
            validation_width_replicates=(32, 64),
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def validate(cfg: SyntheticConfig) -> SyntheticConfig:
    """Check names and sizes; return the config with the default quantizer list filled in."""
    for m in cfg.models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}")
    for n in cfg.n_values:
        if n < 2:
            raise ValueError(f"--n must be at least 2 (each replicate embeds LiRA targets among fresh points), got {n}")
    if cfg.replicates < 4:
        raise ValueError(f"--replicates must be at least 4 (LiRA needs shadows and targets), got {cfg.replicates}")
    names = cfg.quantizers or default_quantizers()
    for name in (*names, *(cfg.validation_quantizers if cfg.validation else ())):
        if name not in GRIDS:
            Q.get(name)  # KeyError listing the valid names
    if cfg.validation:
        if not 2 <= cfg.validation_dim <= 16:
            raise ValueError(f"validation_dim must be in [2, 16] (the low-dimensional part), got {cfg.validation_dim}")
        if not cfg.validation_targets or min(cfg.validation_targets) <= 0:
            raise ValueError(f"validation_targets must be positive values of n r, got {cfg.validation_targets}")
        if not 2 <= cfg.validation_n_min <= cfg.validation_pilot_n <= cfg.validation_n_max:
            raise ValueError(
                "validation sizes must satisfy 2 <= validation_n_min <= validation_pilot_n <= validation_n_max, got "
                f"{cfg.validation_n_min}, {cfg.validation_pilot_n}, {cfg.validation_n_max}"
            )
        if any(r < 4 for r in (cfg.validation_replicates or cfg.replicates, *cfg.validation_width_replicates)):
            raise ValueError("validation_replicates and validation_width_replicates must be at least 4")
    return dataclasses.replace(cfg, quantizers=tuple(names))


def quantizer_set(cfg: SyntheticConfig, n: int) -> dict[str, Q.Quantizer]:
    """The study's quantizers at training-set size ``n``: presets, the fixed grid and the size-adaptive grid.

    ``grid_fixed`` is ``uniform(step=grid_step)`` (a codebook independent of n: ``r`` tends to a constant);
    ``grid_adaptive`` is ``size_adaptive(n, h0=grid_step, n0=min(n_values), alpha)`` (step shrinking with n:
    ``r -> 0`` while ``n r -> infinity``), theory.md section 4.
    """
    out = {}
    for name in cfg.quantizers:
        if name == "grid_fixed":
            out[name] = Q.uniform(step=cfg.grid_step)
        elif name == "grid_adaptive":
            out[name] = Q.size_adaptive(n, h0=cfg.grid_step, n0=min(cfg.n_values), alpha=cfg.adaptive_alpha)
        else:
            out[name] = Q.get(name)
    return out


def validation_names(cfg: SyntheticConfig) -> list[str]:
    """Part one's quantizer names: ``grid_fixed`` becomes one fixed grid per step of ``validation_grid_steps``
    (``grid_fixed_h0.5``...), the rest as given."""
    out = []
    for name in cfg.validation_quantizers:
        if name == "grid_fixed":
            out += [f"grid_fixed_h{h:g}" for h in cfg.validation_grid_steps]
        else:
            out.append(name)
    return out


def validation_quantizer_set(cfg: SyntheticConfig, names: Sequence[str], n: int) -> dict[str, Q.Quantizer]:
    """Part one's quantizers at size ``n``: ``grid_fixed_hH`` the fixed grid of step H; ``grid_adaptive`` of step
    ``max(validation_grid_steps)`` at ``validation_pilot_n``, shrinking as ``n^-adaptive_alpha``; presets by name."""
    out = {}
    for name in names:
        if name.startswith("grid_fixed_h"):
            out[name] = Q.uniform(step=float(name[len("grid_fixed_h") :]))
        elif name == "grid_adaptive":
            h0 = max(cfg.validation_grid_steps)
            out[name] = Q.size_adaptive(n, h0=h0, n0=cfg.validation_pilot_n, alpha=cfg.adaptive_alpha)
        else:
            out[name] = Q.get(name)
    return out


def round_size(n: float, *, n_min: int, n_max: int) -> int:
    """``n`` rounded to the nearest point of the grid ``round(SIZE_GRID_RATIO^k)`` and clipped to
    ``[n_min, n_max]`` (so that quantizers whose sweeps nearly coincide share one audit)."""
    if not math.isfinite(n) or n <= 0:
        return n_max
    k = round(math.log(n) / math.log(SIZE_GRID_RATIO))
    return int(min(max(round(SIZE_GRID_RATIO**k), n_min), n_max))


def sweep_sizes(
    r_pilot: float, *, targets: Sequence[float], n_pilot: int, n_min: int, n_max: int, alpha: float | None = None
) -> list[int]:
    """Training-set sizes at which ``n r`` is near each target, from the pilot's population indicator.

    A codebook fixed in advance has ``r`` independent of n, so ``n = T / r``. A size-adaptive grid (``alpha`` given)
    has step ``h0 (n / n_pilot)^-alpha`` and ``r`` scaling as ``h^2``, so ``n r = r_pilot n_pilot^(2 alpha)
    n^(1 - 2 alpha)`` and ``n = (T / (r_pilot n_pilot^(2 alpha)))^(1 / (1 - 2 alpha))`` (``alpha < 1/2``). Sizes
    are rounded by :func:`round_size`; duplicates are dropped; an ``r_pilot`` of 0 gives no size.
    """
    if not r_pilot or r_pilot <= 0:
        return []
    out = []
    for t in targets:
        if alpha is None:
            n = t / r_pilot
        else:
            if not 0 <= alpha < 0.5:
                raise ValueError(f"alpha must be in [0, 1/2) for a size sweep, got {alpha}")
            n = (t / (r_pilot * n_pilot ** (2 * alpha))) ** (1 / (1 - 2 * alpha))
        out.append(round_size(n, n_min=n_min, n_max=n_max))
    return sorted(set(out))


def validation_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One quantizer at one size of part one: the numbers of its validation table."""
    q = report["quantizers"][name]
    n, r = report["n"], q["r_population"] or 0.0
    flip = q["flip_rate"]
    return {
        "quantizer": name,
        "n": n,
        "replicates": report["replicates"],
        "r": r,
        "n_r": n * r,
        "continuous": plots.is_continuous(q),
        "flip_rate": flip,
        "flip_rate_se": q["flip_rate_se"],
        "empirical_rate": plots.empirical_rate(q, n) if 0 < flip < 1 else None,
        "flip_rate_predicted": q["flip_rate_predicted"],
        "flip_union_bound": q["flip_union_bound"],
        "swap_rate": (q.get("swap") or {}).get("rate"),
        "swap_upper": (q.get("swap") or {}).get("upper"),
        "mis_bracket": q["mis_bracket"],
        "mis_asymptotic": q["mis_asymptotic"],
        "asymptotic_regime": q["asymptotic_regime"],
        "sqrt_n_c_min": q["sqrt_n_c_min"],
    }


def ranking_agreement(report: dict[str, Any], attacks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Spearman rank agreement of ``r`` with the bracket's two ends and with each held-out attack."""
    out = {
        "bracket_lower": plots.indicator_bracket_agreement(report, end=0),
        "bracket_upper": plots.indicator_bracket_agreement(report, end=1),
    }
    for a in attacks:
        out[f"{a}_heldout"] = plots.indicator_attack_agreement(report, attack=a)
    return out


def study_audit(cfg: SyntheticConfig, key, problem, qs, *, n, replicates, store, tag, bar) -> dict[str, Any]:
    """One audit of the study, its stages stored under ``tag``; returns the report's dictionary."""
    return audit(
        key,
        problem,
        qs,
        n=n,
        replicates=replicates,
        ptq=cfg.ptq,
        method=cfg.method,
        attacks=cfg.attacks,
        memory_budget=cfg.memory_budget,
        store=store.prefixed(tag + "."),
        progress=None if bar is None else (lambda stage, done: bar.set_postfix_str(f"{tag} {stage} {done}")),
    ).to_dict()


def run_validation(cfg: SyntheticConfig, store: ResultStore, key: jax.Array, bar=None) -> dict[str, Any]:
    """Part one of the study (see the module docstring); returns its dictionary for ``report.json``."""
    problem = problems.logistic_mixture(dim=cfg.validation_dim, k_modes=cfg.k_modes, seed=cfg.seed)
    reps = cfg.validation_replicates or cfg.replicates
    names = validation_names(cfg)

    def one(tag, n, qnames, replicates, k):
        def compute():
            qs = validation_quantizer_set(cfg, qnames, n)
            return study_audit(cfg, k, problem, qs, n=n, replicates=replicates, store=store, tag=tag, bar=bar)

        if bar is not None:
            bar.set_description(tag)
        return study_point(store, f"report-{tag}", compute)

    pilot = one("validation-pilot", cfg.validation_pilot_n, names, reps, jax.random.fold_in(key, 0))
    sizes: dict[str, list[int]] = {}
    out_of_reach: dict[str, dict[str, float]] = {}
    for name in names:
        q = pilot["quantizers"][name]
        r = 0.0 if plots.is_continuous(q) else (q["r_population"] or 0.0)
        alpha = cfg.adaptive_alpha if name == "grid_adaptive" else None
        sweep = dict(targets=cfg.validation_targets, n_pilot=cfg.validation_pilot_n, alpha=alpha)
        sizes[name] = sweep_sizes(r, n_min=cfg.validation_n_min, n_max=cfg.validation_n_max, **sweep)
        unclipped = sweep_sizes(r, n_min=2, n_max=10**12, **sweep)
        if r > 0 and len(sizes[name]) < 2 and unclipped and min(unclipped) > cfg.validation_n_max:
            # n r stays below the smallest target up to validation_n_max: flips too frequent to see a rate
            out_of_reach[name] = {"r": r, "n_needed": float(min(unclipped))}
            sizes[name] = []
    by_size: dict[int, list[str]] = {}
    for name, ns in sizes.items():
        for n in ns:
            by_size.setdefault(n, []).append(name)
    rows = []
    for n in sorted(by_size):
        rep = one(f"validation-n{n}", n, by_size[n], reps, jax.random.fold_in(key, n))
        rows += [validation_row(name, rep) for name in by_size[n]]
    rows.sort(key=lambda r: (names.index(r["quantizer"]), r["n"]))
    width = []
    discrete = [r for r in rows if not r["continuous"]]
    if discrete and cfg.validation_width_replicates:
        first = discrete[0]["quantizer"]
        n_w = min((r for r in discrete if r["quantizer"] == first), key=lambda r: abs(math.log(max(r["n_r"], 1e-12))))
        for rr in sorted(cfg.validation_width_replicates):
            if rr == reps:  # the sweep's own point: same quantizer, n and replicate count
                width.append(n_w)
                continue
            rep = one(f"validation-width-r{rr}", n_w["n"], [first], rr, jax.random.fold_in(key, 1))
            width.append(validation_row(first, rep))
    return {
        "problem": pilot["problem"],
        "replicates": reps,
        "targets": list(cfg.validation_targets),
        "pilot": pilot,
        "pilot_r": {name: pilot["quantizers"][name]["r_population"] for name in names},
        "sizes": sizes,
        "out_of_reach": out_of_reach,
        "n_max": cfg.validation_n_max,
        "rows": rows,
        "width": width,
        "ranking_agreement": ranking_agreement(pilot, cfg.attacks),
    }


def make_problem(cfg: SyntheticConfig, model: str):
    if model == "logistic":
        return problems.logistic_mixture(dim=cfg.dim, k_modes=cfg.k_modes, seed=cfg.seed)
    return problems.mlp_mixture(dim=cfg.dim, k_modes=cfg.k_modes, hidden=cfg.hidden, seed=cfg.seed)


def estimate_bytes(cfg: SyntheticConfig) -> int:
    """Rough peak bytes of one replicate (as estimated by the audit), to refuse impossible budgets: the larger of
    part two at its largest n and part one (logistic, ``validation_dim``) at ``validation_n_max``."""
    p = cfg.dim + 1 if "mlp" not in cfg.models else (cfg.dim + 2) * cfg.hidden + 1
    need = replicate_bytes(n=max(cfg.n_values), p=p, dx=cfg.dim)
    if cfg.validation:
        need = max(need, replicate_bytes(n=cfg.validation_n_max, p=cfg.validation_dim + 1, dx=cfg.validation_dim))
    return need


def run(
    cfg: SyntheticConfig,
    out: str,
    *,
    resume: bool = False,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study into directory ``out``; returns the ``report.json`` dictionary."""
    cfg = validate(cfg)
    need = estimate_bytes(cfg)
    if need > cfg.memory_budget:
        raise ValueError(
            f"one replicate needs about {need / 2**20:.3g} MiB at n = {max(cfg.n_values)} (or part one's "
            f"validation_n_max = {cfg.validation_n_max}), more than "
            f"--memory-budget {cfg.memory_budget} bytes ({cfg.memory_budget / 2**20:.3g} MiB); raise the budget or "
            "lower --n"
        )
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    config["study"] = "synthetic"
    store = ResultStore(out, config, resume=resume)
    points = [(m, n) for m in cfg.models for n in sorted(cfg.n_values)]
    bar = progress_bar(len(points) + int(cfg.validation), progress)
    runs = []
    key = jax.random.key(cfg.seed)
    validation = None
    if cfg.validation:
        validation = run_validation(cfg, store, jax.random.fold_in(key, len(MODELS)), bar)
        bar.update(1)
    models = {model: make_problem(cfg, model) for model in cfg.models}  # one object: programs compile once
    for model, n in points:
        problem = models[model]
        tag = f"{model}-n{n}"
        bar.set_description(tag)

        def compute(model=model, n=n, problem=problem, tag=tag):
            k = jax.random.fold_in(jax.random.fold_in(key, MODELS.index(model)), n)
            qs = quantizer_set(cfg, n)
            return study_audit(cfg, k, problem, qs, n=n, replicates=cfg.replicates, store=store, tag=tag, bar=bar)

        run_report = study_point(store, f"report-{tag}", compute)
        runs.append(run_report)
        if on_point is not None:
            on_point(run_report)
        bar.update(1)
    bar.close()
    return write_outputs(out, runs, config, validation=validation)


def write_outputs(
    out: str, runs: Sequence[dict[str, Any]], config: dict[str, Any], *, validation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``report.json``, ``report.md`` and the figures from finished runs (part one's ``validation`` if it ran)."""
    first_model = runs[0]["problem"]["name"]
    main = max((r for r in runs if r["problem"]["name"] == first_model), key=lambda r: r["n"])
    figures = []
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)

    def fig(name, fn, *args, **kw):
        path = os.path.join(out, "figures", name)
        fn(*args, path, **kw)
        figures.append(os.path.join("figures", name))

    fig("indicator.png", plots.plot_indicator, main)
    for pname in dict.fromkeys(r["problem"]["name"] for r in runs):
        pruns = [r for r in runs if r["problem"]["name"] == pname]
        if len(pruns) > 1:
            fig(
                f"rates_vs_n_{pname}.png",
                plots.plot_rates_vs_n,
                pruns,
                names=[
                    q
                    for q in ("grid_fixed", "grid_adaptive", "int4", "ternary", "sign", "fp32")
                    if q in pruns[0]["quantizers"]
                ],
            )
    for attack in ("lira", "loss"):
        if any(attack in q.get("attacks", {}) for q in main["quantizers"].values()):
            fig(f"roc_{attack}.png", plots.plot_roc, main, attack=attack)
    if any("lira" in q.get("attacks", {}) for q in main["quantizers"].values()):
        fig("indicator_vs_lira.png", plots.plot_indicator_vs_attack, main, attack="lira")
    fig("privacy_utility.png", plots.plot_privacy_utility, main)
    val_figures = []
    if validation is not None:
        for name, fn, arg in (
            ("validation_rates.png", plots.plot_rate_convergence, validation["rows"]),
            ("validation_bracket.png", plots.plot_validation_bracket, validation["rows"]),
            ("validation_width.png", plots.plot_bracket_width, validation["width"]),
            ("validation_pilot_indicator.png", plots.plot_indicator, validation["pilot"]),
        ):
            if arg:
                fig(name, fn, arg)
                val_figures.append(figures.pop())
    report = dict(main)
    report["study"] = "synthetic"
    report["study_config"] = config
    report["study_config_hash"] = config_hash(config)
    report["environment"] = environment()
    report["diagnostics"] = study_diagnostics(main["diagnostics"])
    report["indicator_vs_lira"] = plots.indicator_attack_agreement(main, attack="lira")
    report["runs"] = list(runs)
    report["validation"] = validation
    write_json(os.path.join(out, "report.json"), report)
    md = markdown.render(
        "qmis_jax synthetic study",
        runs,
        figures=figures,
        validation=validation,
        validation_figures=val_figures,
    )
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(md)
    return report
