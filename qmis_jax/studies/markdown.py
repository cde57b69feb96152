"""The readable ``report.md`` of a study, rendered from report dictionaries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qmis_jax.audit.tables import fmt, quantizer_table
from qmis_jax.studies.plots import empirical_rate, indicator_attack_agreement

Report = Mapping[str, Any]


def _diag_value(v: Any) -> str:
    """A diagnostic as text: integers and flags as they are, other numbers compact, ``-`` when not measured."""
    if v is None:
        return "-"
    if isinstance(v, (bool, int, str)):
        return str(v)
    return fmt(v)


def render(title: str, runs: Sequence[Report], *, figures: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """A study's markdown report: configuration, per-run ranking tables, rate-vs-n table and figure links."""
    out = [f"# {title}", ""]
    first = runs[0]
    out += [
        f"qmis_jax {first['version']}, configuration hash `{first['config_hash']}`, "
        f"{first.get('environment', {}).get('device_count', '?')} x "
        f"{first.get('environment', {}).get('device_kind', '?')}.",
        "",
        "How to read it: the indicator `r_Q^n` is the exponential rate at which the quantized release stops "
        "changing with one training point (`1 - MIS ~ exp(-n r)`, larger is more secure, 0 means only polynomial "
        "security). The attacks (LOSS on fresh data, LiRA on embedded targets) play the membership game itself, so "
        "`1 - advantage` is an upper bound on the MIS. The flip rate is the share of replicates whose release "
        "differs from the population release; the indicator predicts it.",
        "",
    ]
    out += [f"- {n}" for n in notes]
    if notes:
        out.append("")
    for run in runs:
        p = run["problem"]
        out += [
            f"## {p['name']}, n = {run['n']}, {run['replicates']} replicates ({run.get('ptq', '?')} PTQ, "
            f"{run.get('method', '?')} rates)",
            "",
        ]
        out += quantizer_table(run)
        agree = indicator_attack_agreement(run, attack="lira")
        out += [
            "",
            f"Ranking (most secure first): {', '.join(run['ranking'])}.",
            f"Spearman rank correlation of the indicator with 1 - LiRA advantage across quantizers: "
            f"{fmt(agree['spearman'])} ({agree['count']} quantizers).",
            "",
        ]
        diag = run.get("diagnostics")
        if diag:
            out += ["Diagnostics: " + ", ".join(f"{k} = {_diag_value(v)}" for k, v in diag.items()), ""]
    by_problem: dict[str, list[Report]] = {}
    for run in runs:
        by_problem.setdefault(run["problem"]["name"], []).append(run)
    for pname, pruns in by_problem.items():
        if len(pruns) < 2:
            continue
        pruns = sorted(pruns, key=lambda r: r["n"])
        names = list(pruns[0]["quantizers"])
        out += [
            f"## {pname}: Monte Carlo rate `-log(flip rate)/n` (indicator `r` in parentheses)",
            "",
            "| quantizer | " + " | ".join(f"n = {r['n']}" for r in pruns) + " |",
            "|---|" + "---:|" * len(pruns),
        ]
        for name in names:
            cells = [
                f"{fmt(empirical_rate(r['quantizers'][name], r['n']))} ({fmt(r['quantizers'][name]['r_population'])})"
                for r in pruns
            ]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(out)
