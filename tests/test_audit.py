"""qj.audit against truth: the 1-D Gaussian mean with a fixed grid (theory.md sections 5-7), flip rates in d dims,
and the report schema of design.md."""

import json
import math

import jax
import numpy as np
import pytest
from scipy.stats import norm

import qmis_jax as qj
from qmis_jax.indicator import gaussian_mean_quantized_delta

pytestmark = pytest.mark.slow  # end-to-end audits with thousands of replicates


@pytest.fixture(scope="module")
def gaussian_report():
    problem = qj.problems.gaussian_mean(mu=[0.3])
    quantizers = {"grid": qj.quantizers.uniform(step=1.0), "fp32": "fp32"}
    return qj.audit(
        jax.random.key(0),
        problem,
        quantizers,
        n=100,
        replicates=4000,
        ptq="loss",
        attacks=("loss", "lira", "lira_offline", "rmia", "rmia_offline"),
        lira_replicates=2000,
        population_size=1_000_000,
    )


def test_report_schema_is_json_and_complete(gaussian_report):
    d = json.loads(json.dumps(gaussian_report.to_dict()))
    for key in ("version", "n", "replicates", "problem", "config_hash", "quantizers", "ranking"):
        assert key in d
    q = d["quantizers"]["grid"]
    for key in (
        "r_population",
        "r_single",
        "mis_asymptotic",
        "flip_rate",
        "flip_rate_predicted",
        "attacks",
        "mis_empirical_upper",
        "mis_bracket",
        "utility",
    ):
        assert key in q
    assert set(q["r_single"]) == {"mean", "median", "q05", "q95"}
    for attack in ("loss", "lira"):
        assert {"advantage", "advantage_ci", "auc", "tpr_at_1pct_fpr"} <= set(q["attacks"][attack])
    assert d["ranking"][0] == "grid"  # the quantized release is the more secure
    # every probability, advantage and bound of the report lies in [0, 1] (theory.md sections 5, 7 and 10)
    for entry in d["quantizers"].values():
        values = [entry[k] for k in ("flip_rate", "flip_rate_predicted", "flip_union_bound", "mis_asymptotic")]
        values += [*entry["mis_bracket"], entry["mis_empirical_upper"], entry["swap"]["upper"]]
        for res in entry["attacks"].values():
            values += [res["advantage"], res["advantage_heldout"], res["advantage_bound"], res["auc"]]
            values += [*res["advantage_ci"], *res["advantage_heldout_ci"]]
        assert all(v is None or 0.0 <= v <= 1.0 for v in values), entry


def test_gaussian_mean_indicator_flip_rate_and_mis(gaussian_report):
    q = gaussian_report["grid"]
    # r = c^2 / 2 with c = (0.5 - 0.3) / 1; with 10^6 population points sd(c_hat) ~ 0.001, sd(r_hat) ~ 0.0002.
    assert q["r_population"] == pytest.approx(0.02, abs=4 * 0.0002)
    n, reps = 100, 4000
    p_exact = norm.cdf(-math.sqrt(n) * 0.2) + norm.cdf(-math.sqrt(n) * 0.8)
    se = math.sqrt(p_exact * (1 - p_exact) / reps)
    assert abs(q["flip_rate"] - p_exact) < 4 * se
    # p = Phi(-sqrt(n) c): sd(p_hat) ~ sqrt(n) phi(2) sd(c_hat) ~ 0.00054; allow 4 of them
    assert abs(q["flip_rate_predicted"] - p_exact) < 4 * 0.00054
    exact_delta = gaussian_mean_quantized_delta(n, mu=0.3, step=1.0)
    # theory.md section 5: the approximation over the exact Delta is 0.84 at n = 100. Its plug-in error:
    # d log(p f) / dc ~ -18.7, times sd(c_hat) ~ 0.001, is ~2% relative (0.016 absolute); allow 4 sd.
    assert (1 - q["mis_asymptotic"]) / exact_delta == pytest.approx(0.84, abs=4 * 0.016)


def test_no_section1_attack_beats_the_exact_delta(gaussian_report):
    exact_delta = gaussian_mean_quantized_delta(100, mu=0.3, step=1.0)
    for name, res in gaussian_report["grid"]["attacks"].items():
        assert res["advantage_heldout_ci"][0] <= exact_delta, name
    fp = gaussian_report["fp32"]
    assert fp["r_population"] == 0.0 and fp["continuous"]
    # the certified bracket (theory.md section 10) holds the exact MIS, and is tight at this n: the swap
    # coupling's rate is 1.40 Delta here, and its Clopper-Pearson limit with 4000 replicates stays within 3 Delta
    lower, upper = gaussian_report["grid"]["mis_bracket"]
    assert lower <= 1 - exact_delta <= upper
    assert 1 - lower <= 3 * exact_delta
    assert gaussian_report["grid"]["mis_empirical_upper"] == upper
    # a continuous release changes with every swap: its bracket's lower end is 0
    assert fp["mis_bracket"][0] == 0.0 and fp["swap"]["rate"] == 1.0


def test_flip_rates_in_d_dimensions_match_the_prediction():
    mu = [0.3, 0.1, -0.2, 0.35, 0.05]
    problem = qj.problems.gaussian_mean(mu=mu)
    n, reps = 60, 3000
    report = qj.audit(
        jax.random.key(1),
        problem,
        {"grid": qj.quantizers.uniform(step=1.0)},
        n=n,
        replicates=reps,
        attacks=(),
        population_size=200_000,
    )
    q = report["grid"]
    # coordinates flip independently: P(any flip) = 1 - prod_j (1 - p_j)
    p = [norm.cdf(-math.sqrt(n) * (0.5 - abs(m))) + norm.cdf(-math.sqrt(n) * (0.5 + abs(m))) for m in mu]
    exact = 1 - np.prod([1 - pj for pj in p])
    se = math.sqrt(exact * (1 - exact) / reps)
    assert abs(q["flip_rate"] - exact) < 4 * se
    # the joint flip probability (independent coordinates here) and the union bound beside it
    assert q["flip_rate_predicted"] == pytest.approx(exact, rel=0.15)
    assert q["flip_union_bound"] == pytest.approx(min(1.0, sum(p)), rel=0.15)


def test_bad_audit_arguments_name_the_argument():
    problem = qj.problems.gaussian_mean(mu=[0.0])
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="replicates"):
        qj.audit(key, problem, ["int4"], n=10, replicates=0)
    with pytest.raises(ValueError, match="ptq"):
        qj.audit(key, problem, ["int4"], n=10, replicates=8, ptq="magic")
    with pytest.raises(ValueError, match="method"):
        qj.audit(key, problem, ["int4"], n=10, replicates=8, method="exact")
    with pytest.raises(ValueError, match="attacks"):
        qj.audit(key, problem, ["int4"], n=10, replicates=8, attacks=("shokri",))
    with pytest.raises(ValueError, match="quantizers"):
        qj.audit(key, problem, [3.0], n=10, replicates=8)
    with pytest.raises(KeyError, match="int3"):
        qj.audit(key, problem, ["int3"], n=10, replicates=8)


def test_logistic_flip_exponent_tends_to_the_indicator():
    """theory.md sections 4-6 on a GLM: the Monte Carlo flip rate matches sum_k p_k, and its exponent
    -log(flip rate)/n lies in the Gaussian sandwich around r_population, whose width shrinks like log(n)/n:
    sum_k p_k <= K exp(-n r) (lower end r - log(K)/n), and the dominant p = Phi(-x), x = sqrt(2 n r), is at least
    phi(x) x / (1 + x^2) (Mills; upper end r + (log(2 pi)/2 + log((1 + x^2)/x))/n)."""
    problem = qj.problems.logistic_mixture(dim=2, k_modes=1, separation=1.0, scale=0.0)
    grid = qj.quantizers.uniform(step=0.7)  # theta* ~ (0, 0.69, -0.73): every coordinate well inside its cell
    reps = 4000
    rates = {}
    for n in (200, 400):
        report = qj.audit(
            jax.random.key(n), problem, {"grid": grid}, n=n, replicates=reps, attacks=(), population_size=400_000
        )
        e = report["grid"]
        r, flip, pred = e["r_population"], e["flip_rate"], e["flip_rate_predicted"]
        assert r > 0 and 0 < flip < 1
        se = math.sqrt(pred * (1 - pred) / reps)
        assert abs(flip - pred) < 4 * se, (n, flip, pred, se)
        x = math.sqrt(2 * n * r)
        lower = r - math.log(e["competitors"]) / n
        upper = r + (0.5 * math.log(2 * math.pi) + math.log((1 + x * x) / x)) / n
        assert lower <= -math.log(flip) / n <= upper, (n, -math.log(flip) / n, lower, upper)
        rates[n] = r
    assert rates[200] == pytest.approx(rates[400], rel=0.1)  # one population indicator, whatever n


def test_logistic_fp32_and_pruning_have_r_zero_and_quantizing_never_leaks_more():
    """Section 4: continuous releases have r = 0. Section 1 (data processing): a quantized release is a function of
    the fp32 one, so attacks on it do not beat the same attacks on fp32 beyond their error bars (95% held-out
    intervals, paired on the same replicates)."""
    problem = qj.problems.logistic_mixture(dim=10, k_modes=2)
    report = qj.audit(
        jax.random.key(3),
        problem,
        ["fp32", "prune50", "int4", "sign", "int4@e8m0", "sign@e8m0"],
        n=100,
        replicates=192,
        attacks=("loss", "lira"),
        population_size=100_000,
        test_size=2000,
        n_boot=200,
    )
    for name in ("fp32", "prune50"):
        e = report[name]
        assert e["continuous"] and e["r_population"] == 0.0 and e["r_single"]["q95"] == 0.0
        assert e["mis_asymptotic"] is None and e["flip_rate"] == 1.0
    for name in ("int4@e8m0", "sign@e8m0"):
        assert not report[name]["continuous"] and report[name]["r_single"]["median"] > 0
    for name in ("int4", "sign"):  # a float32 scale is published: continuous (theory.md section 9)
        e = report[name]
        assert e["continuous"] and e["r_population"] == 0.0 and e["r_codes"] >= 0 and e["mis_bracket"][0] == 0.0
        assert e["release"]["continuous"] and any("float32 scale" in part for part in e["release"]["continuous_parts"])
    fp32 = report["fp32"]["attacks"]
    # a leaky reference (n = 100 points for 11 parameters): its held-out LOSS advantage, about 0.06 with a standard
    # error near 0.014 over the 96 held-out replicates, is positive (the certified interval is wider than that)
    assert fp32["loss"]["advantage_heldout"] > 0
    for name, e in report.quantizers.items():
        for attack in ("loss", "lira"):
            lo = e["attacks"][attack]["advantage_heldout_ci"][0]
            assert lo <= fp32[attack]["advantage_heldout_ci"][1], (name, attack)
    assert set(report.ranking[:2]) == {"int4@e8m0", "sign@e8m0"}  # the discrete releases first


def test_scores_hand_off_to_other_tools(gaussian_report, tmp_path):
    """report.scores gives one entry per attacked pair (higher = member) with its replicate and example ids; the
    area under the ROC's convex hull of those scores is what jax_privacy's auditor reports."""
    for attack in ("loss", "lira", "rmia"):
        member, nonmember = gaussian_report.scores("grid", attack)
        member_ids, nonmember_ids = gaussian_report.score_ids("grid", attack)
        assert member.shape[0] == member_ids.shape[0] > 0 and nonmember.shape[0] == nonmember_ids.shape[0] > 0
        entry = gaussian_report["grid"]["attacks"][attack]
        assert 0.0 <= entry["auc_convex_hull"] <= 1.0 and entry["auc_convex_hull"] >= entry["auc"] - 1e-12
    # LOSS pairs: replicate r's members are its n training points, so ids are (r, 0..n-1)
    ids = gaussian_report.score_ids("grid", "loss")[0]
    assert ids.shape == (4000 * 100, 2) and ids[:, 0].max() == 3999 and ids[:, 1].max() == 99
    gaussian_report.save_scores(tmp_path / "scores.npz")
    with np.load(tmp_path / "scores.npz") as npz:
        assert np.array_equal(npz["grid.lira.member"], gaussian_report.scores("grid", "lira")[0])
    with pytest.raises(KeyError, match="lira_pool"):
        gaussian_report.scores("grid", "lira_pool")
    auditing = pytest.importorskip("jax_privacy.auditing", reason="the interop extra is not installed")
    for attack in ("loss", "lira"):
        member, nonmember = gaussian_report.scores("grid", attack)
        theirs = auditing.CanaryScoreAuditor(member, nonmember).attack_auroc()
        assert abs(float(theirs) - gaussian_report["grid"]["attacks"][attack]["auc_convex_hull"]) <= 1e-9
