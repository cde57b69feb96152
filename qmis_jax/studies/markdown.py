"""The readable ``report.md`` of a study, rendered from report dictionaries."""

from __future__ import annotations

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


def validation_section(validation: Mapping[str, Any], figures: Sequence[str] = ()) -> list[str]:
    """Part one of the synthetic study: the validation table, the width study and the rank agreement."""
    p = validation["problem"]
    out = [
        f"## Part one: validation ({p['name']}, dim {p.get('dim', '?')}, {validation['replicates']} replicates)",
        "",
        "Each discrete quantizer's training-set sizes were chosen from a pilot audit's population indicator so that "
        f"`n r` runs near {', '.join(fmt(t) for t in validation['targets'])} (codebooks fixed in advance: "
        "`n = T / r`; the size-adaptive grid: its step shrinks as `n^-alpha`, so `n = (T / (r0 n0^(2 alpha)))^(1 / "
        "(1 - 2 alpha))`), rounded to a grid of ratio 2^(1/4) and capped; `n r` below is the realised value with the "
        "point's own `r`. Theory: `-log(flip)/n` approaches `r` from above as `n r` grows (sections 4-5), the "
        "certified bracket contains the MIS at every n, and the asymptotic MIS means something only in the regime.",
        "",
        "| quantizer | n | n r | flip rate ± SE | predicted flip | -log(flip)/n ÷ r | swap rate (95% upper) "
        "| MIS bracket [95%] | MIS (asymptotic) | sqrt(n) c_min |",
        "|---|---:|---:|---|---:|---:|---|---|---:|---:|",
    ]
    for row in validation["rows"]:
        ratio = None if row["empirical_rate"] is None or not row["r"] else row["empirical_rate"] / row["r"]
        mis = fmt(row["mis_asymptotic"]) if row["asymptotic_regime"] else f"- ({fmt(row['mis_asymptotic'])})"
        out.append(
            f"| {row['quantizer']} | {row['n']} | {fmt(row['n_r'])} | {fmt(row['flip_rate'])} ± "
            f"{fmt(row['flip_rate_se'])} | {fmt(row['flip_rate_predicted'])} | {fmt(ratio)} "
            f"| {fmt(row['swap_rate'])} ({fmt(row['swap_upper'])}) | {bracket_cell(row)} | {mis} "
            f"| {fmt(row['sqrt_n_c_min'])} |"
        )
    far = validation.get("out_of_reach") or {}
    skipped = [nm for nm, ns in validation["sizes"].items() if not ns and nm not in far]
    notes = [
        f"The asymptotic MIS in parentheses is outside the regime (`sqrt(n) c_min < {REGIME_THRESHOLD}`): shown "
        "for comparison only."
    ]
    if skipped:
        notes.append(
            f"No sweep for {', '.join(skipped)}: r = 0 at the pilot (a continuous release, or a release on a "
            "decision threshold)."
        )
    if far:
        notes.append(
            f"Out of reach below n = {validation.get('n_max', '?')} (the smallest target needs a larger n): "
            + ", ".join(f"{nm} (r = {fmt(v['r'])}, n needed {fmt(v['n_needed'])})" for nm, v in far.items())
            + "."
        )
    out += ["", " ".join(notes), ""]
    if validation["width"]:
        w = validation["width"]
        out += [
            f"Bracket width against the replicate count ({w[0]['quantizer']}, n = {w[0]['n']}, "
            f"n r = {fmt(w[0]['n_r'])}): "
            + ", ".join(
                f"{row['replicates']} replicates {bracket_cell(row)} (width "
                f"{fmt(row['mis_bracket'][1] - row['mis_bracket'][0])})"
                for row in w
            )
            + ".",
            "",
        ]
    pilot = validation["pilot"]
    out += [
        f"### Pilot, n = {pilot['n']}: ranking by r against the bracket and the held-out attacks",
        "",
        *quantizer_table(pilot),
        "",
        agreement_text(pilot),
        regime_text(pilot),
        "",
    ]
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
