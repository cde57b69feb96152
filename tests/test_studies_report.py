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


def test_predicted_flip_and_choose_sizes_closed_forms():
    # one event: Phi(-sqrt(n) c); two independent ones: 1 - (1 - p)^2
    assert synthetic.predicted_flip([0.05], 400) == pytest.approx(sps.norm.sf(1.0))
    assert synthetic.predicted_flip([0.05, 0.05], 400) == pytest.approx(1 - sps.norm.cdf(1.0) ** 2)
    assert synthetic.predicted_flip([-1e6], 10) == 1.0 and synthetic.predicted_flip([], 10) == 0.0
    # size-adaptive: c carried as c (n / n0)^-alpha
    assert synthetic.predicted_flip([0.05], 1600, n0=400, alpha=0.5) == pytest.approx(sps.norm.sf(1.0))
    with pytest.raises(ValueError, match="n0"):
        synthetic.predicted_flip([0.05], 100, alpha=0.25)
    grid = synthetic.size_grid(n_min=50, n_max=20_000)
    assert grid[0] == 50 and grid[-1] == 20_000 and grid == sorted(set(grid))
    assert all(abs(b / a - synthetic.SIZE_GRID_RATIO) < 0.05 for a, b in zip(grid[1:-2], grid[2:-1]))
    # a flat prediction at the small end still gives distinct sizes
    got = synthetic.choose_sizes(lambda n: 0.5, [10, 20, 40], (0.6, 0.25, 0.06))
    assert sorted(n for _, n, _ in got) == [10, 20, 40]
    assert synthetic.choose_sizes(lambda n: 0.99, [10, 20], (0.5,)) == []  # never measurable


def test_fixed_grid_sizes_give_three_measurable_flips():
    """A fixed grid's pilot events (the c_k of the validation problem's h = 1 grid under RTN, as its pilot at
    n = 1024 measured them) yield at least three distinct sizes whose predicted flips lie in [0.02, 0.9]."""
    c = [0.077, 0.105, 0.131, 0.136, 0.157, 0.188]
    grid = synthetic.size_grid(n_min=50, n_max=20_000)
    sel = synthetic.select_sizes(c, grid=grid, targets=(0.6, 0.25, 0.06))
    assert len(sel) >= 3 and len({e["n"] for e in sel}) == len(sel)
    for e in sel:
        assert 0.02 <= e["predicted"] <= 0.9
        assert e["predicted"] == pytest.approx(synthetic.predicted_flip(c, e["n"]))
    assert min(e["predicted"] for e in sel) < 0.1 < 0.2 < max(e["predicted"] for e in sel)


def test_adaptive_sizes_are_probed_until_near_their_targets():
    # the pilot's c_k (0.2) is ten times the truth's (0.02 at n0 = 1000, shrinking as n^-alpha): the first probe
    # lands far from the target, the next ones start from the probe's own c_k
    truth = lambda n: synthetic.predicted_flip([0.02], n, n0=1000, alpha=0.25)  # noqa: E731
    calls = []

    def probe(n):
        calls.append(n)
        return [0.02 * (n / 1000) ** -0.25], truth(n)

    grid = synthetic.size_grid(n_min=50, n_max=20_000)
    sel = synthetic.select_sizes([0.2], grid=grid, targets=(0.25, 0.06), n0=1000, alpha=0.25, probe=probe)
    assert len(sel) == 2 and len(calls) <= 2 * synthetic.MAX_PROBES
    for e in sel:
        assert e["predicted"] == truth(e["n"]) and abs(math.log(e["predicted"] / e["target"])) < 1.0


def test_replicates_and_agreement():
    cfg = synthetic.SyntheticConfig()
    for p in (0.03, 0.06, 0.25, 0.5, 0.6, 0.9):
        r = synthetic.replicates_for(p, cfg)
        assert r % synthetic.VALIDATION_CHUNK == 0 and r >= cfg.validation_min_replicates
        assert math.sqrt(p * (1 - p) / r) <= cfg.validation_se
    assert synthetic.replicates_for(0.5, synthetic.SyntheticConfig(validation_replicates=16)) == 16
    agree, z = synthetic.flip_agreement(0.1, 0.01, 0.2, 0.02, 400)
    assert z == pytest.approx(0.1 / math.sqrt(0.02**2 + 0.01**2)) and agree is False
    agree, z = synthetic.flip_agreement(0.05, 0.0, 0.0, 0.0, 100)  # nothing seen: binomial SE at the prediction
    assert agree and z == pytest.approx(-0.05 / math.sqrt(0.05 * 0.95 / 100))
    assert synthetic.flip_agreement(None, None, 1.0, 0.0, 10) == (None, None)


def test_validation_config_errors_name_the_setting():
    for kwargs, needle in (
        ({"validation_ptqs": ("loss", "gptq")}, "validation_ptqs"),
        ({"validation_flip_targets": (0.5, 1.2)}, "validation_flip_targets"),
        ({"validation_prior": 1.0}, "validation_prior"),
        ({"validation_se": 0.0}, "validation_se"),
        ({"validation_min_replicates": 2}, "validation_min_replicates"),
    ):
        with pytest.raises(ValueError, match=needle):
            synthetic.validate(synthetic.SyntheticConfig(**kwargs))


def validation_dict():
    rows = []
    for name, ptq, base in (("grid_fixed_h1", "loss", 0.6), ("sign@e8m0", "rtn", 0.5)):
        for k, n in enumerate((250, 1000, 2500)):
            p = base / (2.5**k)
            rows.append(
                {
                    "quantizer": name,
                    "ptq": ptq,
                    "n": n,
                    "replicates": 640,
                    "target": p,
                    "selection_predicted": p,
                    "r": 1e-3,
                    "r_se": 1e-5,
                    "n_r": n * 1e-3,
                    "r_zero_reason": None,
                    "events": {"release": 6} if ptq == "loss" else {"threshold": 3, "scale": 4},
                    "continuous": False,
                    "flip_rate": p,
                    "flip_rate_se": math.sqrt(p * (1 - p) / 640),
                    "empirical_rate": -math.log(p) / n,
                    "flip_rate_predicted": p * 1.01,
                    "flip_rate_predicted_se": 0.002,
                    "flip_union_bound": p,
                    "z": -0.5,
                    "agree": True,
                    "in_range": True,
                    "swap_rate": p / 3,
                    "swap_upper": p / 2,
                    "mis_bracket": [1 - p / 2, 0.99],
                    "mis_asymptotic": 1 - p / 4,
                    "asymptotic_regime": n > 500,
                    "sqrt_n_c_min": math.sqrt(2 * n * 1e-3),
                }
            )
    rows[1].update(agree=False, z=5.25)
    rows.append(
        dict(rows[0], quantizer="grid_adaptive", r=0.0, n_r=0.0, r_zero_reason="coordinate b on a threshold", z=0.1)
    )
    width = [dict(rows[1], replicates=k, mis_bracket=[0.5 + k / 1000, 1.0]) for k in (16, 32, 64)]
    pilot_q = {
        "grid_fixed_h1": {"r": 3e-3, "r_se": 1e-4, "flip_rate_predicted": 0.004, "sqrt_n_c_min": 2.7,
                          "events": {"release": 6}, "r_zero_reason": None, "continuous": False, "c": [0.08, 0.1]},
        "int4": {"r": 0.0, "r_se": None, "flip_rate_predicted": None, "sqrt_n_c_min": None, "events": {},
                 "r_zero_reason": "float32 scale", "continuous": True, "c": []},
    }  # fmt: skip
    return {
        "problem": {"name": "logistic_mixture", "dim": 2, "prior": 0.711},
        "theta_star": {"b": [0.9], "w": [2.139, -1.089]},
        "ptqs": ["loss", "rtn"],
        "targets": [0.6, 0.25, 0.06],
        "se_target": 0.02,
        "replicates": None,
        "attacks": ["loss"],
        "agreement_z": 4.0,
        "n_min": 50,
        "n_max": 5000,
        "pilot": {"loss": {"n": 1024, "quantizers": pilot_q}, "rtn": {"n": 1024, "quantizers": pilot_q}},
        "sizes": {"loss": {"grid_fixed_h1": [250, 1000, 2500], "int4": []}, "rtn": {"int4": []}},
        "no_sizes": {"loss": {"int4": "continuous release: r = 0"}},
        "rows": rows,
        "width": width,
        "summary": {"points": len(rows), "judged": len(rows), "agree": len(rows) - 1, "in_range": len(rows)},
    }


def test_validation_section_and_figures(tmp_path):
    val = validation_dict()
    text = "\n".join(markdown.validation_section(val))
    header = next(line for line in text.splitlines() if line.startswith("| quantizer | PTQ |"))
    for col in ("r", "sqrt(n) c_min", "events", "predicted flip ± SE", "measured flip ± SE", "agree", "swap rate",
                "MIS bracket"):  # fmt: skip
        assert f"| {col}" in header
    for row in val["rows"]:
        assert f"| {row['quantizer']} | {row['ptq']} | {row['n']} | {row['replicates']} |" in text
        assert f"{fmt(row['flip_rate_predicted'])} ± {fmt(row['flip_rate_predicted_se'])}" in text
    assert "0 (coordinate b on a threshold)" in text  # r = 0: the reason in the row
    assert "**no** (z = +5.25)" in text and "Disagreeing: grid_fixed_h1 (loss, n = 1000)" in text
    assert "release 6" in text and "threshold 3, scale 4" in text
    assert "int4 (loss): continuous release" in text
    assert "6 of 7 points agree within 4 combined standard errors" in text
    for fn, arg in (
        (plots.plot_flip_agreement, val["rows"]),
        (plots.plot_validation_bracket, val["rows"]),
        (plots.plot_bracket_width, val["width"]),
        (plots.plot_validation_pilot, val["pilot"]),
        (plots.plot_rate_convergence, val["rows"]),
    ):
        path = tmp_path / f"{fn.__name__}.png"
        fn(arg, str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pilot = report({"grid_fixed": entry(r=2e-3), "int4": entry(r=1e-3, continuous=True)}, n=300)
    for fn in (plots.plot_privacy_utility, plots.plot_indicator_vs_attack, plots.plot_indicator):
        path = tmp_path / f"{fn.__name__}.png"
        fn(pilot, str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown.render("t", [pilot], validation=val)
    assert "Part one: validation" in md and "Part two" in md and "E8M0" in md


def test_tiny_validation_study_writes_table_and_figure(tmp_path):
    """Part one end to end on a miniature (one fixed grid, both PTQs, one size each, 16 replicates): the rows carry
    the new fields, the markdown table and the flip figure are produced, and a second run reads every point back."""
    from qmis_jax.store import ResultStore, write_json

    cfg = synthetic.validate(
        synthetic.SyntheticConfig(
            validation_quantizers=("grid_fixed",),
            validation_grid_steps=(1.0,),
            validation_flip_targets=(0.25,),
            validation_pilot_n=128,
            validation_n_max=2000,
            validation_replicates=16,
            validation_width_replicates=(),
        )
    )
    config = {"study": "tiny-validation", "seed": cfg.seed}
    import jax

    val = synthetic.run_validation(cfg, ResultStore(str(tmp_path / "s"), config), jax.random.key(0))
    assert [r["ptq"] for r in val["rows"]] == ["loss", "rtn"]
    for row in val["rows"]:
        assert row["quantizer"] == "grid_fixed_h1" and row["replicates"] == 16 and row["r"] > 0
        assert 0.03 <= row["selection_predicted"] <= 0.85 and row["flip_rate_predicted"] is not None
        assert row["events"] and row["agree"] is not None
    assert val["theta_star"]["b"][0] == pytest.approx(0.9, abs=1e-5)
    text = "\n".join(markdown.validation_section(val))
    assert "| grid_fixed_h1 | loss |" in text and "| grid_fixed_h1 | rtn |" in text
    path = tmp_path / "validation_rates.png"
    plots.plot_flip_agreement(val["rows"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json(str(tmp_path / "v.json"), val)  # JSON-serialisable
    again = synthetic.run_validation(cfg, ResultStore(str(tmp_path / "s"), config, resume=True), jax.random.key(0))
    assert again["rows"] == val["rows"]


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
