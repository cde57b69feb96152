"""Single-model and population estimates of the indicator (theory.md sections 4 and 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qmis_jax.indicator.estimate import (
    PopulationAudit,
    SingleAudit,
    population_indicator,
    single_model_indicator,
    single_model_indicator_batched,
)
from qmis_jax.indicator.events import EVENT_KINDS
from qmis_jax.problems import gaussian_mean, logistic_mixture
from qmis_jax.quantizers import identity, prune, ternary, uniform

pytestmark = pytest.mark.usefixtures("x64")


GAUSS = gaussian_mean(mu=[0.3, -0.2])
LOGISTIC = logistic_mixture(dim=4, k_modes=2, separation=2.0, scale=1.0)


def _assert_audits_equal(a, b, rtol=1e-10):
    for name in ("r_hat", "r_interval", "delta", "sigma", "rates"):
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), rtol=rtol)
    for name in ("valid", "capped", "n_moves", "ok"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    for la, lb in zip(jax.tree.leaves(a.release), jax.tree.leaves(b.release)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


@pytest.mark.slow
def test_batched_single_audit_matches_per_replicate_calls():
    q = uniform(step=0.5)
    x, y = GAUSS.sample(jax.random.key(0), 240)
    w = (jax.random.uniform(jax.random.key(1), (4, 240)) < 0.5).astype(x.dtype)
    params = jax.vmap(lambda wi: GAUSS.solve(x, y, wi))(w)
    out = single_model_indicator_batched(q, GAUSS, params, x, y, weights=w, batch_size=2)
    assert isinstance(out, SingleAudit) and out.r_hat.shape == (4,) and out.delta.shape[0] == 4
    # 0/1 weights: each replicate's audit is the audit on its member subset
    for i in (0, 3):
        members = np.asarray(w[i]) > 0
        sub = single_model_indicator(q, GAUSS, {"mu": params["mu"][i]}, x[members], y[members])
        _assert_audits_equal(jax.tree.map(lambda a, i=i: a[i], out), sub, rtol=1e-9)
    # per-replicate data sets, RTN margins with Cramer rates, and a user-level jax.vmap
    xs = jnp.stack([x[:80], x[80:160], x[160:]])
    ys = jnp.stack([y[:80], y[80:160], y[160:]])
    params = {"mu": jnp.mean(xs, axis=1)}
    opts = {"ptq": "rtn", "method": "cramer"}
    out = single_model_indicator_batched(q, GAUSS, params, xs, ys, **opts)
    one = single_model_indicator(q, GAUSS, {"mu": params["mu"][2]}, xs[2], ys[2], **opts)
    _assert_audits_equal(jax.tree.map(lambda a: a[2], out), one)


def test_single_audit_matches_a_float64_recomputation_from_the_definitions():
    # theory.md sections 3(a), 4 and 6 in NumPy float64, for the squared loss l(theta, z) = |theta - z|^2 / 2:
    # the loss-PTQ release of this separable loss is the codebook point nearest the sample mean, its competitors
    # are the one-step moves theta_0 +- h e_j, D_k(z) = l(theta_k, z) - l(theta_0, z), delta_k and sigma_k the
    # mean and (plug-in, 1/n) standard deviation of D_k over the training set, I_k = max(delta_k, 0)^2 /
    # (2 sigma_k^2), r_hat = min_k I_k, and the interval the rates at delta_k -/+ z sigma_k / sqrt(n).
    n, h, z = 120, 0.5, 2.0
    x, y = GAUSS.sample(jax.random.key(3), n)
    x32 = np.asarray(x, np.float32)
    params = {"mu": jnp.asarray(x32.mean(axis=0))}
    out = single_model_indicator(uniform(step=h), GAUSS, params, jnp.asarray(x32), jnp.asarray(y, np.float32), z=z)
    z64 = x32.astype(np.float64)
    theta0 = np.round(z64.mean(axis=0) / h) * h
    np.testing.assert_array_equal(np.asarray(out.release["mu"], np.float64), theta0)
    competitors = [theta0 + s * h * np.eye(2)[j] for j in range(2) for s in (-1.0, 1.0)]
    D = np.stack([0.5 * (np.sum((t - z64) ** 2, 1) - np.sum((theta0 - z64) ** 2, 1)) for t in competitors])
    delta, sigma = D.mean(axis=1), D.std(axis=1)

    def rate(gap):
        return np.min(np.maximum(gap, 0.0) ** 2 / (2 * sigma**2))

    half = z * sigma / np.sqrt(n)
    # float32 data: each D_k(Z_i) carries a relative rounding error of a few eps32 (6e-8) and its mean and spread
    # accumulate at most n of them (n eps32 = 7e-6); a rate, a ratio of squares, doubles that: rtol 1e-4 holds it
    # with room, and a wrong formula (1/(n-1) for 1/n already moves sigma by 0.4%, a missing 1/2 by 100%) fails it.
    rtol = 1e-4
    # the separable quadratic case: a start one cell over descends back to theta_0 and the descent from the
    # round-to-nearest start moves nothing, so the comparisons are the four competitors (theory.md section 3);
    # the single-model indicator counts each crossing too (its own margin, conservative), here the same event:
    # margin / spread = delta / sigma, so r and its interval are the competitors'
    valid = np.asarray(out.valid)
    kinds = np.asarray([EVENT_KINDS[k] for k in np.asarray(out.kind)])
    assert bool(out.ok) and bool(out.settled) and int(np.sum(valid & (kinds == "release"))) == 4
    assert set(kinds[valid]) <= {"release", "start_return", "start_unresolved"}
    got = [(d, s) for d, s, k in zip(np.asarray(out.delta, np.float64)[valid], np.asarray(out.sigma, np.float64)[valid],
                                     kinds[valid]) if k == "release"]  # fmt: skip
    got = sorted(got)
    np.testing.assert_allclose(np.asarray(got), np.asarray(sorted(zip(delta, sigma))), rtol=rtol)
    assert float(out.r_hat) == pytest.approx(rate(delta), rel=rtol)
    np.testing.assert_allclose(
        np.asarray(out.r_interval, np.float64), [rate(delta - half), rate(delta + half)], rtol=rtol
    )
    # the closest competitor's shifted gap is negative here, so the lower end checks the clipping to 0 of section 4
    assert rate(delta - half) == 0.0 < rate(delta) < rate(delta + half)
    cr = single_model_indicator(uniform(step=h), GAUSS, params, jnp.asarray(x32), jnp.asarray(y, np.float32), z=z,
                                method="cramer")  # fmt: skip
    assert float(cr.r_interval[0]) <= float(cr.r_hat) <= float(cr.r_interval[1])


@pytest.mark.slow
def test_r_is_zero_for_continuous_stochastic_and_ties():
    x, y = GAUSS.sample(jax.random.key(4), 120)
    params = {"mu": jnp.mean(x, axis=0)}
    theta_star = GAUSS.population(jax.random.key(0))
    for q, ptq in ((identity(), "loss"), (prune(sparsity=0.5), "rtn")):
        single = single_model_indicator(q, GAUSS, params, x, y, ptq=ptq)
        assert float(single.r_hat) == 0.0 and np.asarray(single.r_interval).tolist() == [0.0, 0.0]
        assert not bool(jnp.any(single.valid))
    for q, ptq in ((identity(), "rtn"), (prune(sparsity=0.5), "loss")):
        pop = population_indicator(q, GAUSS, theta_star, x, y, n=100, ptq=ptq)
        assert float(pop.r) == 0.0 and np.isnan(float(pop.mis_asymptotic)) and not bool(pop.applicable)
    # stochastic rounding: no exponential security for the RTN release; the loss-PTQ release is a local minimiser
    q = uniform(step=0.5, rounding="stochastic")
    key = jax.random.key(9)
    assert float(single_model_indicator(q, GAUSS, params, x, y, ptq="rtn", key=key).r_hat) == 0.0
    assert float(single_model_indicator(q, GAUSS, params, x, y, ptq="loss", key=key).r_hat) > 0.0
    # a coordinate exactly on a threshold: sample mean 0.5 with step 1 (ties: delta_k = 0, margin 0)
    problem = gaussian_mean(mu=[0.5])
    xt = jnp.array([[0.25], [0.75], [0.25], [0.75]])
    yt = jnp.zeros(4)
    tie = {"mu": jnp.array([0.5])}
    for ptq in ("loss", "rtn"):
        out = single_model_indicator(uniform(step=1.0), problem, tie, xt, yt, ptq=ptq)
        assert float(out.r_hat) == 0.0, ptq


def _logistic_fit(seed):
    """Logistic-model data drawn with NumPy (x ~ N(0, I_4)) and the MLE by Newton's method."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, 4))
    yn = (rng.random(400) < 1 / (1 + np.exp(-(0.3 + x @ np.array([1.0, -0.7, 0.5, 0.2]))))).astype(np.float64)
    design = np.column_stack([np.ones(len(yn)), x])
    beta = np.zeros(5)
    for _ in range(30):
        p = 1 / (1 + np.exp(-design @ beta))
        beta -= np.linalg.solve((design * (p * (1 - p))[:, None]).T @ design, design.T @ (p - yn))
    return {"b": jnp.asarray(beta[:1]), "w": jnp.asarray(beta[1:, None])}, jnp.asarray(x), jnp.asarray(yn)


@pytest.mark.slow
def test_logistic_single_audits():
    params, x, y = _logistic_fit(6)
    results = {}
    grid = uniform(step=0.1)
    for q, ptq, method in [
        (grid, "loss", "gaussian"),
        (grid, "loss", "cramer"),
        (ternary(scale_format="e8m0"), "rtn", "gaussian"),
        (ternary(scale_format="e8m0"), "rtn", "cramer"),
    ]:
        out = single_model_indicator(q, LOGISTIC, params, x, y, ptq=ptq, method=method)
        assert bool(out.ok), (q.name, ptq, method)
        # RTN: 2p element thresholds, then two scale events per leaf for the E8M0 absmean scale (section 9); loss
        # PTQ: the release's 2p competitors come first, then the path's other comparisons and the starts
        kinds = np.asarray([EVENT_KINDS[k] for k in np.asarray(out.kind)])
        assert 0.0 < float(out.r_hat) < np.log(400)
        if ptq == "rtn":
            assert out.valid.shape == (14,) and set(kinds[:10]) == {"threshold"} and set(kinds[10:]) == {"scale"}
        else:
            assert set(kinds[:10]) == {"release"} and "release" not in set(kinds[10:])
        results[ptq, method] = float(out.r_hat)
    # Gaussian and Cramer rates agree to leading order for the same events
    assert results["loss", "cramer"] == pytest.approx(results["loss", "gaussian"], rel=0.5)
    assert results["rtn", "cramer"] == pytest.approx(results["rtn", "gaussian"], rel=0.5)
    # Taylor loss differences: delta right to second order in the step, sigma to first order
    exact = single_model_indicator(grid, LOGISTIC, params, x, y)
    taylor = single_model_indicator(grid, LOGISTIC, params, x, y, differences="taylor")
    # (the release's competitors: the path's other comparisons are replayed exactly either way)
    np.testing.assert_allclose(np.asarray(taylor.delta)[:10], np.asarray(exact.delta)[:10], rtol=0.05, atol=1e-4)
    np.testing.assert_allclose(np.asarray(taylor.sigma)[:10], np.asarray(exact.sigma)[:10], rtol=0.15)


@pytest.mark.slow
def test_population_audit_fields_and_validation():
    params, x, y = _logistic_fit(7)
    # a float32 absmax scale is published: the release is continuous (theory.md section 9), r = 0, the codes'
    # own rate kept apart
    f32 = population_indicator(uniform(bits=4), LOGISTIC, params, x, y, n=200, method="cramer")
    assert f32.continuous and float(f32.r) == 0.0 and float(f32.r_codes) > 0 and np.isnan(float(f32.mis_asymptotic))
    q = uniform(bits=4, scale_format="e8m0")
    pop = population_indicator(q, LOGISTIC, params, x, y, n=200, method="cramer")
    assert isinstance(pop, PopulationAudit) and pop.ptq == "loss" and pop.method == "cramer" and pop.n == 200
    assert not pop.continuous and float(pop.r) == float(pop.r_codes)
    # at most 2p = 10 element competitors, then per coordinate a rising and (argmax only) a falling scale event;
    # the report keeps the events that exist, counted by kind
    assert pop.codes["w"].dtype == jnp.int32 and pop.p.shape == pop.f.shape == (sum(pop.events.values()),)
    assert 0 < pop.events["release"] <= 10 and 0 < pop.events["scale"] <= 10
    # the flip prediction is a probability; the union bound sum_k p_k is reported apart, clipped at 1
    assert 0.0 <= float(pop.flip_rate_predicted) <= float(pop.flip_union_bound) + 1e-6
    assert float(pop.flip_union_bound) == pytest.approx(min(1.0, float(jnp.sum(pop.p))))
    assert 0.0 <= float(pop.mis_asymptotic) <= 1.0
    with pytest.raises(ValueError, match=r"\('loss', 'rtn'\)"):
        single_model_indicator(q, LOGISTIC, params, x, y, ptq="gptq")
    with pytest.raises(ValueError, match=r"\('gaussian', 'cramer'\)"):
        population_indicator(q, LOGISTIC, params, x, y, n=10, method="exact")
    with pytest.raises(ValueError, match="differences"):
        single_model_indicator(q, LOGISTIC, params, x, y, differences="pade")
    with pytest.raises(ValueError, match="n must"):
        population_indicator(q, LOGISTIC, params, x, y, n=0)
    # singular Hessian at theta_star: a feature equal to the intercept column
    xs = x.at[:, 0].set(1.0)
    with pytest.raises(ValueError, match="singular"):
        population_indicator(q, LOGISTIC, params, xs, y, n=10, ptq="rtn")
    single = single_model_indicator(q, LOGISTIC, params, xs, y, ptq="rtn")
    assert not bool(single.ok)
