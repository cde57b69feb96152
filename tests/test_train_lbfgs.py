"""Tests of the quasi-Newton GLM path of the replicate engine: the compacting loop against closed-form iteration
counts, the L-BFGS certificate recomputed with NumPy, Newton and L-BFGS reaching scikit-learn's optimum, and the
benchmark script using public names only."""

import ast
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from qmis_jax._loops import compacting_while
from qmis_jax.problems import logistic_mixture
from qmis_jax.train import SOLVERS, fit, fit_fresh, replicate_data

LOGISTIC = logistic_mixture(dim=8, k_modes=2)


def _halvings(start, shrink, min_size):
    """Members halve their value until it is below 1: member i takes ceil(log2(x_i)) steps (0 if x_i < 1)."""

    def step(c):
        x, n = c
        active = x >= 1
        return jnp.where(active, x / 2, x), n + active.astype(jnp.int32)

    x = jnp.asarray(start)
    return compacting_while(
        step, (x, jnp.zeros(x.shape, jnp.int32)), lambda c: c[0] >= 1, shrink=shrink, min_size=min_size
    )


@pytest.mark.parametrize("size, shrink, min_size", [(37, 4, 4), (64, 2, 8), (5, 4, 16)])
def test_compacting_while_matches_closed_form_counts(size, shrink, min_size):
    rng = np.random.default_rng(size)
    start = np.exp2(rng.uniform(-1, 12, size)).astype(np.float32)
    start[::7] = 0.5  # some members never step
    x, n = jax.jit(lambda s: _halvings(s, shrink, min_size))(start)
    expected = np.where(start >= 1, np.floor(np.log2(start)) + 1, 0)
    np.testing.assert_array_equal(np.asarray(n), expected)
    np.testing.assert_array_equal(np.asarray(x), start / np.exp2(expected))


def _mean_grad(theta, x, y, w):
    """NumPy float64 gradient of the weighted mean logistic loss at ``theta = [b, w]``."""
    eta = theta[0] + x @ theta[1:]
    r = w * (1 / (1 + np.exp(-eta)) - y) / w.sum()
    return np.r_[r.sum(), x.T @ r]


def test_lbfgs_converged_flag_certifies_the_returned_gradient():
    rng = np.random.default_rng(0)
    x, y = (np.asarray(a, np.float64) for a in jax.jit(LOGISTIC.sample, static_argnums=1)(jax.random.key(3), 600))
    weights = (rng.random((40, 600)) < 0.5).astype(np.float32)
    tol = 1e-5
    res = fit(jax.random.key(1), LOGISTIC, x.astype(np.float32), y.astype(np.float32), weights=weights, tol=tol)
    assert "glm_lbfgs" in SOLVERS and bool(jnp.all(res.converged))
    theta = np.c_[np.asarray(res.params["b"], np.float64), np.asarray(res.params["w"][..., 0], np.float64)]
    norms = np.array([np.linalg.norm(_mean_grad(theta[r], x, y, weights[r].astype(float))) for r in range(40)])
    # float32 arithmetic against float64: the reported norm agrees to a few 1e-7, and stays below tol.
    np.testing.assert_allclose(np.asarray(res.grad_norm), norms, atol=5e-7)
    assert norms.max() <= tol + 5e-7


@pytest.mark.slow
def test_newton_and_lbfgs_reach_sklearn_optimum(x64):
    key = jax.random.key(4)
    newton = fit_fresh(key, LOGISTIC, n=300, replicates=4, tol=1e-10, solver="glm_newton")
    lbfgs = fit_fresh(key, LOGISTIC, n=300, replicates=4, tol=1e-10, solver="glm_lbfgs")
    xs, ys = (np.asarray(a) for a in replicate_data(key, LOGISTIC, n=300, index=np.arange(4)))
    for r in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(xs[r], ys[r])
        ref = np.r_[m.intercept_, m.coef_[0]]
        for res in (newton, lbfgs):
            ours = np.r_[np.asarray(res.params["b"][r]), np.asarray(res.params["w"][r, :, 0])]
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(lbfgs.converged)) and float(jnp.max(lbfgs.grad_norm)) <= 1e-10


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_benchmark_imports_public_names_only():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")
    tree = ast.parse(open(path).read())
    seen = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qmis_jax"):
            seen.append(node.module)
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), [a.name for a in node.names]
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            assert not (isinstance(base, ast.Name) and base.id in ("train", "qj", "qmis_jax")), node.attr
    assert "qmis_jax.train" in seen
