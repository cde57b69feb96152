"""Tables of an audit report, in markdown: what ``print(report)`` and the studies' ``report.md`` show."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Report = Mapping[str, Any]


def fmt(x: Any, digits: int = 3) -> str:
    """Format a number compactly for tables (``-`` for missing, scientific notation for small values)."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}f}"


def _attack_cell(q: Mapping[str, Any], name: str) -> str:
    res = q.get("attacks", {}).get(name)
    if res is None:
        return "-"
    lo, hi = res["advantage_ci"]
    return f"{fmt(res['advantage'])} [{fmt(lo)}, {fmt(hi)}]"


def _utility_cell(u: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in u.items() if not isinstance(v, dict))


def quantizer_table(report: Report) -> list[str]:
    """Markdown table of one audit: one row per quantizer in ranking order."""
    lines = [
        "| rank | quantizer | r_population | r_single median [q05, q95] | 1 - MIS (asymptotic) | flip rate (MC) "
        "| flip rate (predicted) | LOSS advantage [95% CI] | LiRA advantage [95% CI] | MIS upper (attacks) "
        "| utility |",
        "|---:|---|---:|---|---:|---:|---:|---|---|---:|---|",
    ]
    for i, name in enumerate(report["ranking"], 1):
        q = report["quantizers"][name]
        s = q["r_single"]
        mis = q.get("mis_asymptotic")
        one_minus = None if mis is None or (isinstance(mis, float) and math.isnan(mis)) else 1.0 - mis
        lines.append(
            f"| {i} | {name} | {fmt(q['r_population'])} | {fmt(s['median'])} [{fmt(s['q05'])}, {fmt(s['q95'])}] "
            f"| {fmt(one_minus)} | {fmt(q['flip_rate'])} | {fmt(q['flip_rate_predicted'])} "
            f"| {_attack_cell(q, 'loss')} | {_attack_cell(q, 'lira')} | {fmt(q.get('mis_empirical_upper'))} "
            f"| {_utility_cell(q['utility'])} |"
        )
    return lines


def single_model_table(report: Report) -> list[str]:
    """Markdown table of a single-model audit (:func:`qmis_jax.audit_model`): one row per quantizer."""
    attacks = sorted({a for q in report["quantizers"].values() for a in q.get("attacks", {})})
    lines = [
        "| rank | quantizer | r_hat | interval | 1 - MIS (asymptotic, plug-in) | continuous | "
        + "".join(f"{a} advantage (pool game) | " for a in attacks)
        + "utility |",
        "|---:|---|---:|---|---:|---|" + "---|" * len(attacks) + "---|",
    ]
    for i, name in enumerate(report["ranking"], 1):
        q = report["quantizers"][name]
        lo, hi = q["r_hat_interval"]
        mis = q.get("mis_asymptotic")
        cells = "".join(f"{_attack_cell(q, a)} | " for a in attacks)
        lines.append(
            f"| {i} | {name} | {fmt(q['r_hat'])} | [{fmt(lo)}, {fmt(hi)}] | {fmt(None if mis is None else 1 - mis)} "
            f"| {'yes' if q['continuous'] else 'no'} | {cells}{_utility_cell(q.get('utility', {}))} |"
        )
    return lines


def report_table(report: Report) -> list[str]:
    """The table that fits the report: an audit over replicates, or a single-model audit."""
    return single_model_table(report) if report.get("kind") == "single-model audit" else quantizer_table(report)
