"""The indicator sees the whole release: continuous parts, scale events, sparse-ternary support (theory.md
section 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qmis_jax.indicator.estimate import population_indicator, single_model_indicator, single_model_indicator_batched
from qmis_jax.indicator.margins import rtn_margins, scale_margins
from qmis_jax.problems import gaussian_mean, logistic_mixture
from qmis_jax.quantizers import get, is_continuous
from qmis_jax.train import fit

pytestmark = pytest.mark.slow  # the release model on every preset and scale format


@pytest.fixture(autouse=True, scope="module")
def x64():
    with jax.enable_x64(True):
        yield


LOGISTIC = logistic_mixture(dim=6, k_modes=2)  # params {"b": (1,), "w": (6, 1)}: a model with a bias


@pytest.fixture(scope="module")
def logistic_fit():
    x, y = LOGISTIC.sample(jax.random.key(3), 3000)
    params = jax.tree.map(lambda a: a[0], fit(jax.random.key(4), LOGISTIC, x, y, weights=jnp.ones((1, 3000))).params)
    return params, x, y


@pytest.mark.parametrize(
    ("name", "skip", "continuous"),
    [
        ("int4", None, True),  # float32 absmax scales, the bias's scale is the bias itself
        ("sign", None, True),
        ("ternary_s90", None, True),
        ("fp8_e4m3", None, True),
        ("fp32", None, True),
        ("prune50", None, True),
        ("int4@e8m0", ("b",), True),  # the skipped bias is published in float32
        ("int4@e8m0", None, False),
        ("sign@e8m0", None, False),
        ("ternary@bf16", None, False),
    ],
)
def test_continuous_releases_have_r_zero(logistic_fit, name, skip, continuous):
    params, x, y = logistic_fit
    assert is_continuous(name, params, skip=skip) == continuous
    pop = population_indicator(name, LOGISTIC, params, x, y, n=300, skip=skip)
    single = single_model_indicator(name, LOGISTIC, params, x[:300], y[:300], skip=skip, ptq="rtn")
    assert pop.continuous == continuous
    if continuous:
        assert float(pop.r) == 0.0 and float(single.r_hat) == 0.0 and not bool(pop.applicable)
        assert np.isnan(float(pop.mis_asymptotic))
    else:
        assert float(pop.r) > 0 and float(single.r_hat) > 0 and float(pop.r) == float(pop.r_codes)


def test_one_element_leaf_is_continuous_under_f32_and_discrete_under_e8m0():
    problem = gaussian_mean(mu=[1.85])
    x, y = problem.sample(jax.random.key(0), 20_000)
    star = {"mu": jnp.array([1.85])}
    f32 = population_indicator("int4", problem, star, x, y, n=100)
    assert f32.continuous and float(f32.r) == 0.0 and float(f32.r_codes) > 0
    e8 = population_indicator("int4@e8m0", problem, star, x, y, n=100)
    # closed form: the nearest cell boundary is the binade edge 2 (the scale code rises): r = 0.15^2 / 2
    assert float(e8.r) == pytest.approx(0.15**2 / 2, rel=0.05)


def test_scale_events_closed_forms():
    # int4@e8m0 on (1.85, -0.4): scale 2^(0 - 2); events of section 9 with sd sqrt(Sigma_jj)
    params = {"mu": jnp.array([1.85, -0.4])}
    cov = jnp.array([[4.0, 0.5], [0.5, 1.0]])
    m, s, valid = scale_margins("int4@e8m0", params, cov)
    np.testing.assert_allclose(m[valid], [2 - 1.85, 1.85 - 1.0, 2 - 0.4])
    np.testing.assert_allclose(s[valid], [2.0, 2.0, 1.0])
    np.testing.assert_array_equal(valid, [True, True, True, False])  # falling: the argmax only
    # RTN: the element events come first, with fixed thresholds given the scale (sd sqrt(Sigma_jj), no delta
    # method through the scale), then the scale events
    m_all, s_all, v_all = rtn_margins("int4@e8m0", params, cov)
    assert m_all.shape == (8,)
    # 1.85 -> 7 X = 1.75 (top level, no upper threshold), -0.4 -> -2 X = -0.5 between -0.625 and -0.375
    np.testing.assert_allclose(m_all[:4][v_all[:4]], [1.85 - 1.625, 0.625 - 0.4, 0.4 - 0.375])
    np.testing.assert_allclose(s_all[:4][v_all[:4]], [2.0, 1.0, 1.0])
    np.testing.assert_allclose(m_all[4:], m)
    # absmean (sign@e8m0): mean|mu| = 1.125 -> 2^0, boundaries 2^-1/2, 2^1/2, s^2 = grad^T Sigma grad, grad = sign/2
    m, s, _ = scale_margins("sign@e8m0", params, cov)
    g = np.array([0.5, -0.5])
    np.testing.assert_allclose(m, [1.125 - 2**-0.5, 2**0.5 - 1.125])
    np.testing.assert_allclose(s, np.sqrt(g @ np.asarray(cov) @ g))


def test_sparse_ternary_support_events_have_no_spurious_tie():
    # size 11 with s = 0.9: (p - 1) s = 9 is an integer (an interpolated quantile would sit on an element);
    # k = round(1.1) = 1 kept entry. A one-element leaf with s = 0.33 keeps it (sign event at 0).
    w = jnp.array([0.3, -1.2, 0.5, 0.05, -0.7, 0.9, 0.1, -0.2, 0.4, 0.6, -0.8])
    params = {"a": w, "c": jnp.array([-0.6])}
    cov = jnp.diag(jnp.linspace(1.0, 2.0, 12))
    m, s, valid = rtn_margins("ternary_s90", params, cov)
    assert np.all(np.asarray(m)[np.asarray(valid)] > 0)
    # kept -1.2 leaves when |w_1| drops below the largest dropped |w_5| = 0.9: margin 0.3, s^2 = Sigma_11 + Sigma_55
    d = np.asarray(cov).diagonal()
    mm, ss = np.asarray(m).reshape(12, 2), np.asarray(s).reshape(12, 2)
    assert mm[1, 1] == pytest.approx(0.3) and ss[1, 1] == pytest.approx(np.sqrt(d[1] + d[5]))
    # dropped 0.9 enters above the smallest kept magnitude 1.2
    assert mm[5, 1] == pytest.approx(0.3) and ss[5, 1] == pytest.approx(np.sqrt(d[1] + d[5]))
    m33, _, v33 = rtn_margins("ternary_s33", {"c": jnp.array([-0.6])}, jnp.eye(1))
    np.testing.assert_allclose(np.asarray(m33)[np.asarray(v33)], [0.6])


@pytest.mark.parametrize("name", ["ternary_s90", "ternary_s33", "ternary_s90@e8m0"])
def test_sparse_ternary_keeps_its_count_in_every_release(name):
    problem = logistic_mixture(dim=15, k_modes=2)
    pool_x, pool_y = problem.sample(jax.random.key(5), 1200)
    w = (jax.random.uniform(jax.random.key(6), (6, 1200)) < 1 / 6).astype(pool_x.dtype)
    params = fit(jax.random.key(7), problem, pool_x, pool_y, weights=w).params
    q = get(name)
    # k = round((1 - s) size), halves up: 1.5 -> 2 for ternary_s90 on 15 entries, 0.1 -> 0 on the bias
    expected = {"b": {0.9: 0, 0.33: 1}[q.sparsity], "w": {0.9: 2, 0.33: 10}[q.sparsity]}
    for ptq in ("loss", "rtn"):
        out = single_model_indicator_batched(q, problem, params, pool_x, pool_y, weights=w, ptq=ptq)
        for leaf in ("b", "w"):
            counts = np.count_nonzero(np.asarray(out.release[leaf]).reshape(6, -1), axis=1)
            np.testing.assert_array_equal(counts, expected[leaf])
        if ptq == "loss":
            # a local minimiser over flips and swaps on its own training data: no competitor lowers the loss
            d = np.asarray(out.delta)[:, : 2 * 16]
            v = np.asarray(out.valid)[:, : 2 * 16]
            assert np.all(d[v] >= -1e-12)
