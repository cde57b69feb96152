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


def is_continuous(q: Mapping[str, Any]) -> bool:
    """Whether a report entry's release is continuous (a float32 scale or leaf, theory.md section 9)."""
    rel = q.get("release") or {}
    return bool(rel.get("continuous", q.get("continuous", False)))


def release_style(q: Mapping[str, Any], color: str) -> dict[str, Any]:
    """Marker keywords that tell releases apart: filled circle (discrete), hollow square (continuous)."""
    if is_continuous(q):
        return {"marker": "s", "mfc": "none", "mec": color, "color": color, "ls": "none"}
    return {"marker": "o", "color": color, "ls": "none"}


def plot_indicator(report: Report, path: str) -> str:
    """``r_Q^n`` per quantizer: the population value (dot) and the 5-95% range of single-model audits (bar).

    Continuous releases (``r = 0`` by theory.md section 9) are drawn with a hollow marker and labelled.
    """
    names = list(report["ranking"])
    qs = report["quantizers"]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    for i, name in enumerate(names):
        s = qs[name]["r_single"]
        ax.plot([s["q05"], s["q95"]], [i, i], color="tab:blue", lw=3, alpha=0.5)
        ax.plot(s["median"], i, "|", color="tab:blue", ms=12)
        ax.plot(qs[name]["r_population"] or 0.0, i, **release_style(qs[name], "black"))
    ax.set_yticks(range(len(names)), [f"{nm} (continuous)" if is_continuous(qs[nm]) else nm for nm in names])
    ax.invert_yaxis()
    ax.set_xlabel(r"indicator $r_Q^n$ (larger = more secure)")
    ax.set_xscale("symlog", linthresh=1e-6)
    ax.set_title(f"{report['problem']['name']}, n = {report['n']}: population (dot; hollow = continuous), single 5-95%")
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


def heldout_advantage(q: Mapping[str, Any], attack: str) -> float | None:
    """The attack's held-out advantage (thresholds fixed on other replicates), or None when it did not run."""
    res = q.get("attacks", {}).get(attack)
    if res is None or res.get("advantage_heldout") is None:
        return None
    return float(res["advantage_heldout"])


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return {"spearman": float("nan"), "pvalue": float("nan"), "count": len(xs)}
    res = sps.spearmanr(xs, ys)
    return {"spearman": float(res.statistic), "pvalue": float(res.pvalue), "count": len(xs)}


def indicator_attack_agreement(report: Report, *, attack: str = "lira") -> dict[str, float]:
    """Spearman rank correlation between ``r_population`` and ``1 - held-out advantage`` of an attack across
    quantizers (continuous releases count with ``r = 0``)."""
    xs, ys = [], []
    for q in report["quantizers"].values():
        adv = heldout_advantage(q, attack)
        if adv is None:
            continue
        xs.append(q["r_population"] or 0.0)
        ys.append(1.0 - adv)
    return _spearman(xs, ys)


def indicator_bracket_agreement(report: Report, *, end: int = 0) -> dict[str, float]:
    """Spearman rank correlation between ``r_population`` and one end of the certified MIS bracket across
    quantizers (``end=0``: the swap-coupling lower end; ``end=1``: the held-out attacks' upper end)."""
    xs, ys = [], []
    for q in report["quantizers"].values():
        b = q.get("mis_bracket")
        if b is None:
            continue
        xs.append(q["r_population"] or 0.0)
        ys.append(float(b[end]))
    return _spearman(xs, ys)


def plot_indicator_vs_attack(report: Report, path: str, *, attack: str = "lira") -> str:
    """Indicator ``r_population`` against the attack's held-out advantage (with its interval), continuous releases
    hollow, with the Spearman rank correlation."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for j, (name, q) in enumerate(report["quantizers"].items()):
        adv = heldout_advantage(q, attack)
        if adv is None:
            continue
        lo, hi = q["attacks"][attack].get("advantage_heldout_ci", (adv, adv))
        ax.errorbar(
            q["r_population"] or 0.0,
            adv,
            yerr=[[max(adv - lo, 0.0)], [max(hi - adv, 0.0)]],
            label=name + (" (continuous)" if is_continuous(q) else ""),
            **release_style(q, f"C{j % 10}"),
        )
    rho = indicator_attack_agreement(report, attack=attack)
    ax.set_xscale("symlog", linthresh=1e-6)
    ax.set_xlabel(r"indicator $r_Q^n$ (0 for continuous releases)")
    ax.set_ylabel(f"{attack} held-out advantage (TPR - FPR)")
    ax.set_title(f"Does the indicator rank like the held-out attack? Spearman {rho['spearman']:.2f}")
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
    """The privacy figure to maximise: the certified lower end of the MIS bracket when the report has one, else
    ``r_population``."""
    b = q.get("mis_bracket")
    return float(b[0]) if b is not None else float(q["r_population"] or 0.0)


def plot_privacy_utility(report: Report, path: str) -> str:
    """The certified MIS bracket (interval; marker at its certified lower end) against utility, with the Pareto
    front of the lower ends. Continuous releases are hollow squares."""
    names = list(report["quantizers"])
    pts, label = [], "utility"
    for name in names:
        q = report["quantizers"][name]
        label, u = utility_score(q["utility"])
        pts.append((privacy_score(q), u))
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, (name, (p, u)) in enumerate(zip(names, pts)):
        q = report["quantizers"][name]
        color = f"C{j % 10}"
        b = q.get("mis_bracket")
        if b is not None:
            ax.plot([b[0], b[1]], [u, u], color=color, lw=2, alpha=0.6)
        ax.plot(p, u, **release_style(q, color))
        ax.annotate(name, (p, u), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front (lower ends)")
    ax.plot([], [], "o", color="gray", label="discrete release")
    ax.plot([], [], "s", mfc="none", mec="gray", color="gray", label="continuous release")
    ax.set_xlabel("MIS: certified bracket, jointly 95% (marker at the lower end)")
    ax.set_ylabel(label)
    ax.set_title(f"privacy vs utility, n = {report['n']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_rate_convergence(points: Sequence[Mapping[str, Any]], path: str) -> str:
    """Part one of the synthetic study: ``(-log(flip rate)/n) / r`` against ``n r`` per quantizer, with the
    flip rate's standard error carried by the delta method (``se / (n p r)``); theory.md sections 4-5 predict the
    ratio approaches 1 from above as ``n r`` grows (the sub-exponential factors fade).

    ``points``: rows with ``quantizer``, ``n``, ``r``, ``flip_rate``, ``flip_rate_se``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, name in enumerate(dict.fromkeys(p["quantizer"] for p in points)):
        rows = sorted((p for p in points if p["quantizer"] == name and p["r"]), key=lambda p: p["n"] * p["r"])
        xs, ys, es = [], [], []
        for p in rows:
            if not 0 < p["flip_rate"] < 1:
                continue
            xs.append(p["n"] * p["r"])
            ys.append(-math.log(p["flip_rate"]) / p["n"] / p["r"])
            es.append((p["flip_rate_se"] or 0.0) / (p["n"] * p["flip_rate"] * p["r"]))
        if xs:
            ax.errorbar(xs, ys, yerr=es, fmt="o-", color=f"C{j % 10}", label=name, capsize=2)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"$n\,r$ (population indicator at that n)")
    ax.set_ylabel(r"$(-\log \mathrm{flip}/n)\,/\,r$")
    ax.set_title("Monte Carlo rate over the indicator (1 = the indicator's rate)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def _point_label(p: Mapping[str, Any]) -> str:
    """A part-one point's series: its quantizer, with its PTQ when the row names one."""
    return f"{p['quantizer']} ({p['ptq']})" if p.get("ptq") else p["quantizer"]


PTQ_STYLES = {"loss": {"marker": "o", "color": "C0"}, "rtn": {"marker": "s", "color": "C3"}}


def plot_flip_agreement(points: Sequence[Mapping[str, Any]], path: str, *, z: float = 4.0) -> str:
    """Part one: the Monte Carlo flip rate against the indicator's predicted flip probability, one point per
    quantizer, PTQ and n, on log-log axes with the diagonal (theory.md sections 5-6).

    Error bars: one standard error each way (the prediction's from its population sample, the Monte Carlo rate's
    binomial one); a marker per PTQ (circles: loss-minimising, squares: round-to-nearest). Points whose two values
    differ by more than ``z`` combined standard errors (the row's ``agree`` is False) are outlined in black and
    labelled; a flip rate of 0 is drawn at the axis floor as a down-pointing triangle.

    ``points``: rows with ``flip_rate_predicted``, ``flip_rate_predicted_se``, ``flip_rate``, ``flip_rate_se``,
    ``ptq``, ``quantizer``, ``n`` and ``agree``.
    """
    rows = [p for p in points if p.get("flip_rate_predicted") is not None]
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    values = [v for p in rows for v in (p["flip_rate_predicted"], p["flip_rate"]) if v and v > 0]
    floor = min(values) / 2 if values else 1e-3
    top = min(1.0, max([*values, 0.5]) * 1.5)
    for ptq in dict.fromkeys(p.get("ptq") or "loss" for p in rows):
        style = PTQ_STYLES.get(ptq, {"marker": "^", "color": "C2"})
        sel = [p for p in rows if (p.get("ptq") or "loss") == ptq]
        for k, p in enumerate(sel):
            x, y = p["flip_rate_predicted"], p["flip_rate"]
            xe, ye = p.get("flip_rate_predicted_se") or 0.0, p.get("flip_rate_se") or 0.0
            zero = y <= 0
            y_draw = floor if zero else y
            ax.errorbar(
                max(x, floor),
                y_draw,
                xerr=[[min(xe, max(x - floor, 0.0))], [xe]],
                yerr=None if zero else [[min(ye, y - floor)], [ye]],
                marker="v" if zero else style["marker"],
                color=style["color"],
                mec="black" if p.get("agree") is False else style["color"],
                mew=1.5 if p.get("agree") is False else 0.8,
                ls="none",
                capsize=2,
                ms=5,
                alpha=0.85,
                label=f"{ptq} PTQ" if k == 0 else None,
            )
            if p.get("agree") is False:
                ax.annotate(f"{p['quantizer']} n={p['n']}", (max(x, floor), y_draw), fontsize=6, xytext=(3, -8),
                            textcoords="offset points")  # fmt: skip
    ax.plot([floor, top], [floor, top], "k:", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor * 0.9, top)
    ax.set_ylim(floor * 0.8, top)
    ax.set_xlabel("predicted flip probability (indicator's events, joint Gaussian)")
    ax.set_ylabel("Monte Carlo flip rate")
    judged = [p for p in rows if p.get("agree") is not None]
    agree = sum(bool(p["agree"]) for p in judged)
    ax.set_title(f"predicted vs measured flip: {agree} of {len(judged)} within {z:g} combined SE", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_validation_pilot(pilot: Mapping[str, Any], path: str) -> str:
    """Part one's pilot: each quantizer's population indicator ``r`` (with its standard error) under each PTQ, at
    the pilot size (theory.md sections 4-6); ``r = 0`` is drawn at the left edge as a hollow marker.

    ``pilot``: ``{ptq: {"n": n, "quantizers": {name: {"r", "r_se", ...}}}}``.
    """
    ptqs = list(pilot)
    names = list(dict.fromkeys(nm for ptq in ptqs for nm in pilot[ptq]["quantizers"]))
    rs = [e["r"] for ptq in ptqs for e in pilot[ptq]["quantizers"].values() if e["r"] > 0]
    floor = min(rs) / 2 if rs else 1e-6
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.6))
    for j, ptq in enumerate(ptqs):
        style = PTQ_STYLES.get(ptq, {"marker": "^", "color": "C2"})
        for i, nm in enumerate(names):
            e = pilot[ptq]["quantizers"].get(nm)
            if e is None:
                continue
            y = i + 0.15 * (j - (len(ptqs) - 1) / 2)
            r, se = e["r"], e.get("r_se") or 0.0
            if r > 0:
                ax.errorbar(r, y, xerr=[[min(se, r - floor)], [se]], ls="none", capsize=2, marker=style["marker"],
                            color=style["color"], label=f"{ptq} PTQ" if i == 0 else None)  # fmt: skip
            else:
                ax.plot(floor, y, ls="none", marker=style["marker"], mfc="none", mec=style["color"])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(left=floor * 0.8)
    ax.set_xlabel(r"population indicator $r$ (hollow at the edge: $r = 0$)")
    n = pilot[ptqs[0]]["n"] if ptqs else "?"
    ax.set_title(f"pilot, n = {n}: indicator per quantizer and PTQ", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x", which="both")
    return _save(fig, path)


def plot_validation_bracket(points: Sequence[Mapping[str, Any]], path: str) -> str:
    """Part one: the certified MIS bracket (bar) around the asymptotic MIS (filled dot in the asymptotic regime,
    hollow outside it) against ``n r`` per quantizer (and PTQ, where the rows name one).

    ``points``: rows with ``quantizer``, ``n``, ``r``, ``mis_bracket``, ``mis_asymptotic``, ``asymptotic_regime``
    and optionally ``ptq``.
    """
    names = list(dict.fromkeys(_point_label(p) for p in points))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, name in enumerate(names):
        color = f"C{j % 10}"
        rows = sorted((p for p in points if _point_label(p) == name and p["r"]), key=lambda p: p["n"] * p["r"])
        for k, p in enumerate(rows):
            x = p["n"] * p["r"] * (1.0 + 0.04 * (j - len(names) / 2))  # small offset to keep bars apart
            lo, hi = p["mis_bracket"]
            ax.plot([x, x], [lo, hi], color=color, lw=2, alpha=0.6, label=name if k == 0 else None)
            mis = p.get("mis_asymptotic")
            if mis is not None:
                style = {"mfc": color} if p.get("asymptotic_regime") else {"mfc": "none"}
                ax.plot(x, mis, "o", mec=color, **style)
    ax.set_xscale("log")
    ax.set_xlabel(r"$n\,r$")
    ax.set_ylabel("MIS")
    ax.set_title("certified bracket (bar), asymptotic MIS (dot; hollow: outside regime)", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bracket_width(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Part one: the bracket's width and ends against the replicate count (same quantizer and n).

    ``rows``: ``replicates`` and ``mis_bracket`` per run.
    """
    rows = sorted(rows, key=lambda r: r["replicates"])
    reps = [r["replicates"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(reps, [r["mis_bracket"][1] - r["mis_bracket"][0] for r in rows], "o-", color="k", label="width")
    ax.plot(reps, [r["mis_bracket"][0] for r in rows], "^--", color="C0", label="lower end (swap coupling)")
    ax.plot(reps, [r["mis_bracket"][1] for r in rows], "v--", color="C1", label="upper end (held-out attacks)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("replicates")
    ax.set_ylabel("MIS")
    ax.set_title("the bracket narrows with the replicate count, not with n")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
