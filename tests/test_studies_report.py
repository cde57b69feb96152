"""Study reports and figures: the certified bracket as headline, held-out advantages, continuous releases marked,
and part one's size sweeps (closed forms), from hand-built report dictionaries (no audit runs here)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from qmis_jax.audit.tables import attack_table, fmt, quantizer_table
from qmis_jax.studies import markdown, plots, synthetic


def entry(*, r, continuous=False, regime=False, mis=0.9, heldout=(0.1, 0.05), insample=(0.31, 0.41), bracket=None):
    """A report entry of the audit schema with the fields the tables and figures read."""
    attacks = {
        a: {
            "advantage": ins,
            "advantage_ci": [0.0, 1.0],
            "advantage_heldout": ho,
            "advantage_heldout_ci": [max(ho - 0.1, 0.0), ho + 0.1],
            "advantage_bound": max(ho - 0.2, 0.0),
            "auc": 0.5 + ins / 2,
        }
        for a, ho, ins in zip(("loss", "lira"), heldout, insample)
    }
    return {
        "continuous": continuous,
        "release": {
            "continuous": continuous,
            "continuous_parts": ["b: float32 scale", "w: float32 scale"] if continuous else [],
            "scale_format": "f32" if continuous else "e8m0",
        },
        "r_population": 0.0 if continuous else r,
        "r_codes": r,
        "r_single": {"mean": r, "median": r, "q05": r / 2, "q95": 2 * r},
        "mis_asymptotic": None if continuous else mis,
        "asymptotic_regime": regime,
        "sqrt_n_c_min": None if continuous else 2.0,
        "flip_rate": 0.25,
        "flip_rate_se": 0.03,
        "flip_rate_predicted": None if continuous else 0.27,
        "flip_union_bound": None if continuous else 0.4,
        "swap": {"rate": 0.1, "upper": 0.15},
        "mis_bracket": bracket or [0.0 if continuous else 0.85, 0.95],
        "mis_empirical_upper": (bracket or [0, 0.95])[1],
        "attacks": attacks,
        "utility": {"accuracy": 0.875},
    }


def report(quantizers, n=1000):
    return {
        "n": n,
        "replicates": 64,
        "problem": {"name": "logistic", "dim": 4},
        "quantizers": quantizers,
        "ranking": list(quantizers),
        "version": "0",
        "config_hash": "h",
    }


def test_fmt_gives_three_significant_digits():
    assert fmt(2.6793467444719e-10) == "2.68e-10"
    assert fmt(0.012345) == "0.0123"
    assert fmt(0.5) == "0.5"
    assert fmt(123.456) == "123"
    assert fmt(None) == "-"
    assert float(fmt(0.98765)) == pytest.approx(0.988)


def test_table_headline_is_the_bracket_with_regime_and_continuity():
    rep = report(
        {
            "in": entry(r=3e-3, regime=True, mis=0.912345),
            "out": entry(r=1e-4, regime=False, mis=0.7777),
            "int4": entry(r=5e-4, continuous=True),
        }
    )
    lines = quantizer_table(rep)
    header, rows = lines[0], lines[2:]
    assert "MIS bracket" in header and "upper bound" not in " ".join(lines).lower()
    row = dict(zip(("in", "out", "int4"), rows))
    assert "0.912" in row["in"]  # asymptotic MIS shown in the regime ...
    assert "0.778" not in row["out"]  # ... and hidden outside it
    assert "[0.85, 0.95]" in row["in"]
    assert "continuous: b: float32 scale; w: float32 scale" in row["int4"]
    assert "codes only: 5.00e-04" in row["int4"] and "discrete (e8m0 scale)" in row["in"]
    # the held-out advantage is printed, never the in-sample one, in the main table
    assert "0.1 [0, 0.2]" in row["in"] and "0.31" not in row["in"] and "0.41" not in row["in"]
    att = "\n".join(attack_table(rep))
    assert "descriptive" in att and "0.31" in att


def test_spearman_uses_heldout_advantages_and_bracket_ends():
    rs = [1e-3, 2e-3, 3e-3, 4e-3]
    heldout = [0.3, 0.1, 0.2, 0.0]
    insample = [0.0, 0.1, 0.2, 0.3]
    lower = [0.5, 0.7, 0.6, 0.9]
    rep = report(
        {
            f"q{i}": entry(r=r, heldout=(h, h), insample=(s, s), bracket=[lo, 1.0])
            for i, (r, h, s, lo) in enumerate(zip(rs, heldout, insample, lower))
        }
    )
    got = plots.indicator_attack_agreement(rep, attack="lira")
    assert got["spearman"] == pytest.approx(sps.spearmanr(rs, 1 - np.array(heldout)).statistic)
    assert got["spearman"] != pytest.approx(sps.spearmanr(rs, 1 - np.array(insample)).statistic)
    assert plots.indicator_bracket_agreement(rep, end=0)["spearman"] == pytest.approx(
        sps.spearmanr(rs, lower).statistic
    )


def test_sweep_sizes_put_n_r_near_the_targets():
    targets = (0.3, 1.0, 2.0, 5.0)
    half_step = synthetic.SIZE_GRID_RATIO**0.5 * 1.01  # rounding to the size grid moves n by at most this factor
    ns = synthetic.sweep_sizes(1e-3, targets=targets, n_pilot=500, n_min=10, n_max=10**6)
    assert len(ns) == 4
    for n, t in zip(ns, targets):
        assert 1 / half_step <= n * 1e-3 / t <= half_step
    # size-adaptive grid: r(n) = r0 (n / n0)^(-2 alpha), so n r(n) must land near each target
    alpha, r0, n0 = 0.25, 1e-3, 500
    ns = synthetic.sweep_sizes(r0, targets=targets, n_pilot=n0, n_min=10, n_max=10**7, alpha=alpha)
    for n, t in zip(ns, targets):
        nr = n * r0 * (n / n0) ** (-2 * alpha)
        assert 1 / half_step <= nr / t <= half_step
    # clipped, deduplicated, and nothing for a continuous release
    assert synthetic.sweep_sizes(1e-6, targets=targets, n_pilot=500, n_min=10, n_max=2000) == [2000]
    assert synthetic.sweep_sizes(0.0, targets=targets, n_pilot=500, n_min=10, n_max=2000) == []


def validation_dict():
    rows = []
    for name, r in (("grid_fixed", 2e-3), ("sign@e8m0", 1e-3)):
        for n in (250, 1000, 2500):
            p = math.exp(-1.3 * n * r)
            rows.append(
                {
                    "quantizer": name,
                    "n": n,
                    "replicates": 64,
                    "r": r,
                    "n_r": n * r,
                    "continuous": False,
                    "flip_rate": p,
                    "flip_rate_se": math.sqrt(p * (1 - p) / 64),
                    "empirical_rate": -math.log(p) / n,
                    "flip_rate_predicted": p,
                    "flip_union_bound": p,
                    "swap_rate": p / 3,
                    "swap_upper": p / 2,
                    "mis_bracket": [1 - p / 2, 0.99],
                    "mis_asymptotic": 1 - p / 4,
                    "asymptotic_regime": n * r > 2,
                    "sqrt_n_c_min": math.sqrt(2 * n * r),
                }
            )
    width = [dict(rows[1], replicates=k, mis_bracket=[0.5 + k / 1000, 1.0]) for k in (16, 32, 64)]
    pilot = report({"grid_fixed": entry(r=2e-3), "int4": entry(r=1e-3, continuous=True)}, n=300)
    return {
        "problem": pilot["problem"],
        "replicates": 64,
        "targets": [0.5, 2.0, 5.0],
        "pilot": pilot,
        "sizes": {"grid_fixed": [250, 1000, 2500], "int4": [], "int8@e8m0": []},
        "out_of_reach": {"int8@e8m0": {"r": 1e-7, "n_needed": 5e6}},
        "n_max": 5000,
        "rows": rows,
        "width": width,
    }


def test_validation_section_and_figures(tmp_path):
    val = validation_dict()
    text = "\n".join(markdown.validation_section(val))
    for row in val["rows"]:
        ratio = row["empirical_rate"] / row["r"]
        assert f"| {row['quantizer']} | {row['n']} | {fmt(row['n_r'])} |" in text and fmt(ratio) in text
    assert "No sweep for int4:" in text and "int8@e8m0 (r = 1.00e-07, n needed 5.00e+06)" in text
    assert "continuous (r = 0): int4" in text
    for fn, arg in (
        (plots.plot_rate_convergence, val["rows"]),
        (plots.plot_validation_bracket, val["rows"]),
        (plots.plot_bracket_width, val["width"]),
        (plots.plot_privacy_utility, val["pilot"]),
        (plots.plot_indicator_vs_attack, val["pilot"]),
        (plots.plot_indicator, val["pilot"]),
    ):
        path = tmp_path / f"{fn.__name__}.png"
        fn(arg, str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown.render("t", [val["pilot"]], validation=val)
    assert "Part one: validation" in md and "Part two" in md and "E8M0" in md


def test_float32_and_e8m0_scales_side_by_side():
    rep = report({"int4": entry(r=5e-4, continuous=True), "int4@e8m0": entry(r=2e-3), "grid": entry(r=1e-3)})
    lines = markdown.scale_format_table(rep)
    assert len(lines) == 3 and lines[2].startswith("| int4 | continuous: b: float32 scale")
    assert "discrete (e8m0 scale) | 0.002 |" in lines[2]
    assert markdown.scale_format_table(report({"grid": entry(r=1e-3)})) == []


def test_default_quantizers_put_e8m0_variants_next_to_float32_ones():
    from qmis_jax import quantizers as Q
    from qmis_jax.studies import molecular

    for names in (synthetic.default_quantizers(), molecular.default_quantizers()):
        variants = [nm for nm in names if nm.endswith("@e8m0")]
        assert variants and all(nm.split("@")[0] in names for nm in variants)
        assert all(Q.get(nm).scale_format == "e8m0" for nm in variants)


def test_molecular_report_marks_continuous_releases():
    from qmis_jax.studies import molecular

    def single(continuous):
        e = entry(r=1e-3, continuous=continuous)
        e.update(r_hat=1e-3, r_hat_interval=[5e-4, 2e-3])
        e["attacks"] = {"lira_pool": {"advantage": 0.1, "advantage_ci": [0.0, 0.2]}}
        return e

    point = {
        "n": 100,
        "n_invalid_train": 0,
        "n_invalid_test": 0,
        "quantizers": {"int4": single(True), "int4@e8m0": single(False)},
        "ranking": ["int4@e8m0", "int4"],
    }
    md = molecular.render_markdown(
        {"dataset": "d", "points": {"maccs-linear": point}, "pareto": {"maccs-linear": []}}, []
    )
    assert "| int4 | continuous: b: float32 scale; w: float32 scale |" in md
    assert "| int4@e8m0 | discrete (e8m0 scale) |" in md and "power of two" in md
