"""The offline molecular-property study: quantized linear/MLP heads on RDKit features of a drug-discovery set.

For every featurizer and head: one model trained on the data set's training split; for every quantizer its
utility on the test split (accuracy and AUROC, or RMSE in the target's units and Spearman correlation), the
single-model indicator ``r_hat`` with its interval (theory.md section 6) and its asymptotic MIS, and LiRA on
shadow replicates drawn as random halves of the training pool. With one fixed data set the only attack design
available is the pool design (``lira_pool``, theory.md section 7): membership within a fixed pool, a different game
from that of section 1, so its advantage is reported as such and bounds nothing; ``mis_empirical_upper`` is None.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as sps

from qmis_jax import train
from qmis_jax._progress import progress_bar
from qmis_jax._version import __version__
from qmis_jax.audit import audit_model, environment, resolve_quantizers
from qmis_jax.problems import Problem
from qmis_jax.store import ResultStore, config_hash, write_json
from qmis_jax.studies import plots
from qmis_jax.studies._points import study_diagnostics, study_point

FEATURIZERS = ("ecfp", "atompair", "maccs", "rdkit2d")
# E8M0 variants run next to their float32 originals (theory.md section 9): a float32 scale makes a release
# continuous, a power-of-two scale does not
E8M0_VARIANTS = ("int8@e8m0", "int4@e8m0", "int2@e8m0", "sign@e8m0", "ternary@e8m0", "ternary_s90@e8m0")


def default_quantizers() -> tuple[str, ...]:
    """The study's default quantizers: every preset, then the E8M0 variants of :data:`E8M0_VARIANTS`."""
    from qmis_jax import quantizers as Q

    return (*Q.names(), *E8M0_VARIANTS)


HEADS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class MolecularConfig:
    """Configuration of the molecular study."""

    dataset: str = "solubility"
    featurizers: tuple[str, ...] = FEATURIZERS
    heads: tuple[str, ...] = HEADS
    task: str | None = None
    n: int | None = None
    quantizers: tuple[str, ...] | None = None
    replicates: int = 256
    seed: int = 0
    ptq: str = "loss"
    method: str = "gaussian"
    memory_budget: int = 2 * 2**30

    @classmethod
    def quick(cls, **overrides) -> MolecularConfig:
        base = dict(featurizers=("maccs",), heads=("linear",), replicates=32)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def validate(cfg: MolecularConfig) -> MolecularConfig:
    from qmis_jax import molecular as mol

    if cfg.dataset not in mol.dataset_names():
        raise KeyError(f"--dataset: unknown data set {cfg.dataset!r}; valid: {', '.join(mol.dataset_names())}")
    for f in cfg.featurizers:
        if f not in mol.featurizer_names():
            raise KeyError(f"--featurizers: unknown featurizer {f!r}; valid: {', '.join(mol.featurizer_names())}")
    for h in cfg.heads:
        if h not in HEADS:
            raise KeyError(f"--heads: unknown head {h!r}; valid: {', '.join(HEADS)}")
    if cfg.replicates < 4:
        raise ValueError(f"--replicates must be at least 4, got {cfg.replicates}")
    if cfg.n is not None and cfg.n < 8:
        raise ValueError(f"--n must be at least 8 molecules, got {cfg.n}")
    names = cfg.quantizers or default_quantizers()
    resolve_quantizers(list(names))
    return dataclasses.replace(cfg, quantizers=tuple(names))


def test_utility(problem: Problem, params, x, y, info: dict[str, Any]) -> dict[str, float]:
    """Utility on the test split: accuracy and AUROC (binary) or RMSE in original units and Spearman."""
    pred = np.asarray(problem.predict(params, jnp.asarray(x)), dtype=float)
    y = np.asarray(y, dtype=float)
    if problem.task == "binary":
        pos, neg = pred[y > 0.5], pred[y <= 0.5]
        ranks = sps.rankdata(np.concatenate([pos, neg]))
        auroc = (ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / max(pos.size * neg.size, 1)
        return {"accuracy": float(np.mean((pred > 0.5) == (y > 0.5))), "auroc": float(auroc)}
    scale = float(info.get("y_scale", 1.0))
    rho = sps.spearmanr(pred, y).statistic if np.ptp(pred) > 0 else float("nan")
    return {"rmse": float(np.sqrt(np.mean((pred - y) ** 2)) * scale), "spearman": float(rho)}


def molecular_point(
    key, problem: Problem, data, qs, *, replicates: int, ptq: str, method: str, store, memory_budget: int
) -> dict[str, Any]:
    """One (featurizer, head) point: the model trained on the training split, then :func:`qmis_jax.audit_model`
    (per-quantizer test utility, single-model indicator, and LiRA on shadow models over random halves of the
    training split: the pool game)."""
    k_fit, k_audit = jax.random.split(key)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n = int(x.shape[0])
    # the budget is checked here, before any quantizer work: a budget below one replicate is refused at once
    fit = train.fit(k_fit, problem, x, y, weights=jnp.ones((1, n), x.dtype), memory_budget=memory_budget)
    params = jax.tree.map(lambda a: a[0], fit.params)
    report = audit_model(
        k_audit,
        problem,
        params,
        x,
        y,
        qs,
        test=(data.x_test, data.y_test),
        utility_fn=lambda p, xt, yt: test_utility(problem, p, xt, yt, data.info),
        pool_replicates=replicates,
        ptq=ptq,
        method=method,
        memory_budget=memory_budget,
        store=store,
    ).to_dict()
    from qmis_jax import quantizers as Q

    for name, entry in report["quantizers"].items():
        entry["utility_fp32"] = report["trained_utility"]
        if "release" not in entry:  # what is published: the parts that make the release continuous
            entry["release"] = Q.release_info(qs[name], params, ptq=ptq)
    return {
        "n": n,
        "replicates": replicates,
        "problem": problem.info(),
        "data": data.info,
        "n_invalid_train": int(data.n_invalid_train),
        "n_invalid_test": int(data.n_invalid_test),
        "quantizers": report["quantizers"],
        "ranking": report["ranking"],
        "ranking_by": report["ranking_by"],
        "train_grad_norm": float(fit.grad_norm[0]),
        "train_converged": bool(fit.converged[0]),
    }


def _utility_text(metric: str, value: float) -> str:
    """``rmse 1.11`` for the maximised ``-rmse`` score, else ``accuracy 0.85``."""
    return f"rmse {-value:.3g}" if metric == "-rmse" else f"{metric} {value:.3g}"


def _pool_privacy(q: dict[str, Any]) -> float | None:
    """``1 -`` the pool-LiRA advantage of a quantizer entry, None where the attack did not run (too small a pool)."""
    a = q["attacks"]["lira_pool"]
    return None if a.get("advantage") is None else 1.0 - a["advantage"]


def _pool_cell(a: dict[str, Any]) -> str:
    from qmis_jax.studies.markdown import fmt  # as in markdown_report: markdown imports this module

    if a.get("advantage") is None:
        return f"not run: {a.get('reason', '')}"
    return f"{fmt(a['advantage'])} [{fmt(a['advantage_ci'][0])}, {fmt(a['advantage_ci'][1])}]"


def pareto_table(point: dict[str, Any]) -> list[dict[str, Any]]:
    """Quantizers on the privacy-utility Pareto front of one point (privacy: 1 - pool-LiRA advantage)."""
    names = [n for n in point["quantizers"] if _pool_privacy(point["quantizers"][n]) is not None]
    pts = []
    for name in names:
        q = point["quantizers"][name]
        pts.append((_pool_privacy(q), plots.utility_score(q["utility"])[1]))
    return [
        {
            "quantizer": names[i],
            "privacy": pts[i][0],
            "utility": pts[i][1],
            "utility_metric": plots.utility_score(point["quantizers"][names[i]]["utility"])[0],
            "r_hat": point["quantizers"][names[i]]["r_hat"],
        }
        for i in plots.pareto_front(pts)
    ]


def run(cfg: MolecularConfig, out: str, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the molecular study into ``out``; returns the ``report.json`` dictionary."""
    from qmis_jax import molecular as mol

    cfg = validate(cfg)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    config["study"] = "molecular"
    store = ResultStore(out, config, resume=resume)
    task = {"classification": "binary", None: None, "regression": "regression"}[cfg.task]
    qs = resolve_quantizers(list(cfg.quantizers))
    points = [(f, h) for f in cfg.featurizers for h in cfg.heads]
    bar = progress_bar(len(points), progress)
    key = jax.random.key(cfg.seed)
    results = {}
    for i, (feat, head) in enumerate(points):
        tag = f"{feat}-{head}"
        bar.set_description(tag)

        def compute(feat=feat, head=head, tag=tag, i=i):
            data = _subsample(mol.prepare(cfg.dataset, feat, task=task), cfg.n, cfg.seed)
            problem = mol.molecular_problem(data, head=head)
            point = molecular_point(
                jax.random.fold_in(key, i),
                problem,
                data,
                qs,
                replicates=cfg.replicates,
                ptq=cfg.ptq,
                method=cfg.method,
                store=store.prefixed(tag + "."),
                memory_budget=cfg.memory_budget,
            )
            point["featurizer"], point["head"] = feat, head
            return point

        results[tag] = study_point(store, f"point-{tag}", compute)
        bar.update(1)
    bar.close()
    return write_outputs(out, cfg, config, results)


def _subsample(data, n: int | None, seed: int):
    """The first ``n`` points of a seeded permutation of the training split (all of it when ``n`` is None)."""
    size = int(data.x_train.shape[0])
    if n is None:
        return data
    if n > size:
        raise ValueError(f"--n must be at most the training split's {size} molecules, got --n {n}")
    keep = np.sort(np.random.default_rng(seed).permutation(size)[:n])
    return data._replace(x_train=data.x_train[keep], y_train=data.y_train[keep])


def write_outputs(out, cfg, config, results) -> dict[str, Any]:
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    figures = []
    for tag, point in results.items():
        path = os.path.join("figures", f"privacy_utility_{tag}.png")
        _plot_point(point, os.path.join(out, path), title=f"{cfg.dataset} {tag}")
        figures.append(path)
    first = next(iter(results.values()))
    report = {
        "version": __version__,
        "n": first["n"],
        "replicates": cfg.replicates,
        "problem": first["problem"],
        "config_hash": config_hash(config),
        "quantizers": first["quantizers"],
        "ranking": first["ranking"],
        "study": "molecular",
        "dataset": cfg.dataset,
        "attack_design": "pool (membership within the training split; a different game from theory.md section 1)",
        "points": results,
        "pareto": {tag: pareto_table(p) for tag, p in results.items()},
        "environment": environment(),
        "diagnostics": study_diagnostics({}),
        "study_config": config,
    }
    write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(render_markdown(report, figures))
    return report


def _plot_point(point, path, *, title):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    names = [n for n in point["quantizers"] if _pool_privacy(point["quantizers"][n]) is not None]
    pts = [
        (
            _pool_privacy(point["quantizers"][n]),
            plots.utility_score(point["quantizers"][n]["utility"])[1],
        )
        for n in names
    ]
    for j, (name, (p, u)) in enumerate(zip(names, pts)):
        ax.plot(p, u, "o", color=f"C{j % 10}")
        ax.annotate(name, (p, u), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = plots.pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("1 - pool-LiRA advantage")
    ax.set_ylabel(plots.utility_score(point["quantizers"][names[0]]["utility"])[0])
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(report, figures) -> str:
    from qmis_jax.audit.tables import release_cell
    from qmis_jax.studies.markdown import CONTINUITY, fmt

    lines = [
        f"# qmis_jax molecular study: {report['dataset']}",
        "",
        "Privacy: the single-model indicator `r_hat` (with its interval) and LiRA on random halves of the "
        "training pool (the pool game: it measures membership within a fixed pool and bounds nothing about "
        "the MIS of theory.md section 1). Utility on the test split.",
        "",
        CONTINUITY,
        "",
    ]
    for tag, point in report["points"].items():
        lines += [
            f"## {tag} (n = {point['n']}, invalid SMILES: {point['n_invalid_train']} train, "
            f"{point['n_invalid_test']} test)",
            "",
            "| quantizer | release | r_hat [interval] | 1 - MIS (asymptotic, plug-in; - outside its regime) "
            "| pool-LiRA advantage [95% CI] (pool game, descriptive) | utility |",
            "|---|---|---|---:|---|---|",
        ]
        for name in point["ranking"]:
            q = point["quantizers"][name]
            a = q["attacks"]["lira_pool"]
            mis = q["mis_asymptotic"] if q.get("asymptotic_regime") else None  # only in its regime
            util = ", ".join(f"{k} {fmt(v)}" for k, v in q["utility"].items())
            lines.append(
                f"| {name} | {release_cell(q)} | {fmt(q['r_hat'])} "
                f"[{fmt(q['r_hat_interval'][0])}, {fmt(q['r_hat_interval'][1])}] "
                f"| {fmt(None if mis is None else 1 - mis)} | {_pool_cell(a)} | {util} |"
            )
        lines += [
            "",
            "Pareto front (privacy = 1 - pool-LiRA advantage): "
            + ", ".join(
                f"{row['quantizer']} ({fmt(row['privacy'])}, {_utility_text(row['utility_metric'], row['utility'])})"
                for row in report["pareto"][tag]
            ),
            "",
        ]
    lines += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
