"""Hypothesis property tests of qmis_jax.stats: sandwich covariances, rates and the indicator, attack metrics, the
LOSS and LiRA attacks, and the scale equivariance of absmax codebooks for any c > 0.

Every property is an identity of the mathematics (theory.md sections 2, 4 and 7), checked on drawn inputs against a
NumPy reference or a transformed call. Shapes are fixed so that each jitted function compiles once; parameters that
a property varies (a loss scale, a reparametrisation) travel in the data columns for the same reason. Runs are
derandomized (fixed examples).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmis_jax.quantizers as Q
from qmis_jax import attacks, indicator

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------------------------------
# Sandwich covariance (theory.md section 2)
# ----------------------------------------------------------------------------------------------------------------
N, D = 40, 3
P = D + 1


def scaled_logistic(theta_or_phi, xi, yi):
    """``c * logistic(a * phi)``: the features are ``xi[:D]``, the loss scale ``c = xi[D]`` and the coordinate
    scales ``a = xi[D + 1:]`` ride along in the data columns (one compilation for every drawn c and a)."""
    feats, c, a = xi[:D], xi[D], xi[D + 1 :]
    theta = a * theta_or_phi
    eta = theta[0] + feats @ theta[1:]
    return c * (jnp.logaddexp(0.0, eta) - yi * eta)


def logistic_data(seed: int):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((N, D)) * rng.uniform(0.3, 3.0, D)
    theta = rng.normal(0.0, 0.7, P)
    y = (rng.random(N) < 1 / (1 + np.exp(-(theta[0] + feats @ theta[1:])))).astype(np.float64)
    return feats, y, theta


def with_columns(feats, c=1.0, a=None):
    a = np.ones(P) if a is None else a
    return np.column_stack([feats, np.full(N, c), np.tile(a, (N, 1))])


def sandwich(theta, x, y, weights=None):
    return np.asarray(indicator.sandwich_covariance(scaled_logistic, jnp.asarray(theta), x, y, weights=weights))


def x64(fn):
    """Run ``fn`` with 64-bit floats (the identities below are checked to 1e-8)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapped


@SETTINGS
@given(
    seed=seeds,
    c=st.floats(1e-2, 1e2),
    a=st.lists(st.floats(0.1, 10.0), min_size=P, max_size=P),
    signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=P, max_size=P),
)
@x64
def test_sandwich_is_psd_invariant_to_loss_scale_and_equivariant_to_rescaling(seed, c, a, signs):
    """Sigma = H^-1 V H^-1 is symmetric PSD; the loss times c scales H by c and V by c^2, so Sigma is unchanged;
    theta = a * phi (a diagonal change of coordinates) gives Sigma_phi = diag(1/a) Sigma_theta diag(1/a)."""
    feats, y, theta = logistic_data(seed)
    base = sandwich(theta, with_columns(feats), y)
    np.testing.assert_array_equal(base, base.T)
    eig = np.linalg.eigvalsh(base)
    assert eig.min() >= -1e-9 * eig.max() and eig.max() > 0

    np.testing.assert_allclose(sandwich(theta, with_columns(feats, c=c), y), base, rtol=1e-8, atol=1e-12)

    scale = np.asarray(a) * np.asarray(signs)
    phi = theta / scale
    expected = base / np.outer(scale, scale)
    np.testing.assert_allclose(sandwich(phi, with_columns(feats, a=scale), y), expected, rtol=1e-8, atol=1e-12)


@SETTINGS
@given(seed=seeds)
@x64
def test_sandwich_weights_are_counts_and_order_does_not_matter(seed):
    """Weight 1 on the first half and 0 on the second equals the first half written twice; permuting the
    examples changes nothing (the sandwich is built from means over examples)."""
    feats, y, theta = logistic_data(seed)
    half = N // 2
    twice = np.concatenate([feats[:half], feats[:half]])
    y_twice = np.concatenate([y[:half], y[:half]])
    w = np.r_[np.ones(half), np.zeros(N - half)]
    np.testing.assert_allclose(
        sandwich(theta, with_columns(feats), y, weights=w),
        sandwich(theta, with_columns(twice), y_twice),
        rtol=1e-9,
        atol=1e-12,
    )
    perm = np.random.default_rng(seed).permutation(N)
    np.testing.assert_allclose(
        sandwich(theta, with_columns(feats[perm]), y[perm]), sandwich(theta, with_columns(feats), y), rtol=1e-9
    )


# ----------------------------------------------------------------------------------------------------------------
# Rates and the indicator (theory.md section 4)
# ----------------------------------------------------------------------------------------------------------------
K = 6
gaps = st.lists(st.one_of(st.floats(-2.0, 2.0), st.just(0.0)), min_size=K, max_size=K)
sds = st.lists(st.one_of(st.floats(1e-3, 5.0), st.just(0.0)), min_size=K, max_size=K)
masks = st.lists(st.booleans(), min_size=K, max_size=K)


@SETTINGS
@given(delta=gaps, sigma=sds, valid=masks, k=st.floats(0.1, 10.0))
def test_gaussian_rates_and_indicator(delta, sigma, valid, k):
    """I_k = delta^2 / (2 sigma^2) >= 0 (0 where delta <= 0, inf where sigma = 0 < delta), unchanged when delta
    and sigma are scaled together; r = min of the valid rates (inf when none is valid, 0 for continuous
    releases), so r = 0 exactly when a valid gap is <= 0."""
    d, s, v = np.asarray(delta, np.float32), np.asarray(sigma, np.float32), np.asarray(valid)
    rates = np.asarray(indicator.gaussian_rate(d, s))
    assert rates.dtype == np.float32 and rates.shape == (K,)
    assert np.all(rates >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.where(d <= 0, 0.0, np.where(s > 0, d.astype(float) ** 2 / (2 * s.astype(float) ** 2), np.inf))
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    scaled = np.asarray(indicator.gaussian_rate(np.float32(k) * d, np.float32(k) * s))
    np.testing.assert_allclose(scaled, rates, rtol=1e-5)

    r = float(indicator.indicator(rates, v))
    assert r == (rates[v].min() if v.any() else np.inf)
    assert np.all(r <= rates[v])
    assert (r == 0.0) == bool(np.any(v & (d <= 0)))
    assert float(indicator.indicator(rates, v, continuous=True)) == 0.0


@SETTINGS
@given(seed=seeds, shift=st.floats(-1.0, 1.0), k=st.floats(0.1, 10.0))
@x64
def test_cramer_rates_are_nonnegative_capped_and_scale_free(seed, shift, k):
    """-min_{t >= 0} log mean exp(-t D) is >= 0, at most the cap log(m) (reached by a row without a negative
    sample), 0 when mean D <= 0, NaN for an invalid competitor, and unchanged when D is scaled by k > 0 (t absorbs
    k)."""
    rng = np.random.default_rng(seed)
    m = 30
    draws = rng.normal(shift, 1.0, (K, m)) * rng.uniform(0.1, 3.0, (K, 1))
    draws[0] = np.abs(draws[0])  # no sample below 0: the edge case of section 8
    valid = np.ones(K, bool)
    valid[-1] = False
    out = indicator.cramer_rate(draws, valid)
    rate = np.asarray(out.rate)
    assert np.isnan(rate[-1])
    live = rate[:-1]
    assert np.all(live >= 0) and np.all(live <= np.log(m) + 1e-12)
    assert live[0] == pytest.approx(np.log(m))
    means = draws[:-1].mean(axis=1)
    assert np.all(live[means <= 0] == 0)
    np.testing.assert_allclose(
        np.asarray(indicator.cramer_rate(k * draws, valid).rate)[:-1], live, rtol=1e-7, atol=1e-12
    )


# ----------------------------------------------------------------------------------------------------------------
# Attack metrics (theory.md section 7)
# ----------------------------------------------------------------------------------------------------------------
def score_lists(min_size=2, max_size=60):
    # scores on a grid of 0.1 so that ties are common and every transform below stays injective in float64
    return st.lists(st.integers(-50, 50), min_size=min_size, max_size=max_size).map(lambda v: np.asarray(v) / 10.0)


INCREASING = {
    "affine": lambda s: 3.0 * s - 7.0,
    "cubic": lambda s: s**3 + s,
    "exp": lambda s: np.exp(s / 2.0),
    "arctan": np.arctan,
}


def reference_metrics(m: np.ndarray, nm: np.ndarray) -> tuple[float, float]:
    """(advantage, AUC) by brute force: every threshold, every pair."""
    thresholds = np.r_[np.unique(np.r_[m, nm]), np.inf]
    tpr = (m[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (nm[None, :] >= thresholds[:, None]).mean(axis=1)
    auc = np.mean((m[:, None] > nm[None, :]) + 0.5 * (m[:, None] == nm[None, :]))
    return float(np.max(np.abs(tpr - fpr))), float(auc)


@SETTINGS
@given(m=score_lists(), nm=score_lists(), transform=st.sampled_from(sorted(INCREASING)))
def test_attack_metrics_bounds_symmetry_and_rank_invariance(m, nm, transform):
    """Advantage and AUC lie in [0, 1] and match brute force; swapping members and non-members keeps the
    advantage and maps AUC to 1 - AUC; a strictly increasing transform of the scores changes nothing."""
    res = attacks.attack_metrics(jax.random.key(0), m, nm)
    adv, auc = reference_metrics(m, nm)
    assert 0.0 <= res.advantage <= 1.0 and 0.0 <= res.auc <= 1.0
    assert res.advantage == pytest.approx(adv, abs=1e-12) and res.auc == pytest.approx(auc, abs=1e-12)
    lo, hi = res.advantage_ci
    assert 0.0 <= lo <= res.advantage <= hi <= 1.0
    assert -1.0 <= res.advantage_heldout <= 1.0

    swapped = attacks.attack_metrics(jax.random.key(0), nm, m)
    assert swapped.advantage == pytest.approx(res.advantage, abs=1e-12)
    assert swapped.auc == pytest.approx(1.0 - res.auc, abs=1e-12)

    g = INCREASING[transform]
    moved = attacks.attack_metrics(jax.random.key(0), g(m), g(nm))
    for field in ("advantage", "auc", "tpr_at_1pct_fpr", "advantage_heldout", "advantage_ci", "direction"):
        assert getattr(moved, field) == getattr(res, field), field


# ----------------------------------------------------------------------------------------------------------------
# LOSS and LiRA (theory.md section 7)
# ----------------------------------------------------------------------------------------------------------------
R, T, SHADOWS = 16, 8, 8
MEMBERSHIP = np.asarray(attacks.embedded_target_membership(jax.random.key(3), replicates=R, targets=T))
SHADOW = np.asarray(attacks.shadow_mask(R, shadows=SHADOWS))


@SETTINGS
@given(seed=seeds, dtype=st.sampled_from([np.float32, np.float64]))
def test_loss_attack_and_score_shapes_dtypes_and_order(seed, dtype):
    """LOSS scores are minus the losses, with their shapes and dtypes; LiRA's statistic is finite and strictly
    decreasing in the loss for the logistic loss."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(dtype == np.float64):
        member = rng.exponential(1.0, (5, 7)).astype(dtype)
        nonmember = rng.exponential(1.0, (5, 9)).astype(dtype)
        ms, ns = attacks.loss_attack(member, nonmember)
        assert ms.shape == (5, 7) and ns.shape == (5, 9)
        assert ms.dtype == dtype and ns.dtype == dtype
        np.testing.assert_array_equal(np.asarray(ms), -member)
        losses = np.sort(np.r_[0.0, rng.exponential(2.0, 20), 1e4]).astype(dtype)
        score = np.asarray(attacks.score_from_loss(losses, "binary"))
        assert score.dtype == dtype and score.shape == losses.shape and np.all(np.isfinite(score))
        distinct = np.r_[True, np.diff(losses) > 0]
        assert np.all(np.diff(score[distinct]) < 0)


@SETTINGS
@given(seed=seeds, a=st.floats(0.1, 10.0), b=st.floats(-5.0, 5.0), online=st.booleans())
def test_lira_shapes_and_affine_invariance(seed, a, b, online):
    """LiRA scores every (evaluation replicate, target) pair once, split by membership; its Gaussian fits make it
    invariant to any increasing affine map of the statistic."""
    scores = np.random.default_rng(seed).normal(size=(R, T)) + 0.5 * MEMBERSHIP
    m, nm, _ = attacks.lira(scores, MEMBERSHIP, shadow=SHADOW, online=online)
    evaluated = MEMBERSHIP[~SHADOW]
    assert m.ndim == 1 and nm.ndim == 1
    assert m.shape == (int(evaluated.sum()),) and nm.shape == (int((~evaluated).sum()),)
    assert jnp.issubdtype(m.dtype, jnp.floating) and m.dtype == nm.dtype
    assert np.all(np.isfinite(np.asarray(m))) and np.all(np.isfinite(np.asarray(nm)))
    m2, nm2, _ = attacks.lira(a * scores + b, MEMBERSHIP, shadow=SHADOW, online=online)
    np.testing.assert_allclose(np.asarray(m2), np.asarray(m), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nm2), np.asarray(nm), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Absmax codebooks: q(c w) = c q(w) for any c > 0, not only powers of two (tests/test_quantizers_properties.py)
# ----------------------------------------------------------------------------------------------------------------
ABSMAX = {"int8": 127, "int4": 7, "int2": 1, "int4_channel": 7}


@functools.partial(jax.jit, static_argnums=0)
def levels_and_codes(name: str, w):
    q = Q.get(name)
    value, lower, upper = q.levels(w)
    return value, lower, upper, q.codes(value, w)


@pytest.mark.parametrize("name", sorted(ABSMAX))
@SETTINGS
@given(seed=seeds, c=st.floats(1e-3, 1e3), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_absmax_levels_scale_with_the_weights(name, seed, c, scale):
    """Scaling the weights by c > 0 scales the absmax scale, the release and its neighbours by c and keeps the
    integer codes, except where w / s sits within float rounding of a rounding midpoint."""
    w = (np.random.default_rng(seed).standard_normal((48, 8)) * scale).astype(np.float32)
    cw = (np.float32(c) * w).astype(np.float32)
    base = [np.asarray(v) for v in levels_and_codes(name, jnp.asarray(w))]
    moved = [np.asarray(v) for v in levels_and_codes(name, jnp.asarray(cw))]
    axis = 0 if name.endswith("channel") else None
    s = np.abs(w.astype(np.float64)).max(axis=axis, keepdims=True) / ABSMAX[name]
    u = w / s
    near_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) < 1e-4
    keep = ~near_tie
    assert keep.mean() > 0.9
    np.testing.assert_array_equal(moved[3][keep], base[3][keep])
    for got, ref in zip(moved[:3], base[:3]):
        np.testing.assert_allclose(got[keep], np.float64(c) * ref[keep], rtol=4e-6, atol=0)
