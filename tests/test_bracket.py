"""Tests of qmis_jax.stats.bracket: the swap-coupling bound, held-out advantages by replicate, the certified MIS
bracket (theory.md section 10) against exact Gaussian-mean values, and the asymptotic-regime flag (section 5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from qmis_jax.attacks import heldout_advantage, heldout_advantage_embedded
from qmis_jax.attacks.metrics import attack_metrics, attack_metrics_by_replicate, attack_metrics_embedded
from qmis_jax.indicator import asymptotic_regime
from qmis_jax.indicator.exact import (
    gaussian_mean_fp_delta,
    gaussian_mean_gaps,
    gaussian_mean_mis_approximation,
    gaussian_mean_quantized_delta,
)
from qmis_jax.stats import mean_lower_limit
from qmis_jax.stats.bracket import bracket_levels, bracket_report, mis_bracket, swap_bound

# ----------------------------------------------------------------------------------------------------------------
# Swap end


@pytest.mark.parametrize("level", [0.9, 0.975])
def test_swap_bound_is_the_one_sided_clopper_pearson_limit(level):
    for n, k in [(1, 0), (10, 0), (10, 3), (10, 10), (8000, 48), (500, 499)]:
        changed = np.zeros(n, bool)
        changed[:k] = True
        b = swap_bound(changed, level=level)
        # one-sided at `level` = upper end of the two-sided interval at 1 - 2 (1 - level)
        ref = proportion_confint(k, n, alpha=2 * (1 - level), method="beta")[1]
        assert b.upper == pytest.approx(ref, rel=1e-10, abs=1e-14)
        assert b.rate == k / n and b.changes == k and b.trials == n
        assert b.mis_lower == pytest.approx(1 - ref)
        assert 0.0 <= b.upper <= 1.0
    assert swap_bound(np.ones(7, bool)).upper == 1.0  # a continuous release: lower end 0
    assert swap_bound([0, 1, 0, 0]).changes == 1
    with pytest.raises(ValueError, match="changed"):
        swap_bound([])
    with pytest.raises(ValueError, match="changed"):
        swap_bound([0.5, 1.0])
    with pytest.raises(ValueError, match="level"):
        swap_bound([True], level=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Mean limits


def test_mean_lower_limit_formulas_and_coverage():
    x = np.array([0.2, -0.1, 0.4, 0.0, 0.3, 0.1])
    lo, hi, hoeff, bern = mean_lower_limit(x, level=0.95)
    n, alpha = x.size, 0.05
    assert hoeff == pytest.approx(max(x.mean() - math.sqrt(2 * math.log(2 / alpha) / n), -1.0))
    v = np.var(x, ddof=1)
    ref_bern = x.mean() - math.sqrt(2 * v * math.log(4 / alpha) / n) - 14 * math.log(4 / alpha) / (3 * (n - 1))
    assert bern == pytest.approx(max(ref_bern, -1.0))
    assert lo == pytest.approx(max(hoeff, bern)) and -1.0 <= lo <= x.mean() <= hi <= 1.0
    # coverage of the lower limit for +-1 values with mean 0.2 and for small-spread values with mean 0.01
    rng = np.random.default_rng(0)
    for sample, mean in [
        (lambda: np.where(rng.random(200) < 0.6, 1.0, -1.0), 0.2),
        (lambda: rng.binomial(20, 0.01 + 0.5, 200) / 20.0 - 0.5, 0.01),
    ]:
        misses = sum(mean_lower_limit(sample(), level=0.9)[0] > mean for _ in range(400))
        assert misses / 400 <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 400)
    with pytest.raises(ValueError, match="values"):
        mean_lower_limit([0.5])
    with pytest.raises(ValueError, match="values"):
        mean_lower_limit([0.5, 1.5])


# ----------------------------------------------------------------------------------------------------------------
# Held-out advantages by replicate


def test_heldout_by_replicate_splits_and_values():
    rng = np.random.default_rng(1)
    reps, m, mu = 400, 30, 0.7
    members = rng.normal(mu, 1, (reps, m))
    nonmembers = rng.normal(0, 1, (reps, m + 5))
    ho = heldout_advantage(jax.random.key(3), members, nonmembers, level=0.95)
    sel, ev = ho.select_replicates, ho.eval_replicates
    assert np.intersect1d(sel, ev).size == 0 and np.union1d(sel, ev).size == reps
    # the values are each evaluation replicate's TPR - FPR of the fixed rule, recomputed here by hand
    t, d = ho.threshold, ho.direction
    ref = [d * (np.mean(members[i] >= t) - np.mean(nonmembers[i] >= t)) for i in ev]
    np.testing.assert_allclose(ho.values, ref, atol=1e-12)
    # the rule's true advantage (closed form for two unit Gaussians) is within 4 SE of the mean, below the optimum
    true_rule = d * (sps.norm.sf(t - mu) - sps.norm.sf(t))
    se = np.std(ho.values, ddof=1) / math.sqrt(ev.size)
    assert abs(ho.mean - true_rule) < 4 * se
    assert true_rule <= 2 * sps.norm.cdf(mu / 2) - 1 + 1e-12
    assert ho.lower <= ho.mean <= ho.upper and ho.lower > 0
    # same key, same split; another key, another split
    again = heldout_advantage(jax.random.key(3), members, nonmembers, level=0.9)
    np.testing.assert_array_equal(again.select_replicates, sel)
    assert again.lower >= ho.lower
    assert not np.array_equal(heldout_advantage(jax.random.key(7), members, nonmembers).select_replicates, sel)
    with pytest.raises(ValueError, match="replicate"):
        heldout_advantage(jax.random.key(0), members[:3], nonmembers[:3])
    with pytest.raises(ValueError, match="replicate count"):
        heldout_advantage(jax.random.key(0), members, nonmembers[:10])


def test_heldout_lower_limit_covers_under_the_null_and_is_unbiased():
    """No signal: the held-out mean is unbiased (within 4 SE of 0 over many experiments); the 90% lower limit exceeds
    the rule's advantage (0) in at most about 10% of them."""
    rng = np.random.default_rng(2)
    means, above = [], 0
    exps = 200
    for i in range(exps):
        a, b = rng.normal(size=(40, 20)), rng.normal(size=(40, 20))
        ho = heldout_advantage(jax.random.key(i), a, b, level=0.9)
        means.append(ho.mean)
        above += ho.lower > 0
    means = np.asarray(means)
    assert abs(means.mean()) < 4 * means.std(ddof=1) / math.sqrt(exps)
    assert above / exps <= 0.1 + 3 * math.sqrt(0.09 / exps)


def test_heldout_embedded_splits_replicates_and_targets():
    rng = np.random.default_rng(4)
    reps, targets, mu = 300, 40, 0.8
    membership = rng.random((reps, targets)) < 0.5
    scores = rng.normal(0, 1, (reps, targets)) + mu * membership + rng.normal(0, 0.5, targets)  # per-target offset
    ho = heldout_advantage_embedded(jax.random.key(5), scores, membership, level=0.95)
    assert np.intersect1d(ho.select_replicates, ho.eval_replicates).size == 0
    assert np.intersect1d(ho.select_targets, ho.eval_targets).size == 0
    assert np.union1d(ho.select_targets, ho.eval_targets).size == targets
    t, d = ho.threshold, ho.direction
    ref = []
    for i in ho.eval_replicates:
        s, mem = scores[i, ho.eval_targets], membership[i, ho.eval_targets]
        ref.append(d * (np.mean(s[mem] >= t) - np.mean(s[~mem] >= t)))
    np.testing.assert_allclose(ho.values, ref, atol=1e-12)
    assert 0 < ho.lower <= ho.mean <= 2 * sps.norm.cdf(mu / 2 / math.sqrt(1.25)) - 1 + 4 * np.std(ref) / 12
    no_split = heldout_advantage_embedded(jax.random.key(5), scores, membership, split_targets=False)
    assert no_split.select_targets is None and no_split.eval_targets is None
    with pytest.raises(ValueError, match="membership"):
        heldout_advantage_embedded(jax.random.key(0), scores, membership[:, :3])


def test_attack_metrics_by_replicate_and_embedded():
    rng = np.random.default_rng(8)
    members, nonmembers = rng.normal(0.5, 1, (200, 25)), rng.normal(0, 1, (200, 25))
    res = attack_metrics_by_replicate(jax.random.key(1), members, nonmembers, bound_level=0.99)
    ho = heldout_advantage(jax.random.key(1), members, nonmembers, level=0.99)
    assert res.heldout_design == "replicate" and res.heldout_replicates == ho.eval_replicates.size
    assert res.advantage_heldout == pytest.approx(ho.mean)
    assert res.advantage_bound == pytest.approx(max(0.0, ho.lower))
    two = heldout_advantage(jax.random.key(1), members, nonmembers, level=0.975)
    assert res.advantage_heldout_ci == pytest.approx((max(0.0, two.lower), min(1.0, two.upper)))
    pooled = attack_metrics(jax.random.key(1), members, nonmembers)  # the in-sample part is the pooled one
    assert res.advantage == pooled.advantage and res.auc == pooled.auc and pooled.heldout_design == "pair"
    d = res.to_dict()
    for k in ("advantage", "advantage_bound"):
        assert 0.0 <= d[k] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in d["advantage_heldout_ci"])
    membership = rng.random((200, 30)) < 0.5
    scores = rng.normal(size=(200, 30)) + 0.5 * membership
    emb = attack_metrics_embedded(jax.random.key(2), scores, membership)
    assert emb.heldout_design == "replicate+target"
    assert emb.n_members == int(membership.sum())
    assert emb.advantage_heldout == pytest.approx(
        heldout_advantage_embedded(jax.random.key(2), scores, membership).mean
    )
    with pytest.raises(ValueError, match="by_replicate"):
        attack_metrics_by_replicate(jax.random.key(0), members.ravel(), nonmembers.ravel())


# ----------------------------------------------------------------------------------------------------------------
# The bracket


def test_bracket_levels_and_arithmetic():
    assert bracket_levels(1) == pytest.approx((0.975, 0.975))
    assert bracket_levels(3) == pytest.approx((0.975, 1 - 0.025 / 3))
    b = mis_bracket(0.02, [0.001, -0.03, 0.004])
    assert b.to_list() == pytest.approx([0.98, 0.996])
    assert mis_bracket(0.0, []).to_list() == [1.0, 1.0]
    assert mis_bracket(1.0, [-0.2]).to_list() == [0.0, 1.0]
    assert mis_bracket(0.001, [0.3], continuous=True).to_list() == pytest.approx([0.0, 0.7])
    with pytest.raises(ValueError, match="swap_upper"):
        mis_bracket(1.2, [])
    with pytest.raises(ValueError, match="num_attacks"):
        bracket_levels(0)


MU, STEP = 0.3, 1.0


@jax.jit
def _grid_replicates(key, n_dummy):
    """One replicate of the 1-D grid Gaussian mean: its swap and the LOSS scores (negative squared loss)."""
    n = n_dummy.shape[0]
    kz, k0, kn = jax.random.split(key, 3)
    z = MU + jax.random.normal(kz, (n,))
    z0 = MU + jax.random.normal(k0)
    fresh = MU + jax.random.normal(kn, (n,))
    theta = jnp.mean(z)
    theta_swap = theta + (z0 - z[0]) / n
    release = STEP * jnp.round(theta / STEP)
    changed = release != STEP * jnp.round(theta_swap / STEP)
    return changed, -0.5 * (z - release) ** 2, -0.5 * (fresh - release) ** 2


def _grid_bracket(n, replicates, seed):
    keys = jax.random.split(jax.random.key(seed), replicates)
    changed, member, nonmember = jax.vmap(_grid_replicates, in_axes=(0, None))(keys, jnp.zeros(n))
    swap_level, attack_level = bracket_levels(1)
    swap = swap_bound(np.asarray(changed), level=swap_level)
    ho = heldout_advantage(jax.random.key(seed + 1), np.asarray(member), np.asarray(nonmember), level=attack_level)
    return mis_bracket(swap.upper, [ho.lower]), swap


@pytest.mark.slow
@pytest.mark.parametrize("n", [10, 100, 300])
def test_exact_grid_mis_lies_in_the_bracket(n):
    """1-D fixed grid (theory.md section 10): 1 - Delta (quadrature) inside the bracket; tight at n = 100."""
    delta = gaussian_mean_quantized_delta(n, mu=MU, step=STEP)
    bracket, swap = _grid_bracket(n, 8000, seed=n)
    assert bracket.lower <= 1.0 - delta <= bracket.upper
    if n == 100:
        assert 1.0 - bracket.lower <= 3.0 * delta
    # the swap rate itself estimates P(R != R') = 1.3-1.5 Delta (section 10): at least Delta, within 4 SE
    se = math.sqrt(max(swap.rate * (1 - swap.rate), 1e-12) / swap.trials)
    assert swap.rate >= delta - 4 * max(se, math.sqrt(delta / swap.trials))


def _fp_replicate(key, shape):
    """Full-precision Gaussian mean in d dimensions (mu = 0): swap and likelihood-ratio scores of the attacker who
    knows the law: log N(R; z / n, s1^2 I) - log N(R; 0, s0^2 I)."""
    n, d = shape.shape
    kz, k0, kn = jax.random.split(key, 3)
    z = jax.random.normal(kz, (n, d))
    fresh = jax.random.normal(kn, (n, d))
    release = jnp.mean(z, axis=0)
    swapped = release + (jax.random.normal(k0, (d,)) - z[0]) / n
    s0sq, s1sq = 1.0 / n, (n - 1) / n**2

    def llr(pts):
        return -jnp.sum((release[None, :] - pts / n) ** 2, axis=1) / (2 * s1sq) + jnp.sum(release**2) / (2 * s0sq)

    return jnp.any(release != swapped), llr(z), llr(fresh)


@pytest.mark.slow
def test_full_precision_release_bracket():
    """Continuous release, d = 50, n = 50 (section 7: Delta ~ 0.38): lower end 0, 1 - Delta inside, and the
    likelihood-ratio attack's held-out lower limit is at least half of Delta."""
    n, d, reps = 50, 50, 2000
    delta, delta_se = gaussian_mean_fp_delta(jax.random.key(3), n, d, num_samples=200_000)
    keys = jax.random.split(jax.random.key(11), reps)
    changed, member, nonmember = jax.jit(jax.vmap(_fp_replicate, in_axes=(0, None)))(keys, jnp.zeros((n, d)))
    swap_level, attack_level = bracket_levels(1)
    swap = swap_bound(np.asarray(changed), level=swap_level)
    ho = heldout_advantage(jax.random.key(12), np.asarray(member), np.asarray(nonmember), level=attack_level)
    bracket = mis_bracket(swap.upper, [ho.lower], continuous=True)
    assert swap.rate == 1.0 and bracket.lower == 0.0
    assert bracket.lower <= 1.0 - delta - 4 * delta_se and 1.0 - delta + 4 * delta_se <= bracket.upper
    assert 1.0 - bracket.upper >= 0.5 * delta


# ----------------------------------------------------------------------------------------------------------------
# Regime


def _regime_cases():
    """(sqrt(n) c_min, approximation / exact) on the exact 1-D grid Gaussian-mean cases: one dominant competitor."""
    out = []
    for mu, ns in [(0.3, [10, 25, 39, 77, 100, 300]), (0.45, [25, 100, 400, 900, 1600]), (0.2, [11, 44, 100])]:
        delta, sd = gaussian_mean_gaps(mu=mu)
        c_min = float(np.min(delta / sd))
        for n in ns:
            ratio = gaussian_mean_mis_approximation(n, mu=mu) / gaussian_mean_quantized_delta(n, mu=mu)
            out.append((math.sqrt(n) * c_min, ratio))
    return out


def test_asymptotic_regime_on_exact_gaussian_mean_cases():
    cases = _regime_cases()
    seen_false = seen_true = 0
    for x, ratio in cases:
        if ratio < 0.7:
            assert not asymptotic_regime(x), (x, ratio)
            seen_false += 1
        if 0.8 <= ratio <= 1.2:
            assert asymptotic_regime(x), (x, ratio)
            seen_true += 1
    assert seen_false >= 3 and seen_true >= 3
    assert asymptotic_regime(float("nan")) is False and asymptotic_regime(float("inf")) is True
    np.testing.assert_array_equal(asymptotic_regime(np.array([0.5, 2.5, np.nan])), [False, True, False])


def test_lira_by_replicate_on_the_full_precision_gaussian_mean():
    """Embedded-target design (theory.md section 7) on the full-precision mean, d = 50, n = 50: LiRA's pooled
    in-sample advantage is the one of the pair-based wrapper, and its held-out advantage (rule chosen on other
    replicates AND other targets) does not beat the exact Delta beyond 4 SE, with a positive lower limit."""
    from qmis_jax.attacks import FIX_VARIANCE_BELOW, embedded_target_membership, lira_metrics, shadow_mask
    from qmis_jax.attacks.lira import fit_lira, lira, lira_scores

    n, d, reps, targets = 50, 50, 512, 10
    k_t, k_m, k_f = jax.random.split(jax.random.key(21), 3)
    pts = jax.random.normal(k_t, (targets, d))
    membership = embedded_target_membership(k_m, replicates=reps, targets=targets)

    def release(k, mem):
        fresh = jax.random.normal(k, (n - targets // 2, d))
        inside = jnp.sum(jnp.where(mem[:, None], pts, 0.0), axis=0)
        return (inside + jnp.sum(fresh, axis=0)) / n

    rel = jax.vmap(release)(jax.random.split(k_f, reps), membership)
    scores = -jnp.sum((rel[:, None, :] - pts[None, :, :]) ** 2, axis=-1)  # higher = closer = more likely a member
    shadow = shadow_mask(reps, shadows=reps // 2)
    assert reps // 2 >= FIX_VARIANCE_BELOW  # per-target variances, as in the direct fit below
    key = jax.random.key(3)
    res = lira_metrics(key, scores, membership, shadow=shadow, bound_level=0.975)
    pooled = attack_metrics(key, *lira(scores, membership, shadow=shadow)[:2])
    assert res["advantage"] == pytest.approx(pooled.advantage) and res["auc"] == pytest.approx(pooled.auc)
    assert res["heldout_design"] == "replicate+target" and 0 < res["heldout_replicates"] <= reps // 4 + 1
    assert res["fallbacks"]["targets"] == targets and not res["fixed_variance"]
    # independent route to the held-out figure: the fit, the scores and the split by hand
    sh = np.asarray(shadow)
    lr = np.asarray(lira_scores(scores, fit_lira(scores, membership, shadow=shadow)))[~sh]
    ho = heldout_advantage_embedded(key, lr, np.asarray(membership)[~sh], level=0.975)
    assert res["advantage_heldout_mean"] == pytest.approx(ho.mean)
    assert res["advantage_bound"] == pytest.approx(max(0.0, ho.lower))
    delta, delta_se = gaussian_mean_fp_delta(jax.random.key(5), n, d, num_samples=200_000)
    se = np.std(ho.values, ddof=1) / math.sqrt(ho.values.size)
    assert res["advantage_heldout_mean"] < delta + 4 * (se + delta_se)
    assert 0.0 < res["advantage_bound"] <= res["advantage_heldout_mean"]


def test_bracket_report_entries():
    changed = np.zeros(400, bool)
    changed[:3] = True
    out = bracket_report(changed, {"loss": 0.01, "lira": 0.002}, level=0.95)
    u = proportion_confint(3, 400, alpha=0.05, method="beta")[1]  # one-sided 97.5% = two-sided 95% upper end
    assert out["mis_bracket"] == pytest.approx([1 - u, 0.99])
    assert out["mis_empirical_upper"] == out["mis_bracket"][1]
    assert out["attack_level"] == pytest.approx(1 - 0.025 / 2) and out["swap"]["changes"] == 3
    assert bracket_report(changed, None, continuous=True)["mis_bracket"] == [0.0, 1.0]
