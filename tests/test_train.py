"""Tests of the replicate engine (qmis_jax.train): optima against scikit-learn and closed forms, replicate
independence from chunking and batch composition, shared initialisation, per-sample losses and gradients, and
boundary checks.

Compilation dominates the cost of these tests on CPU, so they share a few fixtures and draw pool data with NumPy
from the same mixture law (no random-number program to compile)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from qmis_jax.problems import gaussian_mean, linear_regression, logistic_mixture, mlp_mixture
from qmis_jax.problems._mixture import mixture_centres
from qmis_jax.train import FitResult, fit, fit_fresh, per_sample_grads_batched, per_sample_losses, replicate_data
from qmis_jax.train._engine import training_keys


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


LOGISTIC = logistic_mixture(dim=16, k_modes=3)
MLP = mlp_mixture(dim=8, k_modes=2, hidden=6)


def _mixture_np(problem, n, seed):
    """``n`` draws from ``problem``'s mixture law with NumPy (the law of ``problem.sample``, another stream)."""
    c = problem.config
    centres = mixture_centres(
        dim=c["dim"], k_modes=c["k_modes"], separation=c["separation"], scale=c["scale"], seed=c["seed"]
    )
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = centres[y, rng.integers(0, c["k_modes"], n)] + rng.standard_normal((n, c["dim"]))
    return x, y.astype(float)


def _theta(params, r):
    return np.r_[np.asarray(params["b"][r]), np.asarray(params["w"][r, :, 0])]


def _sk_logistic(x, y, sample_weight=None, C=np.inf):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x, y, sample_weight=sample_weight)
    return np.r_[m.intercept_, m.coef_[0]]


def _mean_logistic_loss(theta, x, y):
    return np.mean(np.logaddexp(0.0, -(2 * y - 1) * (theta[0] + x @ theta[1:])))


@pytest.fixture(scope="module")
def fresh16():
    """16 logistic replicates on fresh data (float64), trained in one chunk, and their regenerated data."""
    with jax.enable_x64(True):
        key = jax.random.key(0)
        res = fit_fresh(key, LOGISTIC, n=400, replicates=16, tol=1e-10, chunk_size=16)
        xs, ys = replicate_data(key, LOGISTIC, n=400, index=np.arange(16))
        return key, res, np.asarray(xs), np.asarray(ys)


@pytest.fixture(scope="module")
def pool16():
    """16 logistic replicates on one pool of 800 (float64): 11 membership rows, then 5 bootstrap rows."""
    with jax.enable_x64(True):
        x, y = _mixture_np(LOGISTIC, 800, seed=1)
        rng = np.random.default_rng(0)
        member = (rng.random((11, 800)) < 0.5).astype(float)
        boot = rng.multinomial(800, np.full(800, 1 / 800), size=5).astype(float)
        weights = np.concatenate([member, boot])
        res = fit(jax.random.key(2), LOGISTIC, x, y, weights=weights, tol=1e-10)
        return x, y, weights, res


def test_logistic_fresh_reaches_sklearn_optimum(x64, fresh16):
    _, res, xs, ys = fresh16
    assert isinstance(res, FitResult)
    assert res.params["w"].shape == (16, 16, 1) and res.params["b"].shape == (16, 1)
    assert bool(jnp.all(res.converged)) and float(jnp.max(res.grad_norm)) <= 1e-10
    assert res.steps.dtype == jnp.int32 and int(jnp.min(res.steps)) >= 1
    for r in range(8):
        ref = _sk_logistic(xs[r], ys[r])
        ours = _theta(res.params, r)
        # Same optimum: ours is no worse than sklearn's (to 1e-12) and the mean losses agree to 1e-5.
        assert _mean_logistic_loss(ours, xs[r], ys[r]) <= _mean_logistic_loss(ref, xs[r], ys[r]) + 1e-12
        assert abs(_mean_logistic_loss(ours, xs[r], ys[r]) - _mean_logistic_loss(ref, xs[r], ys[r])) < 1e-5
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_replicate_data_is_the_fresh_stream(x64, fresh16):
    key, _, xs, ys = fresh16
    assert xs.shape == (16, 400, 16) and ys.shape == (16, 400)
    sample = jax.jit(LOGISTIC.sample, static_argnums=1)
    x3, y3 = sample(jax.random.fold_in(training_keys(key).data, 3), 400)
    np.testing.assert_allclose(xs[3], np.asarray(x3), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ys[3], np.asarray(y3))
    assert set(np.unique(ys)) == {0.0, 1.0}


def test_logistic_pool_weights_match_sklearn_subsets_and_bootstrap(x64, pool16):
    x, y, weights, res = pool16
    assert bool(jnp.all(res.converged))
    for r in [0, 1, 2]:
        m = weights[r] > 0
        np.testing.assert_allclose(_theta(res.params, r), _sk_logistic(x[m], y[m]), rtol=1e-5, atol=1e-5)
    for r in [11, 12]:
        ref = _sk_logistic(x, y, sample_weight=weights[r])
        np.testing.assert_allclose(_theta(res.params, r), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_replicate_independent_of_chunking_and_batch(x64, fresh16, pool16):
    key, res16, _, _ = fresh16
    chunked = fit_fresh(key, LOGISTIC, n=400, replicates=16, tol=1e-10, chunk_size=7)
    np.testing.assert_allclose(np.asarray(chunked.params["w"]), np.asarray(res16.params["w"]), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(chunked.steps), np.asarray(res16.steps))
    # Shared pool: replicate 5 alone and inside a batch of 7 equals replicate 5 inside the batch of 16.
    x, y, weights, batch16 = pool16
    batch7 = fit(jax.random.key(2), LOGISTIC, x, y, weights=weights[:7], tol=1e-10)
    alone = fit(jax.random.key(2), LOGISTIC, x, y, weights=weights[5:6], tol=1e-10)
    ref = np.asarray(batch16.params["w"][5])
    np.testing.assert_allclose(np.asarray(batch7.params["w"][5]), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(alone.params["w"][0]), ref, rtol=1e-9, atol=1e-12)


def test_generic_newton_penalised_logistic_matches_sklearn(x64):
    problem = logistic_mixture(dim=5, k_modes=2, l2=0.05)
    assert problem.penalty is not None  # a ridge penalty: trained by the generic autodiff Newton
    x, y = _mixture_np(problem, 200, seed=3)
    weights = np.ones((2, 200))
    weights[1, :50] = 0.0
    res = fit(jax.random.key(4), problem, x, y, weights=weights, tol=1e-10)
    assert bool(jnp.all(res.converged))
    for r, rows in enumerate([slice(None), slice(50, None)]):
        n_r = len(y[rows])
        ref = _sk_logistic(x[rows], y[rows], C=1.0 / (n_r * 0.05))
        np.testing.assert_allclose(_theta(res.params, r), ref, rtol=1e-5, atol=1e-6)


def test_gaussian_mean_is_the_weighted_mean_exactly(x64):
    problem = gaussian_mean(mu=[0.3, -1.0, 2.0], sigma=1.5)
    x = np.random.default_rng(5).normal(size=(50, 3))
    weights = np.random.default_rng(1).integers(0, 4, size=(6, 50)).astype(float)
    weights[:, 0] += 1.0
    res = fit(jax.random.key(6), problem, x, np.zeros(50), weights=weights)
    expected = weights @ x / weights.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(res.params["mu"]), expected, rtol=1e-13, atol=1e-14)
    assert bool(jnp.all(res.converged)) and int(jnp.max(res.steps)) == 0
    fresh = fit_fresh(jax.random.key(7), problem, n=40, replicates=5)
    xs, ys = replicate_data(jax.random.key(7), problem, n=40, index=np.arange(5))
    assert xs.shape == (5, 40, 3) and ys.shape == (5, 40)
    np.testing.assert_allclose(np.asarray(fresh.params["mu"]), np.asarray(xs).mean(1), rtol=1e-12, atol=1e-13)
    x4, _ = replicate_data(jax.random.key(7), problem, n=40, index=4)
    np.testing.assert_allclose(np.asarray(x4), np.asarray(xs[4]), rtol=1e-12, atol=1e-13)


def test_linear_regression_closed_form_matches_ridge(x64):
    problem = linear_regression(dim=4, noise=0.5, l2=0.1)
    x = np.random.default_rng(8).normal(size=(120, 4))
    y = x @ np.array([0.5, -1.0, 0.0, 2.0]) + 0.3 + 0.5 * np.random.default_rng(9).normal(size=120)
    res = fit(jax.random.key(9), problem, x, y, weights=np.ones((1, 120)))
    ref = Ridge(alpha=120 * 0.1, tol=1e-12).fit(x, y)
    np.testing.assert_allclose(_theta(res.params, 0), np.r_[ref.intercept_, ref.coef_], rtol=1e-9, atol=1e-10)
    assert float(res.grad_norm[0]) < 1e-10


def test_per_sample_losses_and_grads(x64, pool16):
    x, y, weights, res = pool16
    losses = per_sample_losses(LOGISTIC, res.params, x, y)
    assert losses.shape == (16, 800)
    design = np.c_[np.ones(800), x]
    for r in [0, 12]:
        eta = design @ _theta(res.params, r)
        np.testing.assert_allclose(np.asarray(losses[r]), np.logaddexp(0.0, -(2 * y - 1) * eta), rtol=1e-12)
    chunked = per_sample_losses(LOGISTIC, res.params, x, y, chunk_size=5)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(losses), rtol=1e-13)
    grads = per_sample_grads_batched(LOGISTIC, res.params, x, y)
    assert grads.shape == (16, 800, 17)
    for r in [0, 12]:
        prob = 1 / (1 + np.exp(-(design @ _theta(res.params, r))))
        np.testing.assert_allclose(np.asarray(grads[r]), (prob - y)[:, None] * design, rtol=1e-10, atol=1e-12)
    # At each replicate's weighted optimum its weighted mean score vanishes (to the training tolerance).
    mean_scores = np.einsum("rn,rnp->rp", weights, np.asarray(grads)) / weights.sum(1)[:, None]
    assert np.linalg.norm(mean_scores, axis=1).max() < 1e-9


def test_per_sample_losses_per_replicate_data_generic_path():
    xs = np.stack([_mixture_np(MLP, 10, seed=s)[0] for s in (0, 1)]).astype(np.float32)
    ys = np.stack([_mixture_np(MLP, 10, seed=s)[1] for s in (0, 1)]).astype(np.float32)
    rng = np.random.default_rng(18)
    shapes = {"hidden": {"bias": (2, 6), "kernel": (2, 8, 6)}, "out": {"bias": (2, 1), "kernel": (2, 6, 1)}}
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda s: type(s) is tuple)
    per = per_sample_losses(MLP, params, xs, ys)
    assert per.shape == (2, 10)
    for r in range(2):
        p = jax.tree.map(lambda a, r=r: np.asarray(a[r], np.float64), params)
        h = np.tanh(xs[r] @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        eta = h @ p["out"]["kernel"][:, 0] + p["out"]["bias"][0]
        np.testing.assert_allclose(np.asarray(per[r]), np.logaddexp(0, -(2 * ys[r] - 1) * eta), rtol=1e-5)
    with pytest.raises(ValueError, match="per replicate"):
        per_sample_losses(MLP, params, xs[:1], ys[:1])


@pytest.mark.slow
def test_mlp_shared_init_and_loss_decrease():
    key = jax.random.key(12)
    x, y = _mixture_np(MLP, 64, seed=13)
    same_rows = np.ones((3, 64))
    # One shared initialisation: replicates with the same data stay identical; separate inits make them differ.
    shared = fit(key, MLP, x, y, weights=same_rows, max_steps=100)
    separate = fit(key, MLP, x, y, weights=same_rows, max_steps=100, shared_init=False)
    for leaf in jax.tree.leaves(shared.params):
        np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[1]))
        np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[2]))
    sep = np.asarray(separate.params["hidden"]["kernel"])
    assert np.abs(sep[0] - sep[1]).max() > 1e-2
    assert int(shared.steps[0]) == 100
    # The shared start is problem.init(k_init) with k_init = training_keys(key).init; training lowers the loss.
    init = jax.tree.map(lambda a: a[None], jax.jit(MLP.init)(training_keys(key).init))
    start = per_sample_losses(MLP, init, x, y).mean()
    end = per_sample_losses(MLP, shared.params, x, y).mean(1)
    assert bool(jnp.all(end < 0.7 * start)), (start, end)
    # The reported gradient norm is that of the mean per-sample gradient at the final parameters.
    mean_grad = per_sample_grads_batched(MLP, shared.params, x, y).mean(1)
    np.testing.assert_allclose(np.asarray(shared.grad_norm), np.linalg.norm(mean_grad, axis=1), rtol=1e-4)


@pytest.mark.slow
def test_mlp_fixed_steps_independent_of_chunking():
    key = jax.random.key(14)
    res = fit_fresh(key, MLP, n=32, replicates=16, max_steps=60, chunk_size=16)
    chunked = fit_fresh(key, MLP, n=32, replicates=16, max_steps=60, chunk_size=7)
    # Equal up to float32 rounding of differently batched matrix products (not always bit-exact).
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), chunked.params, res.params)


def test_mlp_minibatches_sample_members_only():
    x, y = _mixture_np(MLP, 40, seed=15)
    x = x.astype(np.float32)
    weights = np.zeros((1, 40))
    weights[0, :20] = 1.0
    # If a minibatch ever drew a non-member (rows 20:), the poisoned inputs would change the result.
    clean = fit(jax.random.key(16), MLP, x, y, weights=weights, max_steps=30, batch_size=8)
    poisoned = x.copy()
    poisoned[20:] = 1e3
    other = fit(jax.random.key(16), MLP, poisoned, y, weights=weights, max_steps=30, batch_size=8)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), other.params, clean.params)
    assert bool(jnp.all(jnp.isfinite(clean.grad_norm)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": np.ones((2, 9))}, "weights must have shape"),
        ({"weights": np.ones(10)}, "weights must have shape"),
        ({"weights": -np.ones((2, 10))}, "weights must be non-negative"),
        ({"weights": np.vstack([np.ones(10), np.zeros(10)])}, "all-zero row"),
        ({"weights": np.full((1, 10), np.nan)}, "weights must be finite"),
        ({"weights": np.ones((1, 10)), "tol": 0.0}, "tol must be"),
        ({"weights": np.ones((1, 10)), "tol": -1e-3}, "tol must be"),
        ({"weights": np.ones((1, 10)), "max_steps": 0}, "max_steps must be"),
        ({"weights": np.ones((1, 10)), "chunk_size": 0}, "chunk_size must be"),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, match):
    x, y = _mixture_np(LOGISTIC, 10, seed=20)
    with pytest.raises(ValueError, match=match):
        fit(jax.random.key(0), LOGISTIC, x, y, **kwargs)


def test_fit_rejects_bad_data():
    x, y = _mixture_np(LOGISTIC, 10, seed=21)
    w = np.ones((1, 10))
    bad_x = x.copy()
    bad_x[2, 3] = np.nan
    with pytest.raises(ValueError, match="x must be finite"):
        fit(jax.random.key(0), LOGISTIC, bad_x, y, weights=w)
    bad_y = y.copy()
    bad_y[4] = np.inf
    with pytest.raises(ValueError, match="y must be finite"):
        fit(jax.random.key(0), LOGISTIC, x, bad_y, weights=w)
    bad_y[4] = 2.0
    with pytest.raises(ValueError, match=r"y must hold labels in \{0, 1\}.*2\.0 at index 4"):
        fit(jax.random.key(0), LOGISTIC, x, bad_y, weights=w)
    with pytest.raises(ValueError, match="y must have shape"):
        fit(jax.random.key(0), LOGISTIC, x, y[:5], weights=w)
    with pytest.raises(ValueError, match="x must have shape"):
        fit(jax.random.key(0), LOGISTIC, x[0], y, weights=w)
    with pytest.raises(KeyError, match="unknown solver"):
        fit(jax.random.key(0), LOGISTIC, x, y, weights=w, solver="sgd")
    with pytest.raises(ValueError, match="closed_form"):
        fit(jax.random.key(0), LOGISTIC, x, y, weights=w, solver="closed_form")
    with pytest.raises(ValueError, match="key must be"):
        fit(0, LOGISTIC, x, y, weights=w)
    with pytest.raises(ValueError, match="problem must be"):
        fit(jax.random.key(0), "logistic", x, y, weights=w)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0, "replicates": 2}, "n must be a positive integer"),
        ({"n": 10, "replicates": 0}, "replicates must be a positive integer"),
        ({"n": 10, "replicates": -3}, "replicates must be a positive integer"),
        ({"n": 10, "replicates": 2.5}, "replicates must be a positive integer"),
        ({"n": 10, "replicates": 2, "tol": float("nan")}, "tol must be"),
        ({"n": 10, "replicates": 2, "batch_size": 0}, "batch_size must be"),
    ],
)
def test_fit_fresh_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_fresh(jax.random.key(0), LOGISTIC, **kwargs)


def test_bad_inputs_fail_before_compiling():
    from qmis_jax.train import _engine

    builders = (_engine._pool_program, _engine._fresh_program, _engine._data_program)
    before = [b.cache_info().misses for b in builders]
    with pytest.raises(ValueError):
        fit_fresh(jax.random.key(0), mlp_mixture(dim=3, hidden=2), n=10, replicates=0)
    x, y = _mixture_np(LOGISTIC, 10, seed=22)
    with pytest.raises(ValueError):
        fit(jax.random.key(0), logistic_mixture(dim=16), x, y, weights=np.zeros((1, 10)))
    with pytest.raises(ValueError):
        replicate_data(jax.random.key(0), LOGISTIC, n=0, index=[1])
    assert [b.cache_info().misses for b in builders] == before


_SHARDING_SCRIPT = """
import jax, numpy as np
from qmis_jax.problems import gaussian_mean, logistic_mixture
from qmis_jax.train import fit, fit_fresh
assert len(jax.devices()) == 2, jax.devices()
g = gaussian_mean(mu=[0.5, -1.0])
two = fit_fresh(jax.random.key(0), g, n=30, replicates=6)
one = fit_fresh(jax.random.key(0), g, n=30, replicates=6, devices=jax.devices()[:1])
assert len(two.params["mu"].sharding.device_set) == 2, two.params["mu"].sharding
np.testing.assert_allclose(np.asarray(two.params["mu"]), np.asarray(one.params["mu"]), rtol=1e-6)
lg = logistic_mixture(dim=3, k_modes=2)
rng = np.random.default_rng(0)
x = rng.normal(size=(120, 3)).astype(np.float32)
y = (x[:, 0] + rng.normal(size=120) > 0).astype(np.float32)
w = (rng.random((5, 120)) < 0.7).astype(np.float32)
a = fit(jax.random.key(1), lg, x, y, weights=w, tol=1e-5)
b = fit(jax.random.key(1), lg, x, y, weights=w, tol=1e-5, devices=jax.devices()[:1])
np.testing.assert_allclose(np.asarray(a.params["w"]), np.asarray(b.params["w"]), rtol=1e-4, atol=1e-5)
assert bool(a.converged.all())
print("sharded ok")
"""


@pytest.mark.slow
def test_sharding_over_two_devices_matches_one():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "sharded ok" in out.stdout, out.stderr[-3000:]
