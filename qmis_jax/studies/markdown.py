"""The readable ``report.md`` of a study, rendered from report dictionaries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from qmis_jax.audit.tables import attack_table, bracket_cell, fmt, indicator_cell, quantizer_table, release_cell
from qmis_jax.indicator import REGIME_THRESHOLD
from qmis_jax.studies.plots import (
    empirical_rate,
    indicator_attack_agreement,
    indicator_bracket_agreement,
    is_continuous,
)

Report = Mapping[str, Any]


def _ranking_lines(run: Report) -> list[str]:
    """The ranking with its paired bootstrap intervals of neighbouring differences."""
    lines = [f"Ranking (most secure first, {run.get('ranking_by', 'by the indicator')}): {', '.join(run['ranking'])}."]
    intervals = run.get("ranking_intervals") or []
    if intervals:
        lines.append(
            "Paired 95% intervals of the mean single-model indicator difference between neighbours: "
            + "; ".join(
                f"{iv['better']} - {iv['worse']} {fmt(iv['r_single_mean_difference'])} "
                f"[{fmt(iv['interval'][0])}, {fmt(iv['interval'][1])}]"
                for iv in intervals
            )
            + "."
        )
    return lines


def _diag_value(v: Any) -> str:
    """A diagnostic as text: integers and flags as they are, other numbers compact, ``-`` when not measured."""
    if v is None:
        return "-"
    if isinstance(v, (bool, int, str)):
        return str(v)
    return fmt(v)


HOW_TO_READ = (
    "How to read it. The number to read first is the **MIS bracket**: a certified interval (jointly 95%, "
    "theory.md section 10) that holds at any n. Its lower end comes from a swap coupling (retrain each replicate "
    "with one training point replaced; the chance that the release changes bounds `1 - MIS` from above), its upper "
    "end from the section-1 attacks (LOSS on fresh data, LiRA on embedded targets) with thresholds chosen on half "
    "of the replicates and evaluated on the other half. Every advantage in the tables is that held-out one; the "
    "in-sample advantages of the attack table are descriptive only. The indicator `r` is the exponential rate at "
    "which the release stops depending on one training point (`1 - MIS ~ exp(-n r)`; larger is more secure). The "
    f"asymptotic MIS (section 5) is shown only where every event that matters has `sqrt(n) c >= {REGIME_THRESHOLD}` "
    "(`asymptotic_regime`); elsewhere it is `-` and the bracket is the number to read. The flip rate is the share "
    "of replicates whose release differs from the population release, with its standard error; the predicted flip "
    "is a probability (the union bound is in report.json as `flip_union_bound`)."
)

CONTINUITY = (
    "Continuous and discrete releases. The game sees every number the publisher ships: the integer codes, each "
    "block's scale and every leaf left unquantized (theory.md section 9). A float32 scale such as `max|w| / 7` or "
    "`mean|w|` is a continuous function of the trained weights, so a release that ships it is continuous: moving "
    "one training point moves the scale, its MIS is only polynomially close to 1 and its indicator is `r = 0`, "
    "whatever the integer codes do (the codes' own rate is shown as `codes only`, never used to rank). An E8M0 "
    "scale is a power of two: it lies on a grid fixed before the data are seen, so it changes only when the "
    "statistic behind it crosses a rounding boundary, and the release can be exponentially secure (`r > 0`). "
    "The release column names what makes each continuous release continuous."
)


def agreement_text(report: Report, attacks: Sequence[str] = ("loss", "lira")) -> str:
    """One sentence: Spearman rank agreement of ``r`` with the bracket's ends and the held-out attacks."""
    parts = [
        f"bracket lower end {fmt(indicator_bracket_agreement(report, end=0)['spearman'])}",
        f"bracket upper end {fmt(indicator_bracket_agreement(report, end=1)['spearman'])}",
    ]
    for a in attacks:
        agree = indicator_attack_agreement(report, attack=a)
        if agree["count"]:
            parts.append(f"1 - held-out {a} advantage {fmt(agree['spearman'])}")
    return "Spearman rank correlation of the indicator across quantizers with: " + ", ".join(parts) + "."


def regime_text(report: Report) -> str:
    """Which discrete releases are in the asymptotic regime at the report's n, and which are continuous."""
    qs = report["quantizers"]
    inside = [nm for nm in report["ranking"] if qs[nm].get("asymptotic_regime")]
    outside = [nm for nm in report["ranking"] if not qs[nm].get("asymptotic_regime") and not is_continuous(qs[nm])]
    cont = [nm for nm in report["ranking"] if is_continuous(qs[nm])]
    return (
        f"At n = {report['n']}: in the asymptotic regime: {', '.join(inside) or 'none'}; discrete but outside it "
        f"(read the bracket): {', '.join(outside) or 'none'}; continuous (r = 0): {', '.join(cont) or 'none'}."
    )


def scale_format_table(run: Report) -> list[str]:
    """Each scaled quantizer with a float32 scale next to its E8M0 variant: release, indicator, flip rate, bracket
    (empty when the run has no such pair)."""
    qs = run["quantizers"]
    pairs = [(nm, f"{nm}@e8m0") for nm in qs if "@" not in nm and f"{nm}@e8m0" in qs]
    if not pairs:
        return []
    lines = [
        "| quantizer | float32 scale: release | r | flip rate ± SE | MIS bracket | E8M0 scale: release | r "
        "| flip rate ± SE | MIS bracket |",
        "|---|---|---:|---|---|---|---:|---|---|",
    ]
    for base, var in pairs:
        cells = []
        for nm in (base, var):
            q = qs[nm]
            cells.append(
                f"{release_cell(q)} | {indicator_cell(q)} | {fmt(q['flip_rate'])} ± {fmt(q.get('flip_rate_se'))} "
                f"| {bracket_cell(q)}"
            )
        lines.append(f"| {base} | " + " | ".join(cells) + " |")
    return lines


def _events_cell(events: Mapping[str, Any] | None) -> str:
    """Events behind ``r`` by kind (theory.md sections 3(a), 9), e.g. ``path 3, scale 5``; ``-`` when unknown."""
    if not events:
        return "-"
    return ", ".join(f"{k} {v}" for k, v in events.items())


def _indicator_cell(row: Mapping[str, Any]) -> str:
    """``r`` (with its standard error), or ``0 (the reason)`` where the indicator is 0."""
    if row.get("r"):
        se = row.get("r_se")
        return fmt(row["r"]) + (f" ± {fmt(se)}" if se is not None else "")
    reason = row.get("r_zero_reason")
    return f"0 ({reason})" if reason else "0"


def _agreement_cell(row: Mapping[str, Any]) -> str:
    """``yes (z = ...)`` or ``**no** (z = ...)``: predicted and measured flips within the combined standard
    errors; ``-`` without a prediction."""
    if row.get("agree") is None:
        return "-"
    z = f"z = {row['z']:+.2f}" if row.get("z") is not None and math.isfinite(row["z"]) else "z = inf"
    return f"yes ({z})" if row["agree"] else f"**no** ({z})"


def _pm(value: Any, se: Any) -> str:
    return f"{fmt(value)} ± {fmt(se)}" if se is not None else fmt(value)


def validation_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Part one's table: per quantizer, PTQ and n, the indicator ``r`` (or why it is 0), ``sqrt(n) c_min``, the
    events by kind, the predicted flip against the Monte Carlo flip (each ± its standard error), whether they
    agree, the swap-change rate and the certified bracket."""
    out = [
        "| quantizer | PTQ | n | R | r | sqrt(n) c_min | events | predicted flip ± SE | measured flip ± SE "
        "| agree | swap rate (95% upper) | MIS bracket [95%] |",
        "|---|---|---:|---:|---|---:|---|---|---|---|---|---|",
    ]
    for row in rows:
        measured = _pm(row["flip_rate"], row.get("flip_rate_se"))
        if row.get("in_range") is False:
            measured += " (outside [0.02, 0.9])"
        out.append(
            f"| {row['quantizer']} | {row.get('ptq') or '-'} | {row['n']} | {row['replicates']} "
            f"| {_indicator_cell(row)} | {fmt(row.get('sqrt_n_c_min'))} | {_events_cell(row.get('events'))} "
            f"| {_pm(row.get('flip_rate_predicted'), row.get('flip_rate_predicted_se'))} | {measured} "
            f"| {_agreement_cell(row)} | {fmt(row.get('swap_rate'))} ({fmt(row.get('swap_upper'))}) "
            f"| {bracket_cell(row)} |"
        )
    return out


def validation_section(validation: Mapping[str, Any], figures: Sequence[str] = ()) -> list[str]:
    """Part one of the synthetic study: the predicted against the measured flip per quantizer, PTQ and size, the
    quantizers that got no size, the width study and the pilot."""
    p = validation["problem"]
    star = validation.get("theta_star") or {}
    star_text = ", ".join(f"{k} = [{', '.join(fmt(v) for v in vals)}]" for k, vals in star.items())
    z = validation.get("agreement_z", 4.0)
    reps = validation.get("replicates")
    rows = validation["rows"]
    out = [
        f"## Part one: validation ({p['name']}, dim {p.get('dim', '?')}, prior {fmt(p.get('prior'))}; "
        f"PTQ {', '.join(validation.get('ptqs') or ['?'])})",
        "",
        "Does the indicator predict how often a release flips? theta* is known in closed form"
        + (f" ({star_text})" if star_text else "")
        + ": no published number sits at 0 or on a decision threshold (theory.md section 8). A pilot (the "
        "population stage alone) gives each quantizer's events; from their `c_k = delta_k / sigma_k` each quantizer "
        "gets the sizes where its predicted flip is nearest "
        f"{', '.join(fmt(t) for t in validation['targets'])} (the size-adaptive grid's are checked by a population "
        "stage at that size), and each point "
        + (
            f"{reps} replicates."
            if reps
            else f"enough replicates for a Monte Carlo standard error of at most {fmt(validation.get('se_target'))}."
        )
        + " The predicted flip is the probability of any event under the joint Gaussian of section 5, its standard "
        "error that of the population sample; the measured flip is the share of replicates whose release (codes and "
        f"scale codes) differs from the population release. `agree`: within {fmt(z)} combined standard errors "
        "`sqrt(se_mc^2 + se_pred^2)` (where no flip was seen, `se_mc` is the binomial one at the predicted flip). "
        "The swap rate and the bracket are the certified ones of section 10"
        + (f" (upper end from {', '.join(validation['attacks'])})." if validation.get("attacks") else "."),
        "",
        *validation_table(rows),
        "",
    ]
    summary = validation.get("summary") or {}
    if summary:
        out.append(
            f"{summary.get('agree', 0)} of {summary.get('judged', 0)} points agree within {fmt(z)} combined standard "
            f"errors; {summary.get('in_range', 0)} of {summary.get('points', 0)} measured flips lie in [0.02, 0.9]."
        )
    bad = [r for r in rows if r.get("agree") is False]
    if bad:
        out.append(
            "Disagreeing: "
            + "; ".join(f"{r['quantizer']} ({r.get('ptq')}, n = {r['n']}): predicted {fmt(r['flip_rate_predicted'])}, "
                        f"measured {fmt(r['flip_rate'])}, z = {r['z']:+.2f}" for r in bad)
            + "."
        )  # fmt: skip
    notes = []
    for ptq, missing in (validation.get("no_sizes") or {}).items():
        for nm, why in missing.items():
            notes.append(f"{nm} ({ptq}): {why}")
    if notes:
        out.append(
            f"No size between n = {validation.get('n_min', '?')} and {validation.get('n_max', '?')} with a measurable "
            "predicted flip for: " + "; ".join(notes) + "."
        )
    out.append("")
    if validation.get("width"):
        w = validation["width"]
        out += [
            f"Bracket width against the replicate count ({w[0]['quantizer']}, {w[0].get('ptq') or '-'} PTQ, "
            f"n = {w[0]['n']}; the width shrinks with the replicate count, theory.md section 10): "
            + ", ".join(
                f"{row['replicates']} replicates {bracket_cell(row)} (width "
                f"{fmt(row['mis_bracket'][1] - row['mis_bracket'][0])})"
                for row in w
            )
            + ".",
            "",
        ]
    pilot = validation.get("pilot") or {}
    if pilot:
        out += ["### Pilot: population indicator per quantizer and PTQ", ""]
        out += ["| quantizer | PTQ | n | r | sqrt(n) c_min | events | predicted flip | sizes chosen |",
                "|---|---|---:|---|---:|---|---:|---|"]  # fmt: skip
        sizes = validation.get("sizes") or {}
        for ptq, pl in pilot.items():
            for nm, e in pl["quantizers"].items():
                chosen = sizes.get(ptq, {}).get(nm) or []
                out.append(
                    f"| {nm} | {ptq} | {pl['n']} | {_indicator_cell(e)} | {fmt(e.get('sqrt_n_c_min'))} "
                    f"| {_events_cell(e.get('events'))} | {fmt(e.get('flip_rate_predicted'))} "
                    f"| {', '.join(str(n) for n in chosen) or 'none'} |"
                )
        out.append("")
    out += [f"![{f}]({f})" for f in figures] + ([""] if figures else [])
    return out


def render(
    title: str,
    runs: Sequence[Report],
    *,
    figures: Sequence[str] = (),
    notes: Sequence[str] = (),
    validation: Mapping[str, Any] | None = None,
    validation_figures: Sequence[str] = (),
) -> str:
    """A study's markdown report: configuration, part one (``validation``) when given, per-run tables with the
    certified bracket as headline, the rate-vs-n table and figure links."""
    out = [f"# {title}", ""]
    first = runs[0]
    out += [
        f"qmis_jax {first['version']}, configuration hash `{first['config_hash']}`, "
        f"{first.get('environment', {}).get('device_count', '?')} x "
        f"{first.get('environment', {}).get('device_kind', '?')}.",
        "",
        HOW_TO_READ,
        "",
        CONTINUITY,
        "",
    ]
    out += [f"- {n}" for n in notes]
    if notes:
        out.append("")
    if validation is not None:
        out += validation_section(validation, validation_figures)
        out += ["## Part two: the paper's setting", ""]
    for run in runs:
        p = run["problem"]
        out += [
            f"## {p['name']} (dim {p.get('dim', '?')}), n = {run['n']}, {run['replicates']} replicates "
            f"({run.get('ptq', '?')} PTQ, "
            f"{run.get('method', '?')} rates)",
            "",
        ]
        out += quantizer_table(run)
        out += ["", *_ranking_lines(run), agreement_text(run), regime_text(run), ""]
        pairs = scale_format_table(run)
        if pairs:
            out += ["Float32 scales against E8M0 (power-of-two) scales, same codes otherwise:", "", *pairs, ""]
        out += ["Attacks per quantizer (held-out values feed the bracket; in-sample ones are descriptive):", ""]
        out += attack_table(run) + [""]
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
            f"## {pname}: Monte Carlo rate `-log(flip rate)/n` (indicator `r` in parentheses; continuous releases "
            "have r = 0)",
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
