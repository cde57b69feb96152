"""The synthetic study: Gaussian mixtures in R^dim, logistic and MLP models, all quantizers, a sweep over n.

Each (model, n) point is one :func:`qmis_jax.audit` on its own replicates; its chunks and its finished report are
kept in the study's :class:`~qmis_jax.store.ResultStore`, so ``--resume`` loses nothing. The study writes
``report.json`` (the report schema of design.md for the main point, the largest n of the first model, with every
point under ``"runs"``), ``report.md`` and the figures.
"""

from __future__ import annotations

import dataclasses
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

MODELS = ("logistic", "mlp")
QUICK_QUANTIZERS = ("fp32", "int8", "int4", "int2", "ternary", "sign", "prune50", "grid_fixed", "grid_adaptive")


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

    @classmethod
    def quick(cls, **overrides) -> SyntheticConfig:
        """Sizes that finish in about a minute on two CPU cores."""
        base = dict(n_values=(400, 800), replicates=64, models=("logistic",), dim=16, quantizers=QUICK_QUANTIZERS)
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
    names = cfg.quantizers or (*Q.names(), "grid_fixed", "grid_adaptive")
    for name in names:
        if name not in ("grid_fixed", "grid_adaptive"):
            Q.get(name)  # KeyError listing the valid names
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


def make_problem(cfg: SyntheticConfig, model: str):
    if model == "logistic":
        return problems.logistic_mixture(dim=cfg.dim, k_modes=cfg.k_modes, seed=cfg.seed)
    return problems.mlp_mixture(dim=cfg.dim, k_modes=cfg.k_modes, hidden=cfg.hidden, seed=cfg.seed)


def estimate_bytes(cfg: SyntheticConfig) -> int:
    """Rough peak bytes of one replicate at the largest n (as estimated by the audit), to refuse impossible budgets."""
    p = cfg.dim + 1 if "mlp" not in cfg.models else (cfg.dim + 2) * cfg.hidden + 1
    return replicate_bytes(n=max(cfg.n_values), p=p, dx=cfg.dim)


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
            f"one replicate needs about {need / 2**20:.3g} MiB at n = {max(cfg.n_values)}, more than "
            f"--memory-budget {cfg.memory_budget} bytes ({cfg.memory_budget / 2**20:.3g} MiB); raise the budget or "
            "lower --n"
        )
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    config["study"] = "synthetic"
    store = ResultStore(out, config, resume=resume)
    points = [(m, n) for m in cfg.models for n in sorted(cfg.n_values)]
    bar = progress_bar(len(points), progress)
    runs = []
    key = jax.random.key(cfg.seed)
    models = {model: make_problem(cfg, model) for model in cfg.models}  # one object: programs compile once
    for model, n in points:
        problem = models[model]
        tag = f"{model}-n{n}"
        bar.set_description(tag)

        def compute(model=model, n=n, problem=problem, tag=tag):
            report = audit(
                jax.random.fold_in(jax.random.fold_in(key, MODELS.index(model)), n),
                problem,
                quantizer_set(cfg, n),
                n=n,
                replicates=cfg.replicates,
                ptq=cfg.ptq,
                method=cfg.method,
                attacks=cfg.attacks,
                memory_budget=cfg.memory_budget,
                store=store.prefixed(tag + "."),
                progress=lambda stage, done: bar.set_postfix_str(f"{stage} {done}"),
            )
            return report.to_dict()

        run_report = store.get_or_compute_json(f"report-{tag}", compute)
        runs.append(run_report)
        if on_point is not None:
            on_point(run_report)
        bar.update(1)
    bar.close()
    return write_outputs(out, runs, config)


def write_outputs(out: str, runs: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """``report.json``, ``report.md`` and the figures from finished runs."""
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
    report = dict(main)
    report["study"] = "synthetic"
    report["study_config"] = config
    report["study_config_hash"] = config_hash(config)
    report["environment"] = environment()
    report["indicator_vs_lira"] = plots.indicator_attack_agreement(main, attack="lira")
    report["runs"] = list(runs)
    write_json(os.path.join(out, "report.json"), report)
    md = markdown.render("qmis_jax synthetic study", runs, figures=figures)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(md)
    return report
