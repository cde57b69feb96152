"""Figures of a study, drawn from report dictionaries (the schema of ``AuditReport.to_dict``).

Every function takes plain dictionaries and a file path, so figures can be redrawn from a saved ``report.json``
without recomputing anything. Matplotlib runs with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

Report = Mapping[str, Any]


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_indicator(report: Report, path: str) -> str:
    """``r_Q^n`` per quantizer: the population value (dot) and the 5-95% range of single-model audits (bar)."""
    names = list(report["ranking"])
    qs = report["quantizers"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    for i, name in enumerate(names):
        s = qs[name]["r_single"]
        ax.plot([s["q05"], s["q95"]], [i, i], color="tab:blue", lw=3, alpha=0.5)
        ax.plot(s["median"], i, "|", color="tab:blue", ms=12)
        ax.plot(qs[name]["r_population"], i, "o", color="black")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(r"indicator $r_Q^n$ (larger = more secure)")
    ax.set_title(f"{report['problem']['name']}, n = {report['n']}: population (dot), single audits 5-95% (bar)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def empirical_rate(q: Mapping[str, Any], n: int) -> float:
    """``-log(P(flip)) / n`` from the Monte Carlo flip rate (NaN when no flip was seen).

    ``Delta <= 2 P(release != population release)`` and both share the exponent ``r_Q^n`` (theory.md sections 1, 4),
    so this is the Monte Carlo estimate of the exponential rate the indicator predicts.
    """
    rate = q["flip_rate"]
    return -math.log(rate) / n if rate > 0 else float("nan")


def plot_rates_vs_n(runs: Sequence[Report], path: str, *, names: Sequence[str] | None = None) -> str:
    """Monte Carlo ``-log(flip rate)/n`` (solid) beside the indicator ``r_Q^n`` (dashed) against n."""
    runs = sorted(runs, key=lambda r: r["n"])
    names = list(names or runs[0]["quantizers"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, name in enumerate(names):
        color = f"C{j % 10}"
        ns = [r["n"] for r in runs if name in r["quantizers"]]
        emp = [empirical_rate(r["quantizers"][name], r["n"]) for r in runs if name in r["quantizers"]]
        ind = [r["quantizers"][name]["r_population"] for r in runs if name in r["quantizers"]]
        ax.plot(ns, emp, "o-", color=color, label=f"{name}: -log(flip)/n")
        ax.plot(ns, ind, "--", color=color, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("n (training set size)")
    ax.set_ylabel("rate")
    ax.set_title("Monte Carlo rate (solid) vs indicator r (dashed)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_roc(report: Report, path: str, *, attack: str = "lira") -> str:
    """ROC curves of one attack per quantizer on log-log axes (the low-FPR regime that matters)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, (name, q) in enumerate(report["quantizers"].items()):
        res = q.get("attacks", {}).get(attack)
        if not res or "roc" not in res:
            continue
        fpr = np.maximum(np.asarray(res["roc"]["fpr"]), 1e-5)
        tpr = np.maximum(np.asarray(res["roc"]["tpr"]), 1e-5)
        ax.plot(fpr, tpr, color=f"C{j % 10}", label=f"{name} (AUC {res['auc']:.3f})")
    ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{attack} ROC, n = {report['n']}")
    ax.legend(fontsize=7)
    return _save(fig, path)


def indicator_attack_agreement(report: Report, *, attack: str = "lira") -> dict[str, float]:
    """Spearman rank correlation between ``r_population`` and ``1 - advantage`` of an attack across quantizers."""
    xs, ys = [], []
    for q in report["quantizers"].values():
        res = q.get("attacks", {}).get(attack)
        if res is None:
            continue
        xs.append(q["r_population"])
        ys.append(1.0 - res["advantage"])
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return {"spearman": float("nan"), "pvalue": float("nan"), "count": len(xs)}
    res = sps.spearmanr(xs, ys)
    return {"spearman": float(res.statistic), "pvalue": float(res.pvalue), "count": len(xs)}


def plot_indicator_vs_attack(report: Report, path: str, *, attack: str = "lira") -> str:
    """Indicator ``r_population`` against the attack's advantage, with the Spearman rank correlation."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for j, (name, q) in enumerate(report["quantizers"].items()):
        res = q.get("attacks", {}).get(attack)
        if res is None:
            continue
        lo, hi = res["advantage_ci"]
        ax.errorbar(
            q["r_population"],
            res["advantage"],
            yerr=[[res["advantage"] - lo], [hi - res["advantage"]]],
            fmt="o",
            color=f"C{j % 10}",
            label=name,
        )
    rho = indicator_attack_agreement(report, attack=attack)
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel(r"indicator $r_Q^n$")
    ax.set_ylabel(f"{attack} advantage (TPR - FPR)")
    ax.set_title(f"Does the indicator rank like the attack? Spearman {rho['spearman']:.2f}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be maximised, sorted by the first."""
    idx = []
    for i, (a, b) in enumerate(points):
        if any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            continue
        idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def utility_score(utility: Mapping[str, float]) -> tuple[str, float]:
    """The utility figure to maximise: accuracy or AUROC for classification, minus RMSE for regression."""
    for key in ("accuracy", "auroc"):
        if key in utility:
            return key, float(utility[key])
    return "-rmse", -float(utility["rmse"])


def privacy_score(q: Mapping[str, Any]) -> float:
    """The privacy figure to maximise: the empirical MIS upper bound when attacks ran, else ``r_population``."""
    value = q.get("mis_empirical_upper")
    return float(value) if value is not None else float(q["r_population"])


def plot_privacy_utility(report: Report, path: str) -> str:
    """Privacy (``1 - best section-1 attack advantage``) against utility, with the Pareto front."""
    names = list(report["quantizers"])
    pts, label = [], "utility"
    for name in names:
        q = report["quantizers"][name]
        label, u = utility_score(q["utility"])
        pts.append((privacy_score(q), u))
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for j, (name, (p, u)) in enumerate(zip(names, pts)):
        ax.plot(p, u, "o", color=f"C{j % 10}")
        ax.annotate(name, (p, u), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("privacy: 1 - largest attack advantage (MIS upper bound)")
    ax.set_ylabel(label)
    ax.set_title(f"privacy vs utility, n = {report['n']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
