"""Exact Gaussian-mean oracles and the estimators against them (theory.md sections 5 and 7)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from qmis_jax.indicator.estimate import population_indicator
from qmis_jax.indicator.events import EVENT_KINDS
from qmis_jax.indicator.exact import (
    gaussian_mean_fp_delta,
    gaussian_mean_gaps,
    gaussian_mean_mis_approximation,
    gaussian_mean_quantized_delta,
)
from qmis_jax.indicator.mis import mis_asymptotic
from qmis_jax.problems import gaussian_mean
from qmis_jax.quantizers import uniform

pytestmark = pytest.mark.usefixtures("x64")


# theory.md section 5: Z ~ N(0.3, 1), squared loss, fixed step h = 1
RATIOS = {10: 0.54, 100: 0.84, 300: 0.93, 1000: 0.98}
SLOPES = {100: 0.054, 300: 0.033, 1000: 0.025}


def test_theory_reference_figures():
    for n, ratio in RATIOS.items():
        exact = gaussian_mean_quantized_delta(n, mu=0.3)
        approx = gaussian_mean_mis_approximation(n, mu=0.3)
        assert approx / exact == pytest.approx(ratio, abs=0.01), n
        if n in SLOPES:
            assert -math.log(exact) / n == pytest.approx(SLOPES[n], abs=0.002), n


def test_gaps_closed_form():
    delta, sd = gaussian_mean_gaps(mu=0.3)
    np.testing.assert_allclose(delta, [0.8, 0.2])
    np.testing.assert_allclose(sd, [1.0, 1.0])
    delta, sd = gaussian_mean_gaps(mu=1.2, sigma=2.0, step=0.5)  # release 1.0, moves to 0.5 and 1.5
    np.testing.assert_allclose(delta, [(0.125 + 0.1) / 4, (0.125 - 0.1) / 4])
    np.testing.assert_allclose(sd, [0.25, 0.25])


@pytest.mark.parametrize(("n", "mu", "sigma", "step"), [(10, 0.3, 1.0, 1.0), (6, 0.1, 2.0, 0.5)])
def test_quantized_delta_against_simulated_optimal_attack(n, mu, sigma, step):
    # Delta is the advantage of the likelihood-ratio attack "member iff P(R = r | z) > P(R = r)" (section 1).
    # Simulate the game with NumPy (releases from actual samples) and compare within 4 standard errors.
    rng = np.random.default_rng(123)
    reps = 200_000
    z1 = rng.normal(mu, sigma, reps)
    rest = rng.normal(mu * (n - 1), sigma * math.sqrt(n - 1), reps)  # sum of the other n - 1 points
    r = step * np.round((z1 + rest) / n / step)
    fresh = rng.normal(mu, sigma, reps)

    def p_cond(r, z):
        m1, s1 = (z + (n - 1) * mu) / n, sigma * math.sqrt(n - 1) / n
        return sps.norm.cdf((r + step / 2 - m1) / s1) - sps.norm.cdf((r - step / 2 - m1) / s1)

    s0 = sigma / math.sqrt(n)
    p_marg = sps.norm.cdf((r + step / 2 - mu) / s0) - sps.norm.cdf((r - step / 2 - mu) / s0)
    tpr = np.mean(p_cond(r, z1) > p_marg)
    fpr = np.mean(p_cond(r, fresh) > p_marg)
    se = math.sqrt((tpr * (1 - tpr) + fpr * (1 - fpr)) / reps)
    exact = gaussian_mean_quantized_delta(n, mu=mu, sigma=sigma, step=step)
    assert abs((tpr - fpr) - exact) < 4 * se


def test_full_precision_delta_reference_and_one_dimensional_quadrature():
    delta, se = gaussian_mean_fp_delta(jax.random.key(1), 50, 50, num_samples=400_000)
    assert delta == pytest.approx(0.38, abs=0.01) and se < 0.002
    # d = 1: TV(N(u/n, s1^2), N(0, s0^2)) in closed form (the densities cross at the two roots of a quadratic,
    # the narrower one is above in between), averaged over u ~ N(0, 1) by Gauss-Hermite quadrature
    n = 5
    s0, s1 = 1 / math.sqrt(n), math.sqrt(n - 1) / n

    def tv(u):
        m1 = u / n
        a = -0.5 / s1**2 + 0.5 / s0**2
        b = m1 / s1**2
        c = -0.5 * m1**2 / s1**2 + math.log(s0 / s1)
        lo, hi = np.sort(np.roots([a, b, c]).real)
        inside_1 = sps.norm.cdf(hi, m1, s1) - sps.norm.cdf(lo, m1, s1)
        inside_0 = sps.norm.cdf(hi, 0.0, s0) - sps.norm.cdf(lo, 0.0, s0)
        return inside_1 - inside_0

    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    ref = np.sum(weights * np.array([tv(u) for u in nodes])) / math.sqrt(2 * math.pi)
    mc, mc_se = gaussian_mean_fp_delta(jax.random.key(2), n, 1, num_samples=400_000)
    assert abs(mc - ref) < 4 * mc_se


def test_mis_asymptotic_over_exact_reproduces_theory_ratios():
    delta, sd = gaussian_mean_gaps(mu=0.3)
    for n, ratio in RATIOS.items():
        out = mis_asymptotic(n, jnp.asarray(delta), jnp.asarray(sd), jnp.ones(2, bool))
        approx = float(jnp.sum(out.p * out.f))
        assert approx / gaussian_mean_quantized_delta(n, mu=0.3) == pytest.approx(ratio, abs=0.01), n
        assert float(1 - out.mis) == pytest.approx(approx, rel=1e-4)


def test_exact_validation():
    with pytest.raises(ValueError, match="n"):
        gaussian_mean_quantized_delta(1, mu=0.0)
    with pytest.raises(ValueError, match="step"):
        gaussian_mean_quantized_delta(10, mu=0.0, step=0.0)
    with pytest.raises(ValueError, match="d"):
        gaussian_mean_fp_delta(jax.random.key(0), 10, 0)
    with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
        gaussian_mean_fp_delta(0, 10, 2)  # an int seed is refused: keys first, one kind


@pytest.mark.slow
def test_population_indicator_gaussian_mean_on_a_large_sample():
    # r = delta^2 / (2 sigma^2) = 0.02 at mu = 0.3, step 1. Plug-in on m points: se(r) ~ 0.202 / sqrt(m) (delta method
    # on (delta_hat, sigma_hat^2): (delta / sigma^2)^2 sigma^2 / m + (delta^2 / (2 sigma^4))^2 2 sigma^4 / m).
    m, n = 200_000, 100
    problem = gaussian_mean(mu=[0.3])
    x, y = problem.sample(jax.random.key(2024), m)
    theta_star = problem.population(jax.random.key(0))
    se = 0.202 / math.sqrt(m)
    q = uniform(step=1.0)
    gauss = population_indicator(q, problem, theta_star, x, y, n=n)
    assert abs(float(gauss.r) - 0.02) < 4 * se
    # the release's two competitors carry r; the crossing to 1 comes back to 0 and pairs with its trial of 2
    # (start_return, c = 1.2): an event too, far from the minimum
    kinds = [EVENT_KINDS[k] for k in np.asarray(gauss.kind)]
    assert kinds[:2] == ["release", "release"] and set(kinds[2:]) <= {"start_return"}
    assert bool(jnp.all(gauss.valid)) and gauss.codes["mu"].tolist() == [0]
    assert float(gauss.release["mu"][0]) == 0.0 and int(gauss.n_moves) == 0
    # Cramer: same sample, same estimand for Gaussian differences
    cramer = population_indicator(q, problem, theta_star, x, y, n=n, method="cramer")
    assert abs(float(cramer.r) - float(gauss.r)) < 4 * se
    assert abs(float(cramer.r) - 0.02) < 4 * se and not bool(jnp.any(cramer.capped))
    # RTN: the separable quadratic gives the same event, margin 0.5 - 0.3 with s = sd(z)
    rtn = population_indicator(q, problem, theta_star, x, y, n=n, ptq="rtn")
    assert abs(float(rtn.r) - 0.02) < 4 * se
    np.testing.assert_allclose(np.asarray(rtn.delta), [0.8, 0.2], rtol=1e-12)
    # asymptotic MIS and flip rate for n = 100: closed form within the propagated sampling error,
    # d log p / d c ~ n c, se(c_hat) = sqrt((1 + c^2 / 2) / m)
    c = 0.2
    rel = 4 * n * c * math.sqrt((1 + c**2 / 2) / m)
    approx = gaussian_mean_mis_approximation(n, mu=0.3)
    assert (1 - float(gauss.mis_asymptotic)) / approx == pytest.approx(1.0, abs=rel)
    flip = sps.norm.cdf(-math.sqrt(n) * 0.2) + sps.norm.cdf(-math.sqrt(n) * 0.8)  # P(R != 0) exactly
    assert float(gauss.flip_rate_predicted) / flip == pytest.approx(1.0, abs=rel)
    assert bool(gauss.applicable) and gauss.ptq == "loss" and gauss.method == "gaussian"
    # and the ratio to the exact Delta is theory's 0.84, up to the same error
    exact = gaussian_mean_quantized_delta(n, mu=0.3)
    assert (1 - float(gauss.mis_asymptotic)) / exact == pytest.approx(0.84, abs=0.01 + rel)
