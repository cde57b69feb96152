"""Post-training quantization and decision margins (theory.md section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from qmis_jax.indicator.margins import (
    Moves,
    competitors,
    gap_stats,
    loss_differences,
    rtn_differences,
    rtn_margins,
)
from qmis_jax.indicator.ptq import ptq_loss, ptq_rtn
from qmis_jax.indicator.sandwich import sandwich_covariance
from qmis_jax.problems import gaussian_mean, logistic_mixture
from qmis_jax.quantizers import ternary, uniform


@pytest.fixture(autouse=True, scope="module")
def x64():
    with jax.enable_x64(True):
        yield


DIM = 5
LOGISTIC = logistic_mixture(dim=DIM, k_modes=2)  # only its loss / design / margin_loss are used
BETA = np.array([0.3, 1.1, -0.9, 0.65, 0.4, -0.2])


def _logistic_data(n, seed):
    """Correlated features (so round-to-nearest is not loss-optimal) and labels from a logistic model."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, DIM))
    x = 0.6 * z + 0.8 * z[:, :1]
    eta = BETA[0] + x @ BETA[1:]
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(np.float64)
    return x, y


def _mle(x, y, iters=30):
    """Logistic MLE by Newton's method in NumPy, returned as the problem's parameter pytree."""
    design = np.column_stack([np.ones(len(y)), x])
    beta = np.zeros(design.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-design @ beta))
        beta -= np.linalg.solve((design * (p * (1 - p))[:, None]).T @ design, design.T @ (p - y))
    return {"b": jnp.asarray(beta[:1]), "w": jnp.asarray(beta[1:, None])}


def _mean_loss(params, x, y):
    return float(jnp.mean(LOGISTIC.batch_loss(params, jnp.asarray(x), jnp.asarray(y))))


def test_separable_quadratic_rtn_and_loss_ptq_coincide():
    # theory.md section 3: comparing the losses of adjacent levels a, a + h is the event "theta_hat crosses a + h/2"
    problem = gaussian_mean(mu=[0.3, -1.2, 0.74, 2.1])
    x, y = problem.sample(jax.random.key(0), 200)
    params = {"mu": jnp.mean(x, axis=0)}
    h = 0.5
    q = uniform(step=h)
    release, n_moves = ptq_loss(q, problem.loss, params, x, y)
    np.testing.assert_array_equal(np.asarray(release["mu"]), np.asarray(ptq_rtn(q, params)["mu"]))
    assert int(n_moves) == 0
    moves = competitors(q, release, params)
    delta, sigma = gap_stats(loss_differences(problem.loss, release, moves, x, y), moves.valid)
    m, s, valid = rtn_margins(q, params, sandwich_covariance(problem.loss, params, x, y))
    assert valid.tolist() == moves.valid.tolist() == [True] * 8
    # D_k(z) = h (t_k - z) for the upper move (t_k the threshold), so delta_k = h m_k and sigma_k = h s_k
    np.testing.assert_allclose(np.asarray(delta), h * np.asarray(m), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(sigma), h * np.asarray(s), rtol=1e-10)


def test_competitors_order_and_validity():
    q = uniform(bits=2)  # levels {-s, 0, s}, s = max|w|
    params = {"a": jnp.array([-1.0, 0.2, 0.9, 0.4]), "b": jnp.array([0.3])}
    release = ptq_rtn(q, params)
    np.testing.assert_allclose(np.asarray(release["a"]), [-1.0, 0.0, 1.0, 0.0])
    moves = competitors(q, release, params, skip=("b",))
    assert isinstance(moves, Moves)
    assert moves.index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    np.testing.assert_allclose(np.asarray(moves.step), [0, 1, -1, 1, -1, 0, -1, 1, 0, 0])
    assert moves.valid.tolist() == [False, True, True, True, True, False, True, True, False, False]


def test_ptq_loss_is_a_local_minimiser_and_glm_path_agrees():
    x, y = _logistic_data(400, seed=3)
    params = _mle(x, y)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    total_moves = 0
    for q in (uniform(step=0.6), uniform(bits=3)):
        fast, n_fast = ptq_loss(
            q, LOGISTIC.loss, params, xj, yj, design=LOGISTIC.design, margin_loss=LOGISTIC.margin_loss
        )
        if q.bits is None:  # the generic path (one forward pass per candidate) finds the same release
            slow, n_slow = ptq_loss(q, LOGISTIC.loss, params, xj, yj)
            assert int(n_fast) == int(n_slow)
            for leaf_fast, leaf_slow in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
                np.testing.assert_array_equal(np.asarray(leaf_fast), np.asarray(leaf_slow))
        total_moves += int(n_fast)
        rtn = ptq_rtn(q, params)
        assert _mean_loss(fast, x, y) <= _mean_loss(rtn, x, y)
        # no single move to an adjacent level lowers the training loss (checked by direct evaluation)
        moves = competitors(q, fast, params)
        theta, unravel = ravel_pytree(fast)
        ks = np.nonzero(np.asarray(moves.valid))[0]
        moved = theta[None, :] + jnp.zeros((len(ks), theta.size)).at[np.arange(len(ks)), moves.index[ks]].set(
            moves.step[ks]
        )
        losses = jax.vmap(lambda th, u=unravel: jnp.mean(LOGISTIC.batch_loss(u(th), xj, yj)))(moved)
        assert float(jnp.min(losses)) >= _mean_loss(fast, x, y) - 1e-12
        D_fast = loss_differences(
            LOGISTIC.loss, fast, moves, xj, yj, design=LOGISTIC.design, margin_loss=LOGISTIC.margin_loss
        )
        if q.bits is not None:
            D_slow = loss_differences(LOGISTIC.loss, fast, moves, xj, yj, chunk_size=3)
            np.testing.assert_allclose(np.asarray(D_fast), np.asarray(D_slow), rtol=1e-9, atol=1e-12)
        delta, _ = gap_stats(D_fast, moves.valid)
        assert bool(jnp.all(jnp.where(moves.valid, delta >= 0, True)))
    assert total_moves >= 2  # the descent moved away from round-to-nearest for both quantizers


def test_ptq_loss_max_sweeps_and_vmap_over_replicates():
    q = uniform(step=0.6)
    data = [_logistic_data(300, seed=s) for s in (2, 3, 4)]
    params = [_mle(x, y) for x, y in data]
    xs = jnp.asarray(np.stack([d[0] for d in data]))
    ys = jnp.asarray(np.stack([d[1] for d in data]))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params)

    def run(p, x, y):
        return ptq_loss(q, LOGISTIC.loss, p, x, y, design=LOGISTIC.design, margin_loss=LOGISTIC.margin_loss)

    rel_b, n_b = jax.vmap(run)(stacked, xs, ys)
    for i in range(3):
        rel, n = run(params[i], xs[i], ys[i])
        assert int(n_b[i]) == int(n)
        np.testing.assert_array_equal(np.asarray(rel_b["w"][i]), np.asarray(rel["w"]))
        np.testing.assert_array_equal(np.asarray(rel_b["b"][i]), np.asarray(rel["b"]))
    # the bound on the number of sweeps
    i = int(jnp.argmax(n_b))
    assert int(n_b[i]) >= 1
    zero, n0 = ptq_loss(q, LOGISTIC.loss, params[i], xs[i], ys[i], max_sweeps=0)
    assert int(n0) == 0
    np.testing.assert_array_equal(np.asarray(zero["w"]), np.asarray(ptq_rtn(q, params[i])["w"]))
    one, n1 = ptq_loss(q, LOGISTIC.loss, params[i], xs[i], ys[i], max_sweeps=1)
    # one sweep moves each coordinate at most once: its moves are the coordinates that left round-to-nearest, and
    # each lowered the training loss, which the converged release lowers at least as far
    rtn = ptq_rtn(q, params[i])
    changed = sum(
        int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(rtn))
    )
    assert int(n1) == changed >= 1
    full = jax.tree.map(lambda a: a[i], rel_b)
    x_i, y_i = np.asarray(xs[i]), np.asarray(ys[i])
    assert _mean_loss(full, x_i, y_i) <= _mean_loss(one, x_i, y_i) < _mean_loss(rtn, x_i, y_i)
    with pytest.raises(ValueError, match="max_sweeps"):
        ptq_loss(q, LOGISTIC.loss, params[i], xs[i], ys[i], max_sweeps=-1)
    with pytest.raises(ValueError, match="design and margin_loss"):
        ptq_loss(q, LOGISTIC.loss, params[i], xs[i], ys[i], design=LOGISTIC.design)


def test_ridge_penalty_glm_path_matches_the_generic_path():
    # a ridge logistic loss carried by (design, margin_loss, penalty) gives the releases and loss differences of
    # the plain per-example loss that includes the ridge term
    x, y = _logistic_data(300, seed=5)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    l2 = 0.05
    penalty = jnp.asarray([0.0] + [l2] * DIM)

    def ridge_loss(params, xi, yi):
        return LOGISTIC.loss(params, xi, yi) + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    params = _mle(x, y)
    glm = dict(design=LOGISTIC.design, margin_loss=LOGISTIC.margin_loss, penalty=penalty)
    for q in (uniform(step=0.4), uniform(bits=3)):
        fast, n_fast = ptq_loss(q, ridge_loss, params, xj, yj, **glm)
        slow, n_slow = ptq_loss(q, ridge_loss, params, xj, yj)
        assert int(n_fast) == int(n_slow)
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        moves = competitors(q, fast, params)
        d_fast = loss_differences(ridge_loss, fast, moves, xj, yj, **glm)
        d_slow = loss_differences(ridge_loss, fast, moves, xj, yj)
        np.testing.assert_allclose(np.asarray(d_fast), np.asarray(d_slow), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="penalty"):
        ptq_loss(uniform(bits=3), ridge_loss, params, xj, yj, penalty=penalty)


def test_loss_differences_taylor():
    # exact for a quadratic loss
    problem = gaussian_mean(mu=[0.3, -0.4])
    x, y = problem.sample(jax.random.key(1), 64)
    params = {"mu": jnp.mean(x, axis=0)}
    q = uniform(step=0.25)
    release = ptq_rtn(q, params)
    moves = competitors(q, release, params)
    exact = loss_differences(problem.loss, release, moves, x, y)
    taylor = loss_differences(problem.loss, release, moves, x, y, method="taylor")
    np.testing.assert_allclose(np.asarray(taylor), np.asarray(exact), rtol=1e-10, atol=1e-12)
    # logistic, step e: |error| <= e^2 / 2 * |h_jj(z) - mean h_jj| + O(e^3) <= e^2 / 2 * (max_z h_jj(z) + mean)
    xl, yl = _logistic_data(200, seed=5)
    params = _mle(xl, yl)
    e = 0.01
    q = uniform(step=e)
    release = ptq_rtn(q, params)
    moves = competitors(q, release, params)
    exact = np.asarray(loss_differences(LOGISTIC.loss, release, moves, jnp.asarray(xl), jnp.asarray(yl)))
    taylor = np.asarray(
        loss_differences(LOGISTIC.loss, release, moves, jnp.asarray(xl), jnp.asarray(yl), method="taylor")
    )
    design = np.column_stack([np.ones(len(yl)), xl])
    h_max = 0.25 * np.max(design**2, axis=0)[np.asarray(moves.index)]
    bound = 0.5 * e**2 * (2 * h_max)[:, None] + e**3
    assert np.all(np.abs(taylor - exact) <= bound)
    assert np.max(np.abs(exact)) > 100 * np.max(np.abs(taylor - exact))  # the bound is not vacuous


@pytest.mark.parametrize("q", [uniform(bits=3), ternary(), uniform(step=0.3)], ids=["int3", "ternary", "grid"])
def test_rtn_margins_delta_method_against_finite_differences(q):
    rng = np.random.default_rng(7)
    w = rng.normal(size=6)
    params = {"w": jnp.asarray(w)}
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    m, s, valid = rtn_margins(q, params, jnp.asarray(cov), chunk_size=5)

    @jax.jit
    def g_jax(v):
        lo, up = q.thresholds(v)
        return jnp.stack([v - lo, up - v], axis=-1).reshape(-1)

    def g(v):
        return np.asarray(g_jax(jnp.asarray(v)))

    eps = 1e-6
    with np.errstate(invalid="ignore"):  # inf - inf where no threshold exists (those rows are not compared)
        jac = np.stack([(g(w + eps * e) - g(w - eps * e)) / (2 * eps) for e in np.eye(6)], axis=1)  # (K, p)
    ok = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(m)[ok], g(w)[ok], rtol=1e-12)
    s_fd = np.sqrt(np.einsum("kp,pq,kq->k", jac[ok], cov, jac[ok]))
    np.testing.assert_allclose(np.asarray(s)[ok], s_fd, rtol=1e-6)
    assert np.all(np.isnan(np.asarray(m)[~ok]))
    # a (p,) covariance is read as a diagonal
    _, s_diag, _ = rtn_margins(q, params, jnp.asarray(np.diag(cov)))
    _, s_full, _ = rtn_margins(q, params, jnp.asarray(np.diag(np.diag(cov))))
    np.testing.assert_allclose(np.asarray(s_diag)[ok], np.asarray(s_full)[ok], rtol=1e-12)


def test_rtn_differences_mean_and_spread_match_margins():
    x, y = _logistic_data(300, seed=8)
    params = _mle(x, y)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    q = uniform(bits=4)
    D, valid = rtn_differences(q, LOGISTIC.loss, params, xj, yj)
    cov = sandwich_covariance(LOGISTIC.loss, params, xj, yj)
    m, s, valid_m = rtn_margins(q, params, cov)
    assert valid.tolist() == valid_m.tolist()
    delta, sigma = gap_stats(D, valid)
    # at the MLE the mean gradient vanishes: mean D_k = m_k, and sd D_k = s_k (same sandwich)
    ok = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(delta)[ok], np.asarray(m)[ok], rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(np.asarray(sigma)[ok], np.asarray(s)[ok], rtol=1e-7)


def test_validation_errors():
    problem = gaussian_mean(mu=[0.0, 1.0])
    x, y = problem.sample(jax.random.key(0), 8)
    params = {"mu": jnp.mean(x, axis=0)}
    q = uniform(step=1.0)
    moves = competitors(q, ptq_rtn(q, params), params)
    with pytest.raises(ValueError, match="exact"):
        loss_differences(problem.loss, params, moves, x, y, method="cubic")
    with pytest.raises(ValueError, match="cov"):
        rtn_margins(q, params, jnp.eye(3))
    with pytest.raises(ValueError, match="chunk_size"):
        loss_differences(problem.loss, params, moves, x, y, chunk_size=0)
    with pytest.raises(ValueError, match="key"):
        ptq_loss(uniform(bits=4, rounding="stochastic"), problem.loss, params, x, y)
    with pytest.raises(ValueError, match="events"):
        rtn_margins(q, params, jnp.eye(2), events="element")
    with pytest.raises(ValueError, match="events"):
        rtn_differences(q, problem.loss, params, x, y, events="element")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int2", "sign", "ternary_s33", "int4_stochastic"])
def test_batched_loss_ptq_gives_the_releases_of_one_model_at_a_time(name):
    """ptq_loss_batched (settled models leave the batch) against ptq_loss run on each model alone: same releases
    and move counts, on 40 models whose sweep counts differ (so the batch is compacted twice)."""
    from qmis_jax.indicator import ptq_loss_batched
    from qmis_jax.quantizers import get

    q, r, n = get(name), 40, 150
    data = [_logistic_data(n, seed) for seed in range(r)]
    x = jnp.asarray(np.stack([d[0] for d in data]))
    y = jnp.asarray(np.stack([d[1] for d in data]))
    params = {"b": jnp.asarray(BETA[:1] + 0.01 * np.arange(r)[:, None]), "w": jnp.asarray(np.tile(BETA[1:], (r, 1)))}
    keys = jax.random.split(jax.random.key(3), r)
    glm = dict(design=LOGISTIC.design, margin_loss=LOGISTIC.margin_loss)
    releases, moves = ptq_loss_batched(q, LOGISTIC.loss, params, x, y, keys=keys, **glm)
    flat_params = jax.vmap(lambda p: ravel_pytree(p)[0])(params)
    flat_releases = jax.vmap(lambda p: ravel_pytree(p)[0])(releases)
    unravel = ravel_pytree(jax.tree.map(lambda a: a[0], params))[1]
    for i in range(r):
        alone, m = ptq_loss(q, LOGISTIC.loss, unravel(flat_params[i]), x[i], y[i], key=keys[i], **glm)
        assert int(moves[i]) == int(m), i
        np.testing.assert_array_equal(ravel_pytree(alone)[0], flat_releases[i])
    assert len(set(np.asarray(moves).tolist())) > 2  # the models needed different numbers of moves
    with pytest.raises(ValueError, match="keys"):
        ptq_loss_batched(get("int4_stochastic"), LOGISTIC.loss, params, x, y, **glm)
    with pytest.raises(ValueError, match=r"\(R, n\)"):
        ptq_loss_batched(q, LOGISTIC.loss, params, x[0], y[0], keys=keys, **glm)
    with pytest.raises(ValueError, match="unknown option.*sweeps"):
        ptq_loss_batched(q, LOGISTIC.loss, params, x, y, keys=keys, sweeps=3, **glm)
