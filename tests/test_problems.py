"""Tests of the built-in problems: data laws (moments within stated standard errors), losses against closed
forms and NumPy, GLM structure, closed-form solutions, the NNX MLP as a pure pytree, and custom problems."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from scipy.optimize import linprog
from sklearn.linear_model import LogisticRegression

from qmis_jax import train
from qmis_jax.indicator import sandwich_covariance
from qmis_jax.problems import (
    MLP,
    Problem,
    custom,
    gaussian_mean,
    linear_regression,
    logistic_mixture,
    mlp_mixture,
    utility,
)
from qmis_jax.problems._mixture import mixture_centres


def _sample(problem, key, n):
    return jax.jit(problem.sample, static_argnums=1)(key, n)


def test_gaussian_mean_law_loss_solve_population(x64):
    mu = np.array([0.3, -1.0])
    p = gaussian_mean(mu=mu, sigma=2.0)
    x, y = _sample(p, jax.random.key(0), 20000)
    assert x.shape == (20000, 2) and np.all(np.asarray(y) == 0)
    # Sample mean within 4 standard errors (sigma / sqrt(n) = 0.0141), variance within 4 SE (sigma^2 sqrt(2/n)).
    np.testing.assert_array_less(np.abs(np.asarray(x).mean(0) - mu), 4 * 2.0 / np.sqrt(20000))
    np.testing.assert_array_less(np.abs(np.asarray(x).var(0) - 4.0), 4 * 4.0 * np.sqrt(2 / 20000))
    theta = {"mu": jnp.array([1.0, 2.0])}
    z = jnp.array([0.0, -1.0])
    assert float(p.loss(theta, z, 0.0)) == pytest.approx(0.5 * (1.0 + 9.0) / 4.0, rel=1e-14)
    w = jnp.arange(1.0, 6.0)
    xs = x[:5]
    np.testing.assert_allclose(p.solve(xs, y[:5], w)["mu"], np.average(np.asarray(xs), axis=0, weights=w), rtol=1e-14)
    np.testing.assert_array_equal(np.asarray(p.population(None)["mu"]), mu)
    u = utility(p, theta, xs, y[:5])
    np.testing.assert_allclose(float(u["rmse"]), np.sqrt(2 * float(u["loss"])), rtol=1e-12)
    assert p.convex and p.task == "regression" and p.info()["name"] == "gaussian_mean"
    assert gaussian_mean(mu=0.5).config["dim"] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mu": [0.0], "sigma": 0.0}, "sigma"), ({"mu": [np.nan]}, "mu must be finite"), ({"mu": [[1.0]]}, "mu must")],
)
def test_gaussian_mean_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mean(**kwargs)


def test_mixture_law_is_fixed_by_config_and_has_the_stated_moments(x64):
    c1 = mixture_centres(dim=12, k_modes=3, separation=2.5, scale=2.0, seed=0)
    np.testing.assert_array_equal(c1, mixture_centres(dim=12, k_modes=3, separation=2.5, scale=2.0, seed=0))
    assert not np.allclose(c1, mixture_centres(dim=12, k_modes=3, separation=2.5, scale=2.0, seed=1))
    # Class means are +-(separation / 2) u exactly, u a unit vector.
    class_means = c1.mean(axis=1)
    np.testing.assert_allclose(class_means[0], -class_means[1], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(class_means[1] - class_means[0]), 2.5, rtol=1e-12)
    p = logistic_mixture(dim=12, k_modes=3)
    x, y = _sample(p, jax.random.key(1), 40000)
    x, y = np.asarray(x), np.asarray(y)
    # Class balance 1/2 within 4 SE (0.5 / sqrt(n) = 0.0025); class-1 mean within 4 SE per coordinate (the
    # per-coordinate sd is at most sqrt(1 + scale^2) = 2.24, n_1 ~ 20000).
    assert abs(y.mean() - 0.5) < 4 * 0.5 / np.sqrt(40000)
    np.testing.assert_array_less(np.abs(x[y == 1].mean(0) - class_means[1]), 4 * np.sqrt(5.0) / np.sqrt(19000))
    # Within a class: Cov(x | y) = I + (1/k) sum_j (mu_j - mean)(mu_j - mean)^T (equal-weight modes, N(0, I) noise).
    # Entry (a, b) of a sample covariance has SE sqrt((s_aa s_bb + s_ab^2) / n) <= sqrt(2) max(s_aa) / sqrt(n).
    off = c1[1] - class_means[1]
    cov = np.eye(12) + off.T @ off / 3
    emp = np.cov(x[y == 1].T)
    se = np.sqrt(2) * np.max(np.diag(cov)) / np.sqrt((y == 1).sum())
    assert np.max(np.abs(emp - cov)) < 5 * se, (np.max(np.abs(emp - cov)), se)


def test_logistic_loss_design_and_margin_loss_agree(x64):
    p = logistic_mixture(dim=6, k_modes=2)
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.normal(size=(50, 6))), jnp.asarray(rng.integers(0, 2, 50).astype(float))
    params = {"b": jnp.array([0.3]), "w": jnp.linspace(-1, 1, 6)[:, None]}
    theta, _ = ravel_pytree(params)
    assert float(theta[0]) == 0.3  # "b" comes first in ravel_pytree order
    eta = np.asarray(p.design(x) @ theta)
    np.testing.assert_allclose(eta, 0.3 + np.asarray(x) @ np.linspace(-1, 1, 6), rtol=1e-13)
    ref = np.log1p(np.exp(eta)) - np.asarray(y) * eta
    np.testing.assert_allclose(np.asarray(p.batch_loss(params, x, y)), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(p.margin_loss(jnp.asarray(eta), y)), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(p.predict(params, x)), 1 / (1 + np.exp(-eta)), rtol=1e-12)
    # Stable far in the tails: softplus(-1000) ~ 0, softplus(1000) = 1000; derivatives finite.
    big = jnp.array([1000.0, -1000.0])
    np.testing.assert_allclose(np.asarray(p.margin_loss(big, jnp.array([1.0, 1.0]))), [0.0, 1000.0], atol=1e-12)
    d2 = jax.vmap(jax.grad(jax.grad(p.margin_loss)))(big, jnp.array([1.0, 0.0]))
    assert np.all(np.isfinite(np.asarray(d2)))
    pen = logistic_mixture(dim=6, k_modes=2, l2=0.5)
    ridge = pen.margin_loss(pen.design(x) @ theta, y) + 0.5 * pen.penalty @ theta**2  # GLM form with the penalty
    np.testing.assert_allclose(np.asarray(ridge), np.asarray(pen.batch_loss(params, x, y)), rtol=1e-12)
    assert p.penalty is None
    np.testing.assert_allclose(
        float(pen.loss(params, x[0], y[0])),
        float(p.loss(params, x[0], y[0])) + 0.25 * np.sum(np.linspace(-1, 1, 6) ** 2),
    )


def test_logistic_default_law_is_not_separable_and_about_85_percent_accurate():
    p = logistic_mixture()
    assert p.config["separation"] == 2.5 and p.config["dim"] == 128
    xa, ya = (np.asarray(a, np.float64) for a in _sample(p, jax.random.key(3), 5000))
    x, y, xt, yt = xa[:1000], ya[:1000], xa[1000:], ya[1000:]
    # Max-margin LP: maximise t subject to (2y - 1)(b + x w) >= t and |b|, |w_j| <= 1. The data are linearly
    # separable (the unpenalised MLE does not exist) iff the optimum t is positive.
    s = 2 * y - 1
    a_ub = np.c_[-(s[:, None] * np.c_[np.ones(1000), x]), np.ones(1000)]
    cost = np.zeros(130)
    cost[-1] = -1.0
    lp = linprog(cost, A_ub=a_ub, b_ub=np.zeros(1000), bounds=[(-1, 1)] * 129 + [(None, 1)], method="highs")
    assert lp.status == 0 and -lp.fun < 1e-9, "the default data at n = 1000 must not be linearly separable"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=np.inf, max_iter=10000).fit(x, y)
    acc = model.score(xt, yt)
    assert 0.80 <= acc <= 0.90, acc


PRIOR_125 = float(1 / (1 + np.exp(-1.25)))  # sigmoid(1.25): theta*'s intercept is 1.25


def test_logistic_prior_closed_form_population_example():
    # The example of the closed form: separation 1.6, seed 3, dim 2, prior sigmoid(1.25) -> (1.25, 0.998, -1.250).
    p = logistic_mixture(dim=2, k_modes=4, separation=1.6, scale=2.0, seed=3, prior=PRIOR_125)
    star = p.population(jax.random.key(0))
    assert star["b"].shape == (1,) and star["w"].shape == (2, 1)
    np.testing.assert_allclose(np.asarray(ravel_pytree(star)[0]), [1.25, 0.998, -1.250], atol=5e-4)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(star["w"])), 1.6, rtol=1e-6)
    assert p.config["prior"] == PRIOR_125 and logistic_mixture(dim=2).config["prior"] == 0.5
    # the default prior keeps the symmetric law: intercept exactly 0
    assert float(logistic_mixture(dim=3).population(None)["b"][0]) == 0.0
    # with a ridge penalty there is no closed form
    assert logistic_mixture(dim=2, prior=PRIOR_125, l2=0.1).population is None
    assert mlp_mixture(dim=2, hidden=3, prior=0.3).config["prior"] == 0.3


@pytest.mark.parametrize("prior", [0.5, PRIOR_125])
@pytest.mark.parametrize("dim", [2, 5])
def test_logistic_prior_population_optimum_is_stationary_and_the_fit_agrees(x64, prior, dim):
    p = logistic_mixture(dim=dim, k_modes=4, separation=1.6, scale=2.0, seed=3, prior=prior)
    star = p.population(None)
    theta_star = np.asarray(ravel_pytree(star)[0])
    big = 400_000
    x, y = (np.asarray(a) for a in _sample(p, jax.random.key(17), big))
    # Class frequency: within 4 standard errors sqrt(prior (1 - prior) / N) of prior.
    assert abs(y.mean() - prior) < 4 * np.sqrt(prior * (1 - prior) / big)
    # Population gradient at theta*: the per-sample gradient (sigmoid(eta) - y) (1, x) has mean ~0; every
    # coordinate's sample mean within 4 of its standard errors (sd / sqrt(N)).
    design = np.c_[np.ones(big), x]
    resid = 1 / (1 + np.exp(-(design @ theta_star))) - y
    grads = resid[:, None] * design
    se = grads.std(0, ddof=1) / np.sqrt(big)
    np.testing.assert_array_less(np.abs(grads.mean(0)), 4 * se)
    # The MLE on an independent sample of N points agrees with theta* within 4 standard errors per coordinate,
    # the standard errors from the sandwich covariance Sigma_hat / N (theory.md section 2).
    n_fit = 100_000
    xf, yf = _sample(p, jax.random.key(18), n_fit)
    fit = train.fit_data(jax.random.key(19), p, xf[None], yf[None], tol=1e-10)
    assert bool(fit.converged[0])
    params = jax.tree.map(lambda a: a[0], fit.params)
    theta_hat = np.asarray(ravel_pytree(params)[0])
    cov = np.asarray(sandwich_covariance(p.loss, params, xf, yf))
    np.testing.assert_array_less(np.abs(theta_hat - theta_star), 4 * np.sqrt(np.diag(cov) / n_fit))


def test_mixture_prior_moves_only_the_label_frequency(x64):
    # P(y = 1) = prior; the class-conditional laws are those of the symmetric problem (same centres).
    p = logistic_mixture(dim=3, k_modes=2, separation=1.6, seed=3, prior=0.2)
    q = logistic_mixture(dim=3, k_modes=2, separation=1.6, seed=3)
    big = 200_000
    x, y = (np.asarray(a) for a in _sample(p, jax.random.key(5), big))
    assert abs(y.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / big)
    centres = mixture_centres(dim=3, k_modes=2, separation=1.6, scale=2.0, seed=3)
    u = (centres[1].mean(0) - centres[0].mean(0)) / 1.6
    for c in (0, 1):
        t = x[y == c] @ u
        # projection on u: N(+-0.8, 1); mean within 4 SE (1 / sqrt(n_c)), variance within 4 SE (sqrt(2 / n_c))
        assert abs(t.mean() - (c - 0.5) * 1.6) < 4 / np.sqrt(t.size)
        assert abs(t.var() - 1.0) < 4 * np.sqrt(2 / t.size)
    xq, yq = (np.asarray(a) for a in _sample(q, jax.random.key(5), 1000))
    assert abs(yq.mean() - 0.5) < 4 * 0.5 / np.sqrt(1000)


def test_linear_regression_solve_and_population(x64):
    p = linear_regression(dim=3, noise=0.0)
    x, y = _sample(p, jax.random.key(5), 30)
    sol = p.solve(x, y, jnp.ones(30))
    pop = p.population(None)
    # Noise-free: the least-squares fit recovers the population coefficients exactly.
    np.testing.assert_allclose(np.asarray(sol["w"]), np.asarray(pop["w"]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(sol["b"]), np.asarray(pop["b"]), rtol=1e-10)
    noisy = linear_regression(dim=3, noise=1.0, seed=1)
    rng = np.random.default_rng(6)
    xn, yn = jnp.asarray(rng.normal(size=(40, 3))), jnp.asarray(rng.normal(size=40))
    w = jnp.asarray(np.random.default_rng(0).integers(1, 3, 40).astype(float))
    design = np.c_[np.ones(40), np.asarray(xn)]
    ref = np.linalg.lstsq(design * np.sqrt(w)[:, None], np.asarray(yn) * np.sqrt(w), rcond=None)[0]
    got = noisy.solve(xn, yn, w)
    np.testing.assert_allclose(np.r_[got["b"], got["w"][:, 0]], ref, rtol=1e-10)
    theta = ravel_pytree(got)[0]
    np.testing.assert_allclose(
        np.asarray(noisy.batch_loss(got, xn, yn)),
        np.asarray(noisy.margin_loss(noisy.design(xn) @ theta, yn)),
        rtol=1e-12,
    )
    ridge = linear_regression(dim=3, l2=1.0)
    np.testing.assert_allclose(np.asarray(ridge.population(None)["w"]), np.asarray(p.population(None)["w"]) / 2)


def test_mlp_is_a_pure_pytree_matching_the_nnx_module():
    p = mlp_mixture(dim=5, hidden=4)
    params = jax.jit(p.init)(jax.random.key(7))
    assert isinstance(params, dict)
    assert jax.tree.map(jnp.shape, params) == {
        "hidden": {"bias": (4,), "kernel": (5, 4)},
        "out": {"bias": (1,), "kernel": (4, 1)},
    }
    module = MLP(5, 4, rngs=nnx.Rngs(params=jax.random.key(7)))
    np.testing.assert_allclose(np.asarray(module.hidden.kernel[...]), np.asarray(params["hidden"]["kernel"]), rtol=1e-6)
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    host = jax.tree.map(np.asarray, params)  # the NumPy reference
    eta = np.tanh(x @ host["hidden"]["kernel"] + host["hidden"]["bias"]) @ host["out"]["kernel"][:, 0]
    eta = eta + host["out"]["bias"][0]
    with jax.numpy_rank_promotion("allow"):  # flax's Linear adds its bias by rank promotion
        np.testing.assert_allclose(np.asarray(module(x)), eta, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p.predict(params, x)), 1 / (1 + np.exp(-eta)), rtol=1e-5)
    y = np.array([1.0, 0.0, 1.0], np.float32)
    np.testing.assert_allclose(np.asarray(p.batch_loss(params, x, y)), np.logaddexp(0, -(2 * y - 1) * eta), rtol=1e-5)
    # Stacked parameters vmap, as the replicate engine needs.
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    out = jax.vmap(p.predict, in_axes=(0, None))(stacked, x)
    assert out.shape == (2, 3)
    assert not p.convex and p.task == "binary"
    with pytest.raises(KeyError, match="unknown activation"):
        mlp_mixture(activation="swish")


def test_custom_problem_from_apply_fn_and_from_nnx_module():
    def sample(key, n):
        x = jax.random.normal(key, (n, 3))
        return x, (x[:, 0] > 0).astype(x.dtype)

    lin = custom(
        name="mine",
        loss="logistic",
        sample=sample,
        task="binary",
        convex=True,
        apply_fn=lambda p, x: x @ p["w"] + p["c"],
        init=lambda k: {"w": jnp.ones(3), "c": jnp.zeros(())},
        config={"source": "test"},
    )
    x = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]], np.float32)
    y = np.array([1.0, 0.0], np.float32)
    eta = x.sum(1)
    np.testing.assert_allclose(
        np.asarray(lin.batch_loss(lin.init(None), x, y)), np.logaddexp(0, -(2 * y - 1) * eta), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(lin.predict(lin.init(None), x)), 1 / (1 + np.exp(-eta)), rtol=1e-6)
    assert isinstance(lin, Problem) and lin.info()["source"] == "test"

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)

    from_factory = custom(name="net", loss="squared", sample=sample, task="regression", convex=True, module=Net)
    params = from_factory.init(jax.random.key(0))
    k, b = params["lin"]["kernel"], params["lin"]["bias"]
    out = x @ np.asarray(k)[:, 0] + np.asarray(b)[0]
    np.testing.assert_allclose(np.asarray(from_factory.predict(params, x)), out, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(from_factory.batch_loss(params, x, y)), 0.5 * (out - y) ** 2, rtol=1e-5)
    instance = Net(nnx.Rngs(3))
    from_instance = custom(
        name="net", loss=lambda o, t: jnp.abs(o - t), sample=sample, task="regression", convex=True, module=instance
    )
    p0 = from_instance.init(jax.random.key(9))
    np.testing.assert_allclose(np.asarray(p0["lin"]["kernel"]), np.asarray(instance.lin.kernel[...]))
    with pytest.raises(ValueError, match="exactly one"):
        custom(name="x", loss="squared", sample=sample, task="regression", convex=True)
    with pytest.raises(KeyError, match="unknown loss"):
        custom(name="x", loss="hinge", sample=sample, task="binary", convex=True, module=Net)
    with pytest.raises(ValueError, match="task"):
        custom(name="x", loss="squared", sample=sample, task="multiclass", convex=True, module=Net)
    with pytest.raises(ValueError, match="init is required"):
        custom(name="x", loss="squared", sample=sample, task="regression", convex=True, apply_fn=lambda p, x: x)


@pytest.mark.parametrize(
    "ctor, kwargs, match",
    [
        (logistic_mixture, {"dim": 0}, "dim"),
        (logistic_mixture, {"k_modes": 1.5}, "k_modes"),
        (logistic_mixture, {"l2": -1.0}, "l2"),
        (logistic_mixture, {"seed": -1}, "seed"),
        (mlp_mixture, {"hidden": 0}, "hidden"),
        (logistic_mixture, {"prior": 0.0}, "prior"),
        (logistic_mixture, {"prior": 1.0}, "prior"),
        (logistic_mixture, {"prior": float("nan")}, "prior"),
        (logistic_mixture, {"prior": "half"}, "prior"),
        (mlp_mixture, {"prior": 1.5}, "prior"),
        (linear_regression, {"dim": 3, "noise": float("inf")}, "noise"),
    ],
)
def test_constructors_reject_bad_arguments(ctor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ctor(**kwargs)
