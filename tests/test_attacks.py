"""Tests of qmis_jax.stats.attacks: LOSS, LiRA statistic, membership designs, LiRA fits and scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from qmis_jax.stats.attacks import (
    LiraFit,
    embedded_target_membership,
    fit_lira,
    lira,
    lira_pool,
    lira_scores,
    loss_attack,
    pool_membership,
    score_from_loss,
    shadow_mask,
)
from qmis_jax.stats.metrics import attack_metrics

# ----------------------------------------------------------------------------------------------------------------
# Per-example statistics


def test_loss_attack_negates():
    rng = np.random.default_rng(0)
    lm, ln = rng.random((3, 4)), rng.random((3, 4))
    ms, ns = loss_attack(lm, ln)
    assert ms.shape == (3, 4) and ns.shape == (3, 4)
    np.testing.assert_allclose(ms, -lm, rtol=1e-6)
    np.testing.assert_allclose(ns, -ln, rtol=1e-6)


def test_score_from_loss_binary_is_logit_of_p_correct():
    loss = np.r_[1e-3, 0.01, 0.1, 0.5, np.log(2.0), 1.0, 3.0, 10.0, 30.0]
    p = np.exp(-loss)
    ref = np.log(p) - np.log1p(-p)  # float64 reference
    got = score_from_loss(jnp.asarray(loss, jnp.float32), "binary")
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=2e-6)
    with jax.enable_x64(True):
        got64 = score_from_loss(jnp.asarray(loss), "binary")
        assert got64.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got64), ref, rtol=1e-12, atol=1e-12)


def test_score_from_loss_binary_extremes_are_stable():
    with jax.enable_x64(True):
        tiny = score_from_loss(jnp.asarray([1e-30, 1e-200]), "binary")
        # l -> 0: logit(exp(-l)) = -log(l) - l/2 + O(l^2)
        np.testing.assert_allclose(np.asarray(tiny), -np.log([1e-30, 1e-200]), rtol=1e-12)
        big = score_from_loss(jnp.asarray([50.0, 800.0, 1e5]), "binary")
        # l -> inf: logit = -l + exp(-l) + ...
        np.testing.assert_allclose(np.asarray(big), [-50.0 + np.exp(-50.0), -800.0, -1e5], rtol=1e-14)
    s32 = score_from_loss(jnp.asarray([0.0, 1e-40, 1e-8, 100.0, 1e30], jnp.float32), "binary")
    assert bool(jnp.all(jnp.isfinite(s32)))
    assert float(s32[0]) == pytest.approx(-np.log(np.finfo(np.float32).tiny), rel=1e-6)
    grid = jnp.linspace(1e-4, 40.0, 2001)
    assert bool(jnp.all(jnp.diff(score_from_loss(grid, "binary")) < 0))  # strictly decreasing in the loss


def test_score_from_loss_regression_jit_and_validation():
    loss = jnp.asarray([[0.0, 1.5], [2.0, 7.0]])
    np.testing.assert_array_equal(score_from_loss(loss, "regression"), -loss)
    f = jax.jit(score_from_loss, static_argnames="task")
    np.testing.assert_allclose(f(loss + 0.1, task="binary"), score_from_loss(loss + 0.1, "binary"), rtol=1e-6)
    assert score_from_loss(jnp.asarray([1, 2]), "regression").dtype == jnp.float32
    with pytest.raises(ValueError, match="task"):
        score_from_loss(loss, "multiclass")


# ----------------------------------------------------------------------------------------------------------------
# Membership designs


def test_embedded_target_membership_balanced_and_chunk_invariant():
    key = jax.random.key(1)
    r, t = 4000, 10
    m = np.asarray(embedded_target_membership(key, replicates=r, targets=t))
    assert m.shape == (r, t) and m.dtype == bool
    np.testing.assert_array_equal(m.sum(axis=1), t // 2)  # each replicate holds exactly half
    freq = m.mean(axis=0)
    assert np.all(np.abs(freq - 0.5) < 4 * np.sqrt(0.25 / r))  # each target in about half, 4 sigma
    # a uniform random half: P(targets 0 and 1 both in) = (T/2)(T/2 - 1) / (T (T - 1))
    both = np.mean(m[:, 0] & m[:, 1])
    p = (t / 2) * (t / 2 - 1) / (t * (t - 1))
    assert abs(both - p) < 4 * np.sqrt(p * (1 - p) / r)
    # row i depends only on fold_in(key, i)
    head = np.asarray(embedded_target_membership(key, replicates=7, targets=t))
    np.testing.assert_array_equal(head, m[:7])
    other = np.asarray(embedded_target_membership(jax.random.key(2), replicates=7, targets=t))
    long = np.asarray(embedded_target_membership(key, replicates=200_000, targets=t))  # several chunks
    np.testing.assert_array_equal(long[:r], m)
    np.testing.assert_array_equal(long.sum(axis=1), t // 2)
    assert abs(long[150_000:].mean(axis=0) - 0.5).max() < 4 * np.sqrt(0.25 / 50_000)
    assert not np.array_equal(other, head)


def test_pool_membership_and_validation():
    m = np.asarray(pool_membership(jax.random.key(3), replicates=500, pool=20))
    assert m.shape == (500, 20)
    np.testing.assert_array_equal(m.sum(axis=1), 10)
    assert np.all(np.abs(m.mean(axis=0) - 0.5) < 4 * np.sqrt(0.25 / 500))
    with pytest.raises(ValueError, match="targets must be even"):
        embedded_target_membership(jax.random.key(0), replicates=3, targets=5)
    with pytest.raises(ValueError, match="replicates"):
        embedded_target_membership(jax.random.key(0), replicates=0, targets=4)
    with pytest.raises(ValueError, match="targets"):
        embedded_target_membership(jax.random.key(0), replicates=2, targets=2.0)
    with pytest.raises(ValueError, match="pool must be even"):
        pool_membership(jax.random.key(0), replicates=3, pool=7)


def test_shadow_mask():
    np.testing.assert_array_equal(shadow_mask(5, shadows=3), [True, True, True, False, False])
    with pytest.raises(ValueError, match="shadows"):
        shadow_mask(5, shadows=5)
    with pytest.raises(ValueError, match="shadows"):
        shadow_mask(5, shadows=0)


# ----------------------------------------------------------------------------------------------------------------
# LiRA fits and scores against a per-target NumPy/SciPy reference


def _random_design(seed, r=40, t=6):
    rng = np.random.default_rng(seed)
    member = np.asarray(embedded_target_membership(jax.random.key(seed), replicates=r, targets=t))
    scores = rng.normal(size=(r, t)) + 1.5 * member + rng.normal(size=t)  # per-target offsets
    shadow = np.arange(r) < 3 * r // 4
    return scores.astype(np.float32), member, shadow


def _reference_lira(scores, member, shadow, online, fix_variance):
    """Loop over targets with NumPy/SciPy (Carlini et al. 2022 online / offline tests)."""
    t = scores.shape[1]
    mu_in, mu_out, var_in, var_out = np.zeros(t), np.zeros(t), np.zeros(t), np.zeros(t)
    ss_in = ss_out = dof_in = dof_out = 0.0
    for j in range(t):
        s_in = scores[shadow & member[:, j], j].astype(np.float64)
        s_out = scores[shadow & ~member[:, j], j].astype(np.float64)
        mu_in[j], mu_out[j] = s_in.mean(), s_out.mean()
        var_in[j], var_out[j] = s_in.var(ddof=1), s_out.var(ddof=1)
        ss_in += ((s_in - mu_in[j]) ** 2).sum()
        ss_out += ((s_out - mu_out[j]) ** 2).sum()
        dof_in += s_in.size - 1
        dof_out += s_out.size - 1
    if fix_variance:
        var_in[:], var_out[:] = ss_in / dof_in, ss_out / dof_out
    s = scores.astype(np.float64)
    if online:
        lr = sps.norm.logpdf(s, mu_in, np.sqrt(var_in)) - sps.norm.logpdf(s, mu_out, np.sqrt(var_out))
    else:
        lr = (s - mu_out) / np.sqrt(var_out)
    return (mu_in, var_in, mu_out, var_out), lr


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fix_variance", [False, True])
def test_lira_matches_reference(online, fix_variance):
    scores, member, shadow = _random_design(5)
    (mu_in, var_in, mu_out, var_out), lr_ref = _reference_lira(scores, member, shadow, online, fix_variance)
    fit = fit_lira(scores, member, shadow=shadow, fix_variance=fix_variance)
    assert isinstance(fit, LiraFit)
    np.testing.assert_allclose(fit.mu_in, mu_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fit.var_in, var_in, rtol=1e-4)
    np.testing.assert_allclose(fit.mu_out, mu_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fit.var_out, var_out, rtol=1e-4)
    np.testing.assert_array_equal(fit.n_in + fit.n_out, shadow.sum())
    lr = lira_scores(scores, fit, online=online)
    np.testing.assert_allclose(lr, lr_ref, rtol=1e-4, atol=1e-4)
    ms, ns = lira(scores, member, shadow=shadow, online=online, fix_variance=fix_variance)
    ev = ~shadow
    np.testing.assert_allclose(ms, lr_ref[ev][member[ev]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ns, lr_ref[ev][~member[ev]], rtol=1e-4, atol=1e-4)
    assert ms.size + ns.size == ev.sum() * scores.shape[1]
    ms_pool, _ = lira_pool(scores, member, shadow=shadow, online=online, fix_variance=fix_variance)
    np.testing.assert_array_equal(ms_pool, ms)


def test_lira_core_jit_and_vmap_agree():
    designs = [_random_design(s) for s in (6, 7, 8)]
    scores = jnp.stack([d[0] for d in designs])
    member = jnp.stack([d[1] for d in designs])
    shadow = jnp.asarray(designs[0][2])

    def core(s, m):
        return lira_scores(s, fit_lira(s, m, shadow=shadow), online=True)

    batched = jax.jit(jax.vmap(core))(scores, member)
    for i in range(3):
        np.testing.assert_allclose(batched[i], core(scores[i], member[i]), rtol=1e-5, atol=1e-5)


def test_lira_constant_statistic_and_validation():
    scores, member, shadow = _random_design(9)
    const = np.ones_like(scores)
    ms, ns = lira(const, member, shadow=shadow)
    assert bool(jnp.all(jnp.isfinite(ms))) and bool(jnp.all(jnp.isfinite(ns)))
    with pytest.raises(ValueError, match="shape"):
        lira(scores[0], member[0], shadow=shadow)
    with pytest.raises(ValueError, match="membership must be a bool"):
        lira(scores, member.astype(int), shadow=shadow)
    with pytest.raises(ValueError, match="shadow must be"):
        lira(scores, member, shadow=shadow[:-1])
    with pytest.raises(ValueError, match="no evaluation replicate"):
        lira(scores, member, shadow=np.ones_like(shadow))
    with pytest.raises(ValueError, match="finite"):
        lira(np.where(member, np.inf, scores), member, shadow=shadow)
    few = np.zeros_like(shadow)
    few[:3] = True  # three shadows cannot give two in- and two out-replicates for every target
    with pytest.raises(ValueError, match="in-shadow|out-shadow"):
        lira(scores, member, shadow=few)


# ----------------------------------------------------------------------------------------------------------------
# Gaussian mean: LiRA close to the exact Delta, LOSS far below (theory.md section 7)


def _exact_delta_full_precision(rng, *, d, n, samples):
    """Delta for the full-precision Gaussian-mean release (sigma = 1, mu = 0 w.l.o.g.), by Monte Carlo.

    Member: R | z ~ N(z / n, (n - 1) / n^2 I); product law: R ~ N(0, I / n), z ~ N(0, I). With the likelihood ratio
    L, Delta = P_member(L > 1) - P_product(L > 1). Returns (Delta, its standard error).
    """
    s1, s0 = (n - 1) / n**2, 1.0 / n

    def log_lr(r, z):
        return -np.sum((r - z / n) ** 2, 1) / (2 * s1) + np.sum(r**2, 1) / (2 * s0) - d / 2 * np.log(s1 / s0)

    z = rng.standard_normal((samples, d))
    p1 = np.mean(log_lr(z / n + np.sqrt(s1) * rng.standard_normal((samples, d)), z) > 0)
    z = rng.standard_normal((samples, d))
    p0 = np.mean(log_lr(np.sqrt(s0) * rng.standard_normal((samples, d)), z) > 0)
    return p1 - p0, np.sqrt(p1 * (1 - p1) / samples + p0 * (1 - p0) / samples)


@pytest.mark.slow
def test_lira_reaches_exact_delta_on_gaussian_mean():
    d = n = 50
    t, k = 10, 5  # 2k targets, k <= n / 10
    groups, shadows, evals = 16, 1000, 500  # independent target sets, batched with vmap
    replicates = shadows + evals
    rng = np.random.default_rng(10)
    mu = np.full(d, 0.5)
    targets = mu + rng.standard_normal((groups, t, d))
    member = embedded_target_membership(jax.random.key(10), replicates=groups * replicates, targets=t)
    member = member.reshape(groups, replicates, t)
    # release = mean of the k embedded targets and n - k fresh points; the fresh sum is drawn directly
    fresh_sum = (n - k) * mu + np.sqrt(n - k) * rng.standard_normal((groups, replicates, d))
    release = jnp.asarray((fresh_sum + np.einsum("grt,gtd->grd", np.asarray(member), targets)) / n, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    loss = 0.5 * jnp.sum((release[:, :, None, :] - targets[:, None, :, :]) ** 2, axis=-1)  # (G, R, T)
    stat = score_from_loss(loss, "regression")
    shadow = shadow_mask(replicates, shadows=shadows)

    delta, delta_se = _exact_delta_full_precision(np.random.default_rng(11), d=d, n=n, samples=100_000)
    assert 0.36 < delta < 0.41  # theory.md section 7: about 0.38

    ev_member = np.asarray(member)[:, shadows:]
    advantages = {}
    for online in (True, False):
        core = jax.vmap(lambda s, m, on=online: lira_scores(s, fit_lira(s, m, shadow=shadow), online=on))
        lr = np.asarray(jax.jit(core)(stat, member))[:, shadows:]
        res = attack_metrics(lr[ev_member], lr[~ev_member], key=jax.random.key(12))
        advantages[online] = res
        # a section-1 attack never beats Delta beyond its error bars
        assert res.advantage_heldout_ci[0] <= delta + 3 * delta_se
        # with 500 in- and 500 out-shadows per target the Gaussian fits are sharp: LiRA comes close to Delta
        assert res.advantage_heldout > delta - 0.03
        assert res.advantage > delta - 0.03
    # the wrapper gives the same split for one group
    ms, ns = lira(stat[0], member[0], shadow=shadow)
    lr0 = np.asarray(lira_scores(stat[0], fit_lira(stat[0], member[0], shadow=shadow)))[shadows:]
    np.testing.assert_allclose(ms, lr0[ev_member[0]], rtol=1e-5, atol=1e-6)

    # LOSS in the fresh-data design: each replicate trains on n fresh points, non-members n further ones
    rng = np.random.default_rng(13)
    reps = 200
    x_in = mu + rng.standard_normal((reps, n, d))
    x_out = mu + rng.standard_normal((reps, n, d))
    theta = x_in.mean(axis=1, keepdims=True)
    ms, ns = loss_attack(0.5 * np.sum((x_in - theta) ** 2, -1), 0.5 * np.sum((x_out - theta) ** 2, -1))
    loss_res = attack_metrics(ms, ns, key=jax.random.key(14))
    assert loss_res.advantage_heldout_ci[0] <= delta
    # global threshold: separation 2 d / n = 2 against a spread sqrt(2 d) = 10 across points: advantage ~ 0.08
    assert loss_res.advantage < 0.15
    assert advantages[True].advantage_heldout > loss_res.advantage_heldout + 0.2
    assert advantages[False].advantage_heldout > loss_res.advantage_heldout + 0.2
