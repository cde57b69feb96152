"""The population estimates of theory.md section 6 are stable: theta* from one large fresh fit, the loss-PTQ release
chosen on one fresh sample and its gaps estimated on another."""

import math

import jax
import pytest
from scipy.stats import norm

import qmis_jax as qj

pytestmark = pytest.mark.slow


def test_r_population_from_the_default_large_fit_matches_a_fit_ten_times_larger():
    # a small ridge: no closed form for theta*, so the audit fits it on star_size fresh points
    problem = qj.problems.logistic_mixture(dim=2, k_modes=1, separation=1.0, scale=0.0, l2=1e-3)
    quantizers = {"grid": qj.quantizers.uniform(step=0.7)}
    settings = dict(n=200, replicates=8, attacks=(), population_size=400_000, test_size=200)
    default = qj.audit(jax.random.key(5), problem, quantizers, **settings)  # star_size = 100 n = 20 000
    larger = qj.audit(jax.random.key(5), problem, quantizers, star_size=200_000, **settings)
    assert default.data["theta_star"] == "fit on 20000 fresh points"
    r, r_large = default["grid"]["r_population"], larger["grid"]["r_population"]
    assert r > 0 and r == pytest.approx(r_large, rel=0.05)


def test_predicted_flip_of_the_one_d_grid_at_n_300_is_within_15_percent_of_the_exact_one():
    """Z ~ N(0.3, 1), squared loss, fixed step 1: the release flips when the sample mean leaves (-0.5, 0.5), with
    probability Phi(-sqrt(n) 0.2) + Phi(-sqrt(n) 0.8) (theory.md section 5); the standard error of sqrt(n) c_hat is
    about sqrt(n / population_size) = 0.012 here, 4% of the prediction."""
    n = 300
    report = qj.audit(
        jax.random.key(6),
        qj.problems.gaussian_mean(mu=[0.3]),
        {"grid": qj.quantizers.uniform(step=1.0)},
        n=n,
        replicates=8,
        attacks=(),
        population_size=2_000_000,
    )
    exact = norm.cdf(-math.sqrt(n) * 0.2) + norm.cdf(-math.sqrt(n) * 0.8)
    assert report["grid"]["flip_rate_predicted"] == pytest.approx(exact, rel=0.15)
    assert report["grid"]["asymptotic_regime"]  # sqrt(n) c = 3.5
