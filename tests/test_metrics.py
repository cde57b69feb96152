"""Tests of qmis_jax.attacks.metrics (attack metrics, Clopper-Pearson) and qmis_jax.stats.bootstrap."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve
from statsmodels.stats.proportion import proportion_confint

from qmis_jax.attacks.metrics import AttackMetrics, attack_metrics, clopper_pearson, roc_curve
from qmis_jax.stats.bootstrap import PairedDiff, paired_bootstrap, rank_quantizers

# ----------------------------------------------------------------------------------------------------------------
# Clopper-Pearson


@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_statsmodels(level):
    ns = np.array([1, 2, 7, 50, 1000])
    for n in ns:
        ks = np.unique(np.r_[0, 1, n // 3, n // 2, n - 1, n].clip(0, n))
        lo, hi = clopper_pearson(ks, n, level)
        ref_lo, ref_hi = proportion_confint(ks, n, alpha=1 - level, method="beta")
        np.testing.assert_allclose(lo, ref_lo, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hi, ref_hi, rtol=1e-10, atol=1e-12)
        for k in ks:  # scalar calls give floats
            slo, shi = clopper_pearson(int(k), int(n), level)
            assert isinstance(slo, float) and isinstance(shi, float)
            assert slo == pytest.approx(float(proportion_confint(k, n, 1 - level, method="beta")[0]), abs=1e-12)


def test_clopper_pearson_edges_and_validation():
    assert clopper_pearson(0, 10)[0] == 0.0
    assert clopper_pearson(10, 10)[1] == 1.0
    # closed form at k = 0: upper end is 1 - (alpha/2)^(1/n)
    assert clopper_pearson(0, 10, 0.95)[1] == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-10)
    with pytest.raises(ValueError, match="k must satisfy"):
        clopper_pearson(11, 10)
    with pytest.raises(ValueError, match="n must be"):
        clopper_pearson(0, 0)
    with pytest.raises(ValueError, match="level"):
        clopper_pearson(1, 10, 1.0)
    with pytest.raises(ValueError, match="k must hold integers"):
        clopper_pearson(1.5, 10)


# ----------------------------------------------------------------------------------------------------------------
# Attack metrics against references


def _brute_advantage(m, nm):
    thresholds = np.r_[np.inf, np.unique(np.r_[m, nm])]
    return max(abs(np.mean(m >= t) - np.mean(nm >= t)) for t in thresholds)


@pytest.mark.parametrize("ties", [False, True])
def test_auc_advantage_roc_match_references(ties):
    rng = np.random.default_rng(1)
    m = rng.normal(0.4, 1.0, 300)
    nm = rng.normal(0.0, 1.2, 500)
    if ties:
        m, nm = np.round(m * 2), np.round(nm * 2)
    res = attack_metrics(jax.random.key(0), m, nm)
    labels = np.r_[np.ones(m.size), np.zeros(nm.size)]
    scores = np.r_[m, nm]
    assert res.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert res.advantage == pytest.approx(_brute_advantage(m, nm), abs=1e-12)
    fpr, tpr, thr = roc_curve(m, nm)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    assert res.advantage == pytest.approx(np.max(np.abs(sk_tpr - sk_fpr)), abs=1e-12)
    # TPR at low FPR: the largest TPR among points with FPR below the level
    assert res.tpr_at_1pct_fpr == pytest.approx(np.max(sk_tpr[sk_fpr <= 0.01]), abs=1e-12)
    assert res.tpr_at_01pct_fpr == pytest.approx(np.max(sk_tpr[sk_fpr <= 0.001]), abs=1e-12)
    # the chosen rule reproduces the advantage
    if res.direction > 0:
        adv = np.mean(m >= res.threshold) - np.mean(nm >= res.threshold)
    else:
        adv = np.mean(m < res.threshold) - np.mean(nm < res.threshold)
    assert adv == pytest.approx(res.advantage, abs=1e-12)


def test_swapping_roles_is_symmetric():
    rng = np.random.default_rng(2)
    m, nm = rng.normal(0.5, 1, 400), rng.normal(0, 1, 400)
    a, b = attack_metrics(jax.random.key(0), m, nm), attack_metrics(jax.random.key(0), nm, m)
    assert a.advantage == pytest.approx(b.advantage, abs=1e-12)
    assert a.auc == pytest.approx(1 - b.auc, abs=1e-12)
    assert a.direction == 1 and b.direction == -1
    lo_a, hi_a = a.advantage_ci
    lo_b, hi_b = b.advantage_ci
    assert lo_a == pytest.approx(lo_b, abs=1e-9) and hi_a == pytest.approx(hi_b, abs=1e-9)


def test_small_example_by_hand():
    res = attack_metrics(jax.random.key(0), [3.0, 2.0, 1.5], [1.0, 0.0, 2.5])
    assert res.advantage == pytest.approx(2 / 3)
    assert res.threshold == 1.5 and res.direction == 1
    assert res.auc == pytest.approx(7 / 9)
    # at FPR 0 the best rule catches only the top member
    assert res.tpr_at_1pct_fpr == pytest.approx(1 / 3)
    # interval: Bonferroni CP at level 0.975 each, TPR 3/3 and FPR 1/3
    tlo, thi = clopper_pearson(3, 3, 0.975)
    flo, fhi = clopper_pearson(1, 3, 0.975)
    assert res.advantage_ci == pytest.approx((max(0.0, tlo - fhi), thi - flo))
    assert res.n_members == 3 and res.n_nonmembers == 3


@pytest.mark.parametrize("mu", [0.5, 1.0])
def test_two_gaussians_tend_to_closed_forms(mu):
    """N(0,1) vs N(mu,1): advantage 2 Phi(mu/2) - 1, AUC Phi(mu/sqrt 2), TPR at 1% FPR Phi(mu - z_0.99)."""
    rng = np.random.default_rng(3)
    n = 20_000
    m, nm = rng.normal(mu, 1, n), rng.normal(0, 1, n)
    res = attack_metrics(jax.random.key(3), m, nm)
    truth = 2 * sps.norm.cdf(mu / 2) - 1
    p_t, p_f = sps.norm.cdf(mu / 2), sps.norm.cdf(-mu / 2)  # TPR, FPR at the optimal threshold mu/2
    se = np.sqrt(p_t * (1 - p_t) / n + p_f * (1 - p_f) / n)
    assert abs(res.advantage - truth) < 4 * se  # 4 sigma (the in-sample maximum adds about one SE)
    assert abs(res.advantage_heldout - truth) < 4 * np.sqrt(2) * se  # half the data
    lo, hi = res.advantage_ci
    assert lo <= truth <= hi
    lo, hi = res.advantage_heldout_ci
    assert lo <= truth <= hi
    auc_true = sps.norm.cdf(mu / np.sqrt(2))
    assert abs(res.auc - auc_true) < 4 * np.sqrt(auc_true * (1 - auc_true) / n)  # conservative SE bound
    z = sps.norm.ppf(0.99)
    tpr_true = sps.norm.cdf(mu - z)
    # binomial error of TPR plus the threshold's error (slope dTPR/dFPR = exp(mu z - mu^2/2) at FPR 1%)
    se_tpr = np.sqrt(tpr_true * (1 - tpr_true) / n + np.exp(mu * z - mu**2 / 2) ** 2 * 0.01 * 0.99 / n)
    assert abs(res.tpr_at_1pct_fpr - tpr_true) < 4 * se_tpr


def test_identical_distributions_give_no_advantage():
    rng = np.random.default_rng(4)
    n = 5000
    res = attack_metrics(jax.random.key(4), rng.normal(size=n), rng.normal(size=n))
    # held-out rule: TPR and FPR estimate the same probability; SE of the difference <= sqrt(2 * 0.25 / (n/2))
    se = np.sqrt(2 * 0.25 / (n // 2))
    assert abs(res.advantage_heldout) < 4 * se
    lo, hi = res.advantage_heldout_ci
    assert lo == 0.0 and hi > 0.0
    # in-sample: a KS-type maximum of order 1/sqrt(n); its interval reaches (nearly) zero
    assert res.advantage < 4 * np.sqrt(2 / n)
    assert res.advantage_ci[0] < 0.01
    assert abs(res.auc - 0.5) < 4 * np.sqrt(1 / (12 * n) * 2)


def test_in_sample_optimistic_heldout_unbiased():
    """Over many small null experiments the in-sample advantage is biased upwards, the held-out one is not."""
    rng = np.random.default_rng(5)
    reps, n = 150, 200
    ins, ho = [], []
    for i in range(reps):
        res = attack_metrics(jax.random.key(i), rng.normal(size=n), rng.normal(size=n))
        ins.append(res.advantage)
        ho.append(res.advantage_heldout)
    ho = np.asarray(ho)
    assert abs(ho.mean()) < 4 * ho.std(ddof=1) / np.sqrt(reps)
    assert np.mean(ins) > 0.05  # E max_t |TPR - FPR| under the null is about 0.87 sqrt(2/n) ~ 0.087


@pytest.mark.slow
def test_heldout_interval_covers_the_rules_true_advantage():
    """The held-out CP interval covers the TRUE advantage of the selected rule (Gaussians: closed form)."""
    rng = np.random.default_rng(6)
    reps, n, mu, level = 200, 300, 0.8, 0.9
    hits = 0
    for i in range(reps):
        m, nm = rng.normal(mu, 1, n), rng.normal(0, 1, n)
        res = attack_metrics(jax.random.key(i), m, nm, level=level)
        t, d = res.heldout_threshold, res.heldout_direction
        true_adv = d * (sps.norm.sf(t - mu) - sps.norm.sf(t))
        lo, hi = res.advantage_heldout_ci
        hits += lo <= true_adv <= hi
    # Bonferroni makes the interval conservative: coverage >= level, up to 3 binomial SEs
    assert hits / reps >= level - 3 * np.sqrt(level * (1 - level) / reps)


def test_roc_downsampling_and_to_dict():
    rng = np.random.default_rng(7)
    m, nm = rng.normal(1, 1, 3000), rng.normal(0, 1, 3000)
    res = attack_metrics(jax.random.key(0), m, nm, max_roc_points=200)
    fpr, tpr = res.roc
    assert 50 <= fpr.size <= 200
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    full_fpr, full_tpr, _ = roc_curve(m, nm)
    pts = set(zip(full_fpr.tolist(), full_tpr.tolist()))
    assert all(p in pts for p in zip(fpr.tolist(), tpr.tolist()))
    assert np.min(fpr[fpr > 0]) <= 2 / nm.size  # low-FPR region kept for log plots
    d = res.to_dict()
    text = json.dumps(d)
    assert set(json.loads(text)) >= {"advantage", "advantage_ci", "auc", "tpr_at_1pct_fpr", "roc"}
    assert isinstance(res, AttackMetrics)
    # constant scores: no advantage, threshold at +inf becomes None
    const = attack_metrics(jax.random.key(0), np.zeros(5), np.zeros(5)).to_dict()
    assert const["advantage"] == 0.0 and const["threshold"] is None and const["auc"] == 0.5
    json.dumps(const)


def test_metrics_accept_jax_arrays_and_validate():
    res = attack_metrics(jax.random.key(0), jnp.ones((2, 3)), jnp.zeros((4,)))
    assert res.advantage == 1.0 and res.n_members == 6 and res.n_nonmembers == 4
    with pytest.raises(ValueError, match="NaN"):
        attack_metrics(jax.random.key(0), [1.0, np.nan], [0.0, 1.0])
    with pytest.raises(ValueError, match="member_scores"):
        attack_metrics(jax.random.key(0), [], [0.0, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        attack_metrics(jax.random.key(0), [1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="level"):
        attack_metrics(jax.random.key(0), [1.0, 2.0], [0.0, 1.0], level=0.0)
    # infinite scores are fine (e.g. a loss of exactly zero)
    assert attack_metrics(jax.random.key(0), [np.inf, 1.0], [0.0, -np.inf]).advantage == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Paired bootstrap


def _paired(rng, r, delta):
    shared = rng.normal(0, 5, r)  # replicate effect common to both quantizers
    return shared + delta + rng.normal(0, 1, r), shared + rng.normal(0, 1, r)


def test_paired_bootstrap_coverage_and_width():
    rng = np.random.default_rng(8)
    reps, r, delta = 300, 100, 0.3
    hits, widths = 0, []
    for i in range(reps):
        a, b = _paired(rng, r, delta)
        res = paired_bootstrap(jax.random.key(i), a, b, n_boot=1000)
        assert res.estimate == pytest.approx(np.mean(a - b))
        hits += res.lo <= delta <= res.hi
        widths.append(res.hi - res.lo)
    se = np.sqrt(0.95 * 0.05 / reps)
    assert abs(hits / reps - 0.95) < 3.5 * se  # percentile bootstrap of a mean, R = 100: close to nominal
    # width tracks the paired SE sqrt(2)/sqrt(R), not the unpaired one (shared noise sd 5)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(2 / r), rel=0.1)


def test_paired_bootstrap_median_and_validation():
    rng = np.random.default_rng(9)
    a, b = _paired(rng, 201, 1.0)
    res = paired_bootstrap(jax.random.key(0), a, b, stat="median")
    assert res.estimate == pytest.approx(np.median(a - b))
    assert res.lo <= res.estimate <= res.hi
    assert res.to_dict() == {"estimate": res.estimate, "lo": res.lo, "hi": res.hi}
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(jax.random.key(0), a, b[:-1])
    with pytest.raises(ValueError, match="stat"):
        paired_bootstrap(jax.random.key(0), a, b, stat="mode")
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(jax.random.key(0), a, b, n_boot=5)
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap(jax.random.key(0), np.r_[a[:-1], np.nan], b)


def test_rank_quantizers_orders_and_mirrors():
    rng = np.random.default_rng(10)
    r = 300
    shared = rng.normal(0, 3, r)
    values = {
        "int8": shared + 2.0 + rng.normal(0, 1, r),
        "fp32": shared + rng.normal(0, 1, r),
        "int4": shared + 1.0 + rng.normal(0, 1, r),
    }
    key = jax.random.key(11)
    ranking, table = rank_quantizers(key, values, n_boot=1000)
    assert ranking == ["int8", "int4", "fp32"]
    for a in ranking:
        for b in ranking:
            if a == b:
                assert b not in table[a]
                continue
            ab, ba = table[a][b], table[b][a]
            assert isinstance(ab, PairedDiff)
            assert ab.estimate == pytest.approx(-ba.estimate) and ab.lo == pytest.approx(-ba.hi)
    # same key -> same resampled replicates as a single paired bootstrap
    single = paired_bootstrap(key, values["int8"], values["fp32"], n_boot=1000)
    got = table["int8"]["fp32"]
    assert got.estimate == pytest.approx(single.estimate)
    assert got.lo == pytest.approx(single.lo, abs=1e-5) and got.hi == pytest.approx(single.hi, abs=1e-5)
    # the differences of 1 are resolved: intervals exclude 0 and cover the truth
    assert table["int8"]["int4"].lo > 0 and table["int4"]["fp32"].lo > 0
    assert table["int8"]["fp32"].lo <= 2.0 <= table["int8"]["fp32"].hi


def test_rank_quantizers_with_flip_indicators_and_validation():
    rng = np.random.default_rng(12)
    r = 400
    flipped = {"int2": rng.random(r) < 0.5, "int8": rng.random(r) < 0.05}
    ranking, table = rank_quantizers(jax.random.key(0), {k: 1 - v.astype(int) for k, v in flipped.items()})
    assert ranking == ["int8", "int2"]
    d = table["int8"]["int2"]
    assert d.estimate == pytest.approx(np.mean(flipped["int2"]) - np.mean(flipped["int8"]))
    assert d.lo > 0
    json.dumps({a: {b: v.to_dict() for b, v in row.items()} for a, row in table.items()})
    with pytest.raises(ValueError, match="at least two"):
        rank_quantizers(jax.random.key(0), {"a": np.ones(3)})
    with pytest.raises(ValueError, match="same shape"):
        rank_quantizers(jax.random.key(0), {"a": np.ones(3), "b": np.ones(4)})
