"""Rates, indicator and asymptotic MIS (theory.md sections 4, 5 and 8)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special
from scipy import stats as sps

from qmis_jax.indicator.mis import MisApprox, mis_asymptotic
from qmis_jax.indicator.rates import cramer_rate, gaussian_rate, indicator

pytestmark = pytest.mark.usefixtures("x64")


def _chernoff_reference(d, w=None):
    """``-min_{t >= 0} log sum w exp(-t d)`` by bounded scalar minimisation (SciPy), with ``t*`` and ``tau``."""
    d = np.asarray(d, np.float64)
    w = np.full(d.shape, 1.0 / d.size) if w is None else np.asarray(w, np.float64) / np.sum(w)

    def psi(t):
        return special.logsumexp(-t * d, b=w)

    hi = 1.0
    while np.sum(w * d * np.exp(-hi * d - psi(hi))) > 0:
        hi *= 2.0
    res = optimize.minimize_scalar(psi, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-13})
    t = res.x
    pi = w * np.exp(-t * d - psi(t))
    mean = np.sum(pi * d)
    return -res.fun, t, math.sqrt(np.sum(pi * (d - mean) ** 2))


def test_gaussian_rate_closed_form_and_edges():
    delta = jnp.array([0.2, 0.5, -0.1, 0.0, 0.3, jnp.nan])
    sigma = jnp.array([1.0, 2.0, 1.0, 1.0, 0.0, 1.0])
    out = np.asarray(gaussian_rate(delta, sigma))
    np.testing.assert_allclose(out[:5], [0.02, 0.03125, 0.0, 0.0, np.inf])
    assert np.isnan(out[5])


def test_cramer_matches_brute_force():
    rng = np.random.default_rng(0)
    m = 400
    rows = np.stack(
        [
            rng.exponential(1.0, m) - 0.7,  # skewed, mean 0.3
            np.where(rng.random(m) < 0.3, -1.0, 2.0),  # two-point law
            rng.lognormal(0.0, 1.0, m) - 1.2,  # heavy right tail
            rng.normal(0.05, 0.2, m),  # nearly zero mean
        ]
    )
    out = cramer_rate(jnp.asarray(rows), jnp.ones(4, bool))
    for k in range(4):
        rate, t, tau = _chernoff_reference(rows[k])
        assert float(out.rate[k]) == pytest.approx(rate, rel=1e-9)
        assert float(out.t_star[k]) == pytest.approx(t, rel=1e-5)
        assert float(out.tau[k]) == pytest.approx(tau, rel=1e-5)
        # the tilted mean vanishes at t*
        a = -float(out.t_star[k]) * rows[k]
        pi = np.exp(a - special.logsumexp(a))
        assert abs(np.sum(pi * rows[k])) < 1e-9 * np.max(np.abs(rows[k]))
    assert not bool(jnp.any(out.capped))


def test_cramer_weights_match_reference_and_duplication():
    rng = np.random.default_rng(1)
    rows = np.stack([rng.normal(0.3, 1.0, 400), rng.exponential(1.0, 400) - 0.8, rng.normal(0.1, 0.5, 400)])
    counts = rng.integers(0, 4, (400,)).astype(np.float64)
    out = cramer_rate(jnp.asarray(rows), jnp.ones(3, bool), weights=jnp.asarray(counts))
    for k in range(3):
        rate, t, tau = _chernoff_reference(rows[k], counts)
        assert float(out.rate[k]) == pytest.approx(rate, rel=1e-9)
        assert float(out.t_star[k]) == pytest.approx(t, rel=1e-5)
        assert float(out.tau[k]) == pytest.approx(tau, rel=1e-5)
        # integer weights are repeated examples
        assert _chernoff_reference(np.repeat(rows[k], counts.astype(int)))[0] == pytest.approx(rate, rel=1e-9)


def test_cramer_of_gaussian_sample_is_gaussian_rate():
    # m draws of N(delta, sigma^2): the empirical Chernoff rate estimates delta^2 / (2 sigma^2) with standard
    # error ~ sd(exp(-t* D)) / (E exp(-t* D) sqrt(m)) = sqrt(exp(t*^2 sigma^2) - 1) / sqrt(m) (envelope theorem)
    m = 100_000
    delta = np.array([0.1, 0.2, 0.4, 0.5])
    sigma = np.array([1.0, 1.0, 2.0, 0.5])
    z = jax.random.normal(jax.random.key(3), (4, m), jnp.float64)
    D = jnp.asarray(delta)[:, None] + jnp.asarray(sigma)[:, None] * z
    out = cramer_rate(D, jnp.ones(4, bool))
    t = delta / sigma**2
    se = np.sqrt(np.expm1(t**2 * sigma**2) / m)
    rate = delta**2 / (2 * sigma**2)
    assert np.all(np.abs(np.asarray(out.rate) - rate) < 4 * se)
    np.testing.assert_allclose(np.asarray(out.t_star), t, rtol=0.1)
    np.testing.assert_allclose(np.asarray(out.tau), sigma, rtol=0.02)


def test_cramer_cap_edges_and_invalid():
    m = 10
    rows = np.array(
        [
            np.linspace(0.1, 1.0, m),  # no sample <= 0: unbounded, capped at log m
            np.r_[0.0, 0.0, np.linspace(0.1, 1.0, m - 2)],  # two zeros: rate -log(2/10) < log m
            np.linspace(-1.0, 0.5, m),  # mean < 0: not rare
            np.linspace(-1.0, 2.0, m),  # invalid row
        ]
    )
    valid = jnp.array([True, True, True, False])
    out = cramer_rate(jnp.asarray(rows), valid)
    assert float(out.rate[0]) == pytest.approx(math.log(m))
    assert float(out.rate[1]) == pytest.approx(math.log(5.0))
    assert float(out.rate[2]) == 0.0 and float(out.t_star[2]) == 0.0
    assert out.capped.tolist() == [True, False, False, False]
    assert math.isinf(float(out.t_star[0])) and math.isinf(float(out.t_star[1]))
    assert np.isnan(float(out.rate[3])) and np.isnan(float(out.t_star[3]))
    small = cramer_rate(jnp.asarray(rows), valid, cap=0.5)
    assert small.capped.tolist() == [True, True, False, False]
    assert float(small.rate[1]) == 0.5
    with pytest.raises(ValueError, match="cap"):
        cramer_rate(jnp.asarray(rows), valid, cap=-1.0)
    with pytest.raises(ValueError, match="valid"):
        cramer_rate(jnp.asarray(rows), valid[:2])
    with pytest.raises(ValueError, match=r"\(K, m\)"):
        cramer_rate(jnp.asarray(rows[0]), valid)


def test_indicator_rules():
    rates = jnp.array([[0.02, 0.32, 0.01], [0.0, 0.5, 0.4], [0.3, 0.2, 0.1]])
    valid = jnp.array([[True, True, False], [True, True, True], [False, False, False]])
    r = np.asarray(indicator(rates, valid))
    np.testing.assert_allclose(r, [0.02, 0.0, np.inf])
    r = np.asarray(indicator(rates, valid, continuous=jnp.array([True, False, False])))
    np.testing.assert_allclose(r, [0.0, 0.0, np.inf])
    assert float(indicator(rates[0], valid[0], continuous=True)) == 0.0
    assert np.isnan(float(indicator(jnp.array([jnp.nan, 0.3]), jnp.array([True, True]))))
    with pytest.raises(ValueError, match="same shape"):
        indicator(rates, valid[0])


def test_mis_gaussian_closed_form():
    delta = np.array([0.2, 0.8, 0.5])
    sigma = np.array([1.0, 1.0, 0.7])
    valid = np.array([True, True, False])
    for n in (10, 100, 1000):
        out = mis_asymptotic(n, jnp.asarray(delta), jnp.asarray(sigma), jnp.asarray(valid))
        c = delta / sigma
        p = np.where(valid, sps.norm.cdf(-math.sqrt(n) * c), 0.0)
        f = np.where(valid, 4 * sps.norm.cdf(c / 2) - 2, 0.0)
        np.testing.assert_allclose(np.asarray(out.p), p, rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(np.asarray(out.f), f, rtol=1e-10)
        assert float(out.mis) == pytest.approx(1 - np.sum(p * f), rel=1e-12)
        assert bool(out.applicable) and out.method == "gaussian"


def test_mis_cramer_agrees_with_gaussian_for_gaussian_differences():
    m, n = 100_000, 100
    delta, sigma = np.array([0.2, 0.5]), np.array([1.0, 1.0])
    z = jax.random.normal(jax.random.key(5), (2, m), jnp.float64)
    D = jnp.asarray(delta)[:, None] + z
    out = mis_asymptotic(n, jnp.asarray(delta), jnp.asarray(sigma), jnp.ones(2, bool), method="cramer", D=D)
    c = delta / sigma
    x = math.sqrt(n) * c
    br = sps.norm.pdf(x) / x  # Bahadur-Rao with the exact Gaussian rate and tilt
    # relative error of exp(-n I_hat): n * se(I_hat), se from the envelope theorem (as above)
    rel = 4 * n * np.sqrt(np.expm1(c**2) / m)
    assert np.all(np.abs(np.asarray(out.p) / br - 1) < rel)
    # f: sampling error of mean |w - 1| at the exact tilt, plus the error of the estimated tilt t* ~ c_hat
    # propagated through df/dc = 2 phi(c / 2), with se(c_hat) = sqrt((1 + c^2 / 2) / m)
    f_true = 4 * sps.norm.cdf(c / 2) - 2
    w = np.exp(-c[:, None] * np.asarray(z) - c[:, None] ** 2 / 2)  # exact tilt of N(c, 1) at t = c
    se_f = np.hypot(np.std(np.abs(w - 1), axis=1), 2 * sps.norm.pdf(c / 2) * np.sqrt(1 + c**2 / 2)) / math.sqrt(m)
    assert np.all(np.abs(np.asarray(out.f) - f_true) < 4 * se_f)
    assert bool(out.applicable) and out.method == "cramer"


def test_mis_cramer_edge_without_negative_samples():
    m, n = 8, 5
    D = jnp.asarray(np.linspace(0.1, 1.0, m)[None])
    out = mis_asymptotic(n, jnp.array([0.55]), jnp.array([0.3]), jnp.array([True]), method="cramer", D=D)
    assert float(out.p[0]) == pytest.approx(math.exp(-n * math.log(m)))
    assert float(out.f[0]) == pytest.approx(2 * (1 - 1 / m))


def test_mis_not_applicable_and_invalid_ignored():
    delta, sigma = jnp.array([0.2, -0.1]), jnp.array([1.0, 1.0])
    out = mis_asymptotic(100, delta, sigma, jnp.array([True, True]))
    assert np.isnan(float(out.mis)) and not bool(out.applicable)
    out = mis_asymptotic(100, delta, sigma, jnp.array([True, False]))
    assert bool(out.applicable) and float(out.p[1]) == 0.0 and float(out.f[1]) == 0.0
    out = mis_asymptotic(100, delta, sigma, jnp.array([True, False]), continuous=True)
    assert np.isnan(float(out.mis)) and not bool(out.applicable)


def test_mis_jit_and_vmap():
    deltas = jnp.array([[0.2, 0.8], [0.3, 0.6], [0.1, 0.9]])
    sigma = jnp.ones(2)
    batched = jax.jit(jax.vmap(lambda d: mis_asymptotic(50, d, sigma, jnp.ones(2, bool))))(deltas)
    assert isinstance(batched, MisApprox) and batched.mis.shape == (3,) and batched.method == "gaussian"
    for i in range(3):
        single = mis_asymptotic(50, deltas[i], sigma, jnp.ones(2, bool))
        assert float(batched.mis[i]) == pytest.approx(float(single.mis), rel=1e-12)


def test_mis_validation():
    d, s, v = jnp.array([0.2]), jnp.array([1.0]), jnp.array([True])
    with pytest.raises(ValueError, match="gaussian"):
        mis_asymptotic(10, d, s, v, method="bogus")
    with pytest.raises(ValueError, match="D"):
        mis_asymptotic(10, d, s, v, method="cramer")
    with pytest.raises(ValueError, match="share one shape"):
        mis_asymptotic(10, d, jnp.ones(2), v)
