"""Tests of the predicted flip probability (theory.md section 5): P(any competitor event) under the joint Gaussian of
the competitors' mean loss differences, against SciPy's multivariate normal CDF, and the new MisApprox fields."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from qmis_jax.indicator import asymptotic_regime
from qmis_jax.indicator.mis import mis_asymptotic, union_probability


def _correlated_rows(seed, k, m):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) + 2.0 * np.eye(k)
    mix[1] = -mix[0] + 0.1 * rng.normal(size=k)  # a nearly exclusive pair (one coordinate down and up)
    mix[3] = mix[2] + 0.05 * rng.normal(size=k)  # a nearly identical pair (correlated features)
    return mix @ rng.normal(size=(k, m))


@pytest.mark.parametrize("seed", [0, 1])
def test_union_probability_matches_scipy_mvn(seed):
    k, m, samples = 6, 4000, 16384
    D = _correlated_rows(seed, k, m)
    rho = np.corrcoef(D)
    p = np.random.default_rng(10 + seed).uniform(0.002, 0.15, k)
    t = sps.norm.ppf(p)
    # P(any Y_k < t_k) = 1 - P(Y >= t) = 1 - P(-Y <= -t), -Y ~ N(0, rho)
    exact = 1.0 - sps.multivariate_normal(mean=np.zeros(k), cov=rho, allow_singular=True).cdf(-t)
    est = float(
        union_probability(jax.random.key(seed), jnp.asarray(p), jnp.ones(k, bool), D=jnp.asarray(D), samples=samples)
    )
    # 1/N lies in [1/k, 1]: relative SE <= sqrt(1 / samples) / (1/k)... use the sample-free bound 0.5 / sqrt(samples)
    # on the SD of 1/N over its mean >= max p / sum p
    rel_se = 0.5 / math.sqrt(samples) * p.sum() / exact
    assert est == pytest.approx(exact, rel=4 * rel_se + 2e-3)
    assert p.max() - 1e-6 <= est <= min(1.0, p.sum()) + 1e-6


def test_union_probability_limits_top_and_validation():
    k = 5
    p = jnp.array([0.05, 0.02, 0.01, 0.0, 0.3])
    valid = jnp.array([True, True, True, True, False])
    # independent events (no D): 1 - prod(1 - p) over valid ones
    ind = float(union_probability(jax.random.key(1), p, valid, samples=20000))
    ref = 1 - (1 - 0.05) * (1 - 0.02) * (1 - 0.01)
    assert ind == pytest.approx(ref, rel=4 * 0.5 / math.sqrt(20000) * 0.08 / ref + 1e-3)
    # only the top competitors are correlated, the rest enter by the union bound: top=1 gives the union bound
    assert float(union_probability(None, p, valid, top=1)) == pytest.approx(0.08, rel=1e-6)
    assert float(union_probability(None, jnp.zeros(3), jnp.ones(3, bool))) == 0.0
    assert float(union_probability(None, jnp.array([1.0, 0.2]), jnp.ones(2, bool))) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="valid"):
        union_probability(None, p, valid[:2])
    with pytest.raises(ValueError, match="D must"):
        union_probability(None, p, valid, D=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="samples"):
        union_probability(None, p, valid, samples=0)
    assert k == p.shape[0]


def test_mis_asymptotic_flip_fields():
    n = 400
    delta = jnp.array([0.1, 0.12, 0.5])
    sigma = jnp.array([1.0, 1.0, 1.0])
    valid = jnp.array([True, True, True])
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 3000))
    D = jnp.asarray(np.concatenate([base, base + 0.01 * rng.normal(size=(1, 3000)), rng.normal(size=(1, 3000))]))
    out = mis_asymptotic(n, delta, sigma, valid, D=D)
    p = sps.norm.cdf(-math.sqrt(n) * np.array([0.1, 0.12, 0.5]))
    np.testing.assert_allclose(out.p, p, rtol=1e-4)
    assert float(out.flip_union_bound) == pytest.approx(min(1.0, p.sum()), rel=1e-5)
    # the first two are nearly the same event: P(any) is about P(first), not the sum
    assert float(out.flip_probability) == pytest.approx(p[0] + p[2], rel=0.05)
    assert float(out.sqrt_n_c_min) == pytest.approx(2.0, rel=1e-6)
    assert asymptotic_regime(float(out.sqrt_n_c_min))
    big = mis_asymptotic(4, delta, sigma, valid)  # a union bound above 1 is clipped, the probability too
    assert float(big.flip_union_bound) <= 1.0 and 0.0 <= float(big.flip_probability) <= 1.0
    cont = mis_asymptotic(n, delta, sigma, valid, continuous=True)
    assert float(cont.flip_probability) == 1.0 and float(cont.flip_union_bound) == 1.0
    assert math.isnan(float(cont.sqrt_n_c_min)) and not asymptotic_regime(float(cont.sqrt_n_c_min))
    cr = mis_asymptotic(n, delta, sigma, valid, method="cramer", D=D + delta[:, None])
    assert 0.0 <= float(cr.flip_probability) <= float(cr.flip_union_bound) + 1e-6


@pytest.mark.slow
def test_logistic_flip_rate_matches_the_joint_gaussian_prediction():
    """Multi-parameter logistic regression on a fixed grid (5 parameters, 10 correlated competitors per PTQ): the
    Monte Carlo flip rate over fresh replicates against the predicted P(any competitor event), within 4 SE.

    Loss PTQ: population release chosen on one fresh sample, gaps and correlations estimated on another of 100 n
    points (theory.md section 6). RTN: margins at the replicate mean (the centre of theta_hat at this n, which
    carries the O(1/n) bias of the logistic MLE), sandwich and correlations on the same 100 n points."""
    from jax.flatten_util import ravel_pytree

    import qmis_jax as qj
    from qmis_jax import indicator, train

    dim, step, n, reps = 4, 0.5, 3000, 1000
    prob = qj.problems.logistic_mixture(dim=dim, seed=0)
    q = qj.quantizers.uniform(step=step)
    key = jax.random.key(1)
    xa, ya = prob.sample(jax.random.fold_in(key, 1), 200_000)
    xb, yb = prob.sample(jax.random.fold_in(key, 2), 100 * n)
    fit = train.fit_data(jax.random.fold_in(key, 3), prob, xa[None], ya[None])
    theta_star = jax.tree.map(lambda a: a[0], fit.params)
    k_rep = jax.random.fold_in(key, 4)
    res = train.fit_fresh(k_rep, prob, n=n, replicates=reps)
    x, y = train.replicate_data(k_rep, prob, n=n, index=np.arange(reps))

    def flat(tree):
        return np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(tree))

    for ptq in ("loss", "rtn"):
        if ptq == "loss":
            release = indicator.population_indicator(q, prob, theta_star, xa, ya, n=n, ptq="loss").release
            moves = indicator.competitors(q, release, theta_star)
            D = indicator.loss_differences(prob.loss, release, moves, xb, yb)
            delta, sigma = indicator.gap_stats(D, moves.valid)
            valid = moves.valid
        else:
            centre = jax.tree.map(lambda a: jnp.mean(a, axis=0), res.params)
            pop = indicator.population_indicator(q, prob, centre, xb, yb, n=n, ptq="rtn")
            release, delta, sigma, valid = pop.release, pop.delta, pop.sigma, pop.valid
            D, _ = indicator.rtn_differences(q, prob.loss, centre, xb, yb)
        predicted = mis_asymptotic(n, delta, sigma, valid, D=D)
        single = indicator.single_model_indicator_batched(q, prob, res.params, x, y, ptq=ptq)
        flips = np.any(flat(single.release) != np.asarray(ravel_pytree(release)[0])[None], axis=1)
        rate = flips.mean()
        se = math.sqrt(max(rate * (1 - rate), 1.0 / reps) / reps)
        assert int(np.sum(np.asarray(valid))) >= 8
        assert abs(rate - float(predicted.flip_probability)) < 4 * se, (
            ptq,
            rate,
            se,
            float(predicted.flip_probability),
        )
        assert float(predicted.flip_probability) <= float(predicted.flip_union_bound) + 1e-6
