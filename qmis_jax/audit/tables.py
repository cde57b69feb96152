"""Tables of an audit report, in markdown: what ``print(report)`` and the studies' ``report.md`` show."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Report = Mapping[str, Any]


def fmt(x: Any, digits: int = 3) -> str:
    """Format a number at ``digits`` significant digits for tables (``-`` for missing, scientific notation for
    values below 1e-3 or from 1e5 on)."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def not_run_cell(res: Mapping[str, Any] | None) -> str | None:
    """``not run: REASON`` for an attack entry with ``"ran": false`` (too small a design, theory.md section 10),
    else None."""
    if res is None or res.get("ran", True):
        return None
    return f"not run: {res.get('reason') or 'no reason recorded'}"


def _interval(value: Any, ci: Any) -> str:
    lo, hi = ci if ci is not None else (None, None)
    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def _attack_cell(q: Mapping[str, Any], name: str) -> str:
    """The held-out advantage of one attack with its interval (never the in-sample one), or why it did not run."""
    res = q.get("attacks", {}).get(name)
    if res is None:
        return "-"
    return not_run_cell(res) or _interval(res.get("advantage_heldout"), res.get("advantage_heldout_ci"))


def _pool_cell(q: Mapping[str, Any], name: str) -> str:
    """The advantage of a pool-design attack with its interval (a different game: it bounds nothing), or why it
    did not run."""
    res = q.get("attacks", {}).get(name)
    if res is None:
        return "-"
    return not_run_cell(res) or _interval(res.get("advantage"), res.get("advantage_ci"))


def _utility_cell(u: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {fmt(v)}" for k, v in u.items() if not isinstance(v, dict))


def release_cell(q: Mapping[str, Any]) -> str:
    """``discrete (scale format)`` or ``continuous: <the parts that make it so>``."""
    rel = q.get("release") or {}
    continuous = rel.get("continuous", q.get("continuous", False))
    if continuous:
        parts = rel.get("continuous_parts") or ["float32 values"]
        return "continuous: " + "; ".join(parts)
    scale = rel.get("scale_format")
    return f"discrete ({scale} scale)" if scale else "discrete"


def bracket_cell(q: Mapping[str, Any]) -> str:
    """The certified MIS bracket ``[lower, upper]`` (jointly 95%, theory.md section 10)."""
    b = q.get("mis_bracket")
    return "-" if b is None else f"[{fmt(b[0])}, {fmt(b[1])}]"


def asymptotic_cell(q: Mapping[str, Any]) -> str:
    """``mis_asymptotic`` where the report says the asymptotic regime holds, else ``-`` (read the bracket)."""
    mis = q.get("mis_asymptotic")
    if not q.get("asymptotic_regime") or mis is None or (isinstance(mis, float) and math.isnan(mis)):
        return "-"
    return fmt(mis)


def indicator_cell(q: Mapping[str, Any]) -> str:
    """``r_population``; for a continuous release 0 with the codes-only rate beside it, labelled as such."""
    if q.get("continuous"):
        codes = q.get("r_codes")
        return "0" if codes is None else f"0 (codes only: {fmt(codes)})"
    return fmt(q.get("r_population"))


def _flip_cell(q: Mapping[str, Any]) -> str:
    se = q.get("flip_rate_se")
    return f"{fmt(q['flip_rate'])} ± {fmt(se)}" if se is not None else fmt(q["flip_rate"])


def _swap_cell(q: Mapping[str, Any]) -> str:
    swap = q.get("swap")
    if not swap:
        return "-"
    return f"{fmt(swap.get('rate'))} (≤ {fmt(swap.get('upper'))})"


def quantizer_table(report: Report) -> list[str]:
    """Markdown table of one audit, one row per quantizer in ranking order.

    The headline is the certified MIS bracket next to the indicator; the asymptotic MIS is shown only in the
    asymptotic regime; attack advantages are the held-out ones (thresholds fixed on other replicates).
    """
    attacks = [
        a
        for a in ("loss", "lira", "lira_offline", "rmia", "rmia_offline")
        if any(a in q.get("attacks", {}) for q in report["quantizers"].values())
    ]
    lines = _head(
        "| rank | quantizer | release | MIS bracket [95%] | indicator r | r_single median [q05, q95] "
        "| sqrt(n) c_min | MIS (asymptotic) | flip rate ± SE (MC) | flip (predicted) | swap rate (95% upper) | ",
        "|---:|---|---|---|---:|---|---:|---:|---|---:|---|",
        [f"{a} held-out advantage [95% CI]" for a in attacks],
    )
    for i, name in enumerate(report["ranking"], 1):
        q = report["quantizers"][name]
        s = q["r_single"]
        cells = "".join(f"{_attack_cell(q, a)} | " for a in attacks)
        lines.append(
            f"| {i} | {name} | {release_cell(q)} | {bracket_cell(q)} | {indicator_cell(q)} "
            f"| {fmt(s['median'])} [{fmt(s['q05'])}, {fmt(s['q95'])}] | {fmt(q.get('sqrt_n_c_min'))} "
            f"| {asymptotic_cell(q)} | {_flip_cell(q)} | {fmt(q.get('flip_rate_predicted'))} | {_swap_cell(q)} "
            f"| {cells}{_utility_cell(q['utility'])} |"
        )
    return lines


def _head(first: str, rule: str, attack_columns: list[str]) -> list[str]:
    """A table's header and rule: the fixed columns, one column per attack, then utility."""
    cells = "".join(f"{c} | " for c in attack_columns)
    return [first + cells + "utility |", rule + "---|" * len(attack_columns) + "---|"]


def attack_table(report: Report) -> list[str]:
    """Markdown table of the attacks per quantizer: held-out advantage with its interval and one-sided lower limit
    (the bracket's input), then the in-sample advantage and AUC, which are descriptive only. An attack that did
    not run shows ``not run: REASON``."""
    attacks = sorted({a for q in report["quantizers"].values() for a in q.get("attacks", {})})
    lines = [
        "| quantizer | attack | held-out advantage [95% CI] | lower limit (bracket) | in-sample advantage "
        "(descriptive) | AUC (descriptive) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name in report["ranking"]:
        q = report["quantizers"][name]
        for a in attacks:
            res = q.get("attacks", {}).get(a)
            if res is None:
                continue
            lines.append(
                f"| {name} | {a} | {_attack_cell(q, a)} | {fmt(res.get('advantage_bound'))} "
                f"| {fmt(res.get('advantage'))} | {fmt(res.get('auc'))} |"
            )
    return lines


def single_model_table(report: Report) -> list[str]:
    """Markdown table of a single-model audit (:func:`qmis_jax.audit_model`): one row per quantizer."""
    attacks = sorted({a for q in report["quantizers"].values() for a in q.get("attacks", {})})
    lines = _head(
        "| rank | quantizer | r_hat | interval | 1 - MIS (asymptotic, plug-in; - outside its regime) | release | ",
        "|---:|---|---:|---|---:|---|",
        [f"{a} advantage (pool game)" for a in attacks],
    )
    for i, name in enumerate(report["ranking"], 1):
        q = report["quantizers"][name]
        lo, hi = q["r_hat_interval"]
        mis = q.get("mis_asymptotic") if q.get("asymptotic_regime") else None  # only in its regime
        cells = "".join(f"{_pool_cell(q, a)} | " for a in attacks)
        lines.append(
            f"| {i} | {name} | {fmt(q['r_hat'])} | [{fmt(lo)}, {fmt(hi)}] | {fmt(None if mis is None else 1 - mis)} "
            f"| {release_cell(q)} | {cells}{_utility_cell(q.get('utility', {}))} |"
        )
    return lines


def report_table(report: Report) -> list[str]:
    """The table that fits the report: an audit over replicates, or a single-model audit."""
    return single_model_table(report) if report.get("kind") == "single-model audit" else quantizer_table(report)
