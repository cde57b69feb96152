"""Sandwich covariance (theory.md section 2): statsmodels HC0, closed forms, batching, singular Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import statsmodels.api as sm

from qmis_jax.indicator.sandwich import (
    hessian_diag,
    per_sample_grads,
    sandwich_covariance,
    sandwich_covariance_batched,
    sandwich_covariance_flagged,
    sandwich_diagonal,
)
from qmis_jax.problems import gaussian_mean, logistic_mixture

pytestmark = pytest.mark.usefixtures("x64")


PROBLEM = logistic_mixture(dim=4, k_modes=2, separation=1.5, scale=1.0)


def _logistic_data(n=200, seed=0):
    """Logistic-model data drawn with NumPy (fast): x ~ N(0, I_4), y ~ Bernoulli(sigmoid(0.2 + x @ beta))."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    eta = 0.2 + x @ np.array([0.8, -0.5, 0.3, 0.0])
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(np.float64)
    return PROBLEM, x, y


def _params(beta):
    # ravel_pytree order of {"b": (1,), "w": (dim, 1)} is b first, then w
    return {"b": jnp.asarray(beta[:1]), "w": jnp.asarray(beta[1:])[:, None]}


def test_matches_statsmodels_hc0_times_n():
    problem, x, y = _logistic_data(seed=11)
    design = sm.add_constant(x, prepend=True)
    fit = sm.Logit(y, design).fit(disp=0, cov_type="HC0", tol=1e-12, maxiter=200)
    ref = np.asarray(fit.cov_params()) * len(y)
    params = _params(np.asarray(fit.params))
    cov = np.asarray(sandwich_covariance(problem.loss, params, jnp.asarray(x), jnp.asarray(y)))
    assert cov.dtype == np.float64 and cov.shape == (5, 5)
    np.testing.assert_allclose(cov, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())


def test_gaussian_mean_closed_form():
    # l = 0.5 |theta - z|^2: H = I, V = mean (theta - z)(theta - z)^T, so Sigma_hat = the biased sample covariance
    problem = gaussian_mean(mu=[0.3, -1.0, 2.0])
    x, y = problem.sample(jax.random.key(1), 50)
    params = {"mu": jnp.mean(x, axis=0)}
    cov = sandwich_covariance(problem.loss, params, x, y)
    np.testing.assert_allclose(np.asarray(cov), np.cov(np.asarray(x).T, bias=True), rtol=1e-10, atol=1e-12)


def test_weights_select_members():
    problem, x, y = _logistic_data(n=400)
    member = np.zeros(400)
    member[::2] = 1.0
    params = _params(np.array([0.1, 0.5, -0.3, 0.2, 0.05]))
    pooled = sandwich_covariance(problem.loss, params, jnp.asarray(x), jnp.asarray(y), weights=jnp.asarray(member))
    subset = sandwich_covariance(problem.loss, params, jnp.asarray(x[::2]), jnp.asarray(y[::2]))
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(subset), rtol=1e-10)


def test_batched_matches_single_and_flags_singular():
    problem, x, y = _logistic_data(n=400)
    rng = np.random.default_rng(3)
    betas = rng.normal(scale=0.3, size=(3, 5))
    params = {"b": jnp.asarray(betas[:, :1]), "w": jnp.asarray(betas[:, 1:, None])}
    weights = jnp.asarray((rng.random((3, 400)) < 0.6).astype(np.float64))
    cov, ok = sandwich_covariance_batched(problem.loss, params, jnp.asarray(x), jnp.asarray(y), weights=weights)
    assert cov.shape == (3, 5, 5) and bool(jnp.all(ok))
    for i in range(3):
        single = sandwich_covariance(
            problem.loss, _params(betas[i]), jnp.asarray(x), jnp.asarray(y), weights=weights[i]
        )
        np.testing.assert_allclose(np.asarray(cov[i]), np.asarray(single), rtol=1e-9)
    # per-replicate data sets; replicate 1 has a constant feature copy of the intercept -> singular H
    xs = np.stack([x[:200], x[200:]]).copy()
    xs[1, :, 0] = 1.0
    two = {"b": params["b"][:2], "w": params["w"][:2]}
    ys = jnp.asarray(np.stack([y[:200], y[200:]]))
    cov2, ok2 = sandwich_covariance_batched(problem.loss, two, jnp.asarray(xs), ys)
    assert ok2.tolist() == [True, False]
    single0 = sandwich_covariance(problem.loss, _params(betas[0]), jnp.asarray(xs[0]), ys[0])
    np.testing.assert_allclose(np.asarray(cov2[0]), np.asarray(single0), rtol=1e-9)


def test_singular_raises_unless_pinv():
    problem, x, y = _logistic_data(n=200)
    x = x.copy()
    x[:, 0] = 1.0  # duplicates the intercept column: H is singular
    params = _params(np.array([0.1, 0.2, -0.3, 0.2, 0.1]))
    with pytest.raises(ValueError, match="singular"):
        sandwich_covariance(problem.loss, params, jnp.asarray(x), jnp.asarray(y))
    cov = np.asarray(sandwich_covariance(problem.loss, params, jnp.asarray(x), jnp.asarray(y), pinv=True))
    # reference: pseudo-inverse sandwich with NumPy
    design = np.column_stack([np.ones(len(y)), x])
    eta = design @ np.array([0.1, 0.2, -0.3, 0.2, 0.1])
    prob = 1.0 / (1.0 + np.exp(-eta))
    hess = (design * (prob * (1 - prob))[:, None]).T @ design / len(y)
    g = design * (prob - y)[:, None]
    v = g.T @ g / len(y)
    hp = np.linalg.pinv(hess, hermitian=True)
    np.testing.assert_allclose(cov, hp @ v @ hp, rtol=1e-7, atol=1e-10)
    _, ok = sandwich_covariance_flagged(problem.loss, params, jnp.asarray(x), jnp.asarray(y))
    assert not bool(ok)
    # non-finite Hessian
    bad = _params(np.array([np.nan, 0.2, -0.3, 0.2, 0.1]))
    with pytest.raises(ValueError, match="non-finite"):
        sandwich_covariance(problem.loss, bad, jnp.asarray(x), jnp.asarray(y))


def test_validation():
    problem = gaussian_mean(mu=[0.0] * 6)
    x, y = problem.sample(jax.random.key(0), 5)
    with pytest.raises(ValueError, match="p = 6"):
        sandwich_covariance(problem.loss, {"mu": jnp.zeros(6)}, x, y)
    with pytest.raises(ValueError, match="same number of rows"):
        sandwich_covariance(problem.loss, {"mu": jnp.zeros(6)}, x, y[:3])
    with pytest.raises(ValueError, match="weights"):
        sandwich_covariance(problem.loss, {"mu": jnp.zeros(6)}, x, y, weights=jnp.ones(4))
    with pytest.raises(ValueError, match="method"):
        hessian_diag(problem.loss, {"mu": jnp.zeros(6)}, x, y, method="bogus")
    with pytest.raises(ValueError, match="key"):
        hessian_diag(problem.loss, {"mu": jnp.zeros(6)}, x, y, method="hutchinson")


def test_traced_call_does_not_raise_and_agrees():
    problem = gaussian_mean(mu=[0.5, 0.0])
    x, y = problem.sample(jax.random.key(2), 40)
    params = {"mu": jnp.mean(x, axis=0)}
    eager = sandwich_covariance(problem.loss, params, x, y)
    jitted = jax.jit(lambda p: sandwich_covariance(problem.loss, p, x, y))(params)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5)


def test_hessian_diag_and_sandwich_diagonal():
    problem, x, y = _logistic_data(n=200)
    params = _params(np.array([0.2, 0.4, -0.6, 0.1, 0.3]))
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    theta = np.array([0.2, 0.4, -0.6, 0.1, 0.3])
    full = jax.jit(jax.hessian(lambda th: jnp.mean(problem.batch_loss(_params(th), xj, yj))))(jnp.asarray(theta))
    diag = hessian_diag(problem.loss, params, xj, yj, chunk_size=2)
    np.testing.assert_allclose(np.asarray(diag), np.diag(np.asarray(full)), rtol=1e-10)
    # Hutchinson: unbiased, per-coordinate variance sum_{i != j} H_ij^2 / S; check within 4 standard errors
    s = 1000
    hut = hessian_diag(problem.loss, params, xj, yj, method="hutchinson", key=jax.random.key(7), num_probes=s)
    off = np.asarray(full) - np.diag(np.diag(np.asarray(full)))
    se = np.sqrt(np.sum(off**2, axis=1) / s)
    assert np.all(np.abs(np.asarray(hut) - np.diag(np.asarray(full))) < 4 * se)
    # diagonal sandwich: V_jj / H_jj^2 with per-sample gradients
    g = np.asarray(per_sample_grads(problem.loss, params, xj, yj))
    approx = sandwich_diagonal(problem.loss, params, xj, yj, chunk_size=64)
    np.testing.assert_allclose(np.asarray(approx), np.mean(g**2, axis=0) / np.diag(np.asarray(full)) ** 2, rtol=1e-9)


def test_sandwich_diagonal_exact_for_separable_loss():
    problem = gaussian_mean(mu=[0.3, -0.2, 1.0, 0.0])
    x, y = problem.sample(jax.random.key(4), 64)
    params = {"mu": jnp.mean(x, axis=0)}
    full = sandwich_covariance(problem.loss, params, x, y)
    diag = sandwich_diagonal(problem.loss, params, x, y, chunk_size=10)
    hut = hessian_diag(problem.loss, params, x, y, method="hutchinson", key=jax.random.key(0), num_probes=3)
    np.testing.assert_allclose(np.asarray(diag), np.diag(np.asarray(full)), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(hut), np.ones(4), rtol=1e-12)  # H = I is diagonal: Hutchinson exact
