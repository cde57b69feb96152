"""Tests of qmis_jax.attacks.roc: convex-hull AUC, TPR at a fixed FPR, epsilon lower bounds."""

import doctest
import importlib
import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial import ConvexHull
from sklearn.metrics import roc_auc_score

from qmis_jax.attacks.roc import auc_convex_hull, epsilon_lower_bound, roc_convex_hull, tpr_at_fpr


def _random_scores(rng, case):
    m = rng.normal(0.6, 1.0, size=int(rng.integers(1, 400)))
    nm = rng.normal(0.0, 1.3, size=int(rng.integers(1, 400)))
    if case % 3 == 0:  # many ties
        m, nm = np.round(2 * m) / 2, np.round(2 * nm) / 2
    if case % 4 == 1:  # ROC mostly below the diagonal
        m = -m
    return m, nm


def _roc_points(m, nm):
    thr = np.r_[np.inf, np.unique(np.r_[m, nm])]
    return np.array([np.mean(nm >= t) for t in thr]), np.array([np.mean(m >= t) for t in thr])


@pytest.mark.parametrize("case", range(8))
def test_auc_convex_hull_matches_scipy_hull(case):
    rng = np.random.default_rng(case)
    m, nm = _random_scores(rng, case)
    fpr, tpr = _roc_points(m, nm)
    # hull of the ROC points and (1, 0): its lower chain is (0,0)-(1,0)-(1,1), so its area is that under the upper
    pts = np.unique(np.c_[np.r_[fpr, 1.0], np.r_[tpr, 0.0]], axis=0)
    ref = ConvexHull(pts).volume
    assert auc_convex_hull(m, nm) == pytest.approx(ref, abs=1e-12)
    labels = np.r_[np.ones(m.size), np.zeros(nm.size)]
    assert auc_convex_hull(m, nm) >= max(0.5, roc_auc_score(labels, np.r_[m, nm])) - 1e-12
    hf, ht = roc_convex_hull(m, nm)
    assert hf[0] == 0 and ht[0] == 0 and hf[-1] == 1 and ht[-1] == 1
    assert np.all(np.diff(hf) >= 0)


def test_auc_convex_hull_separated_and_null():
    assert auc_convex_hull([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auc_convex_hull([0.0, 1.0], [2.0, 3.0]) == 0.5  # the rule "higher = member" is fixed
    assert auc_convex_hull([1.0, 1.0], [1.0]) == 0.5


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.1, 0.37, 1.0])
def test_tpr_at_fpr_deterministic_brute_force(alpha):
    rng = np.random.default_rng(7)
    for case in range(6):
        m, nm = _random_scores(rng, case)
        fpr, tpr = _roc_points(m, nm)
        ref = tpr[fpr <= alpha + 1e-12].max()
        assert tpr_at_fpr(m, nm, fpr=alpha) == pytest.approx(ref, abs=1e-12)
    # at 0% FPR: the members above every non-member
    m, nm = rng.normal(1, 1, 500), rng.normal(0, 1, 700)
    assert tpr_at_fpr(m, nm, fpr=0.0) == np.mean(m > nm.max())
    assert tpr_at_fpr(m, nm, fpr=0.0, randomized=True) == np.mean(m > nm.max())


def test_tpr_at_fpr_randomized_is_hull_interpolation():
    rng = np.random.default_rng(3)
    m, nm = _random_scores(rng, 0)
    hf, ht = roc_convex_hull(m, nm)
    grid = np.linspace(0, 1, 101)
    got = tpr_at_fpr(m, nm, fpr=grid, randomized=True)
    assert got.shape == grid.shape
    # concave hull above every deterministic point
    det = tpr_at_fpr(m, nm, fpr=grid)
    assert np.all(got >= det - 1e-12)
    mid = 0.5 * (hf[1:] + hf[:-1])
    np.testing.assert_allclose(tpr_at_fpr(m, nm, fpr=mid, randomized=True), 0.5 * (ht[1:] + ht[:-1]), atol=1e-12)
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(m, nm, fpr=1.5)


def test_jax_privacy_auditor_agrees():
    auditing = pytest.importorskip("jax_privacy.auditing")
    rng = np.random.default_rng(11)
    for case in range(10):
        m, nm = _random_scores(rng, case)
        aud = auditing.CanaryScoreAuditor(m, nm)
        assert abs(float(aud.attack_auroc()) - auc_convex_hull(m, nm)) < 1e-9
        grid = np.array([0.0, 0.001, 0.01, 0.1, 0.5, 1.0])
        np.testing.assert_allclose(aud.tpr_at_given_fpr(grid), tpr_at_fpr(m, nm, fpr=grid, randomized=True), atol=1e-9)


def test_epsilon_lower_bound_closed_form():
    tp, n_m, fp, n_n, level, delta = 400, 1000, 20, 2000, 0.9, 1e-3
    b = epsilon_lower_bound(tp / n_m, fp / n_n, n_members=n_m, n_nonmembers=n_n, delta=delta, level=level)
    a = (1 - level) / 2
    tpr_lo = sps.beta.ppf(a, tp, n_m - tp + 1)
    fpr_hi = sps.beta.ppf(1 - a, fp + 1, n_n - fp)
    ref = max(math.log((tpr_lo - delta) / fpr_hi), math.log((1 - fpr_hi - delta) / (1 - tpr_lo)), 0.0)
    assert b.tpr_lo == pytest.approx(tpr_lo, rel=1e-10)
    assert b.fpr_hi == pytest.approx(fpr_hi, rel=1e-10)
    assert b.epsilon == pytest.approx(ref, rel=1e-10)
    assert b.epsilon_point == pytest.approx(math.log((0.4 - delta) / 0.01), rel=1e-12)
    # high TPR at a high FPR: the bound comes through (1 - FPR) / (1 - TPR) (true negatives vs false negatives)
    c = epsilon_lower_bound(0.99, 0.6, n_members=1000, n_nonmembers=1000)
    assert c.epsilon == pytest.approx(math.log((1 - c.fpr_hi) / (1 - c.tpr_lo)), rel=1e-10) and c.epsilon > 0
    # nothing shown
    assert epsilon_lower_bound(0.0, 0.0, n_members=10, n_nonmembers=10).epsilon == 0.0
    with pytest.raises(ValueError, match="tpr"):
        epsilon_lower_bound(0.33, 0.1, n_members=10, n_nonmembers=10)
    with pytest.raises(ValueError, match="n_members"):
        epsilon_lower_bound(0.3, 0.1, n_members=0, n_nonmembers=10)


def test_epsilon_lower_bound_covers_randomized_response():
    """Randomised response with eps0 is exactly eps0-DP (TPR = e^eps0 / (1 + e^eps0) = 1 - FPR): the 95% bound
    must stay below eps0 in at least 95% of runs (tolerance: 3 binomial standard errors of 2000 runs)."""
    eps0, n, runs = 1.0, 500, 2000
    p = math.exp(eps0) / (1 + math.exp(eps0))
    rng = np.random.default_rng(5)
    tps = rng.binomial(n, p, runs)
    fps = rng.binomial(n, 1 - p, runs)
    bounds = np.array(
        [epsilon_lower_bound(t / n, f / n, n_members=n, n_nonmembers=n).epsilon for t, f in zip(tps, fps)]
    )
    miss = np.mean(bounds > eps0)
    assert miss <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)
    # and it is informative: the median bound is within 40% of eps0 at n = 500
    assert np.median(bounds) > 0.6 * eps0


def test_docstring_examples():
    result = doctest.testmod(importlib.import_module("qmis_jax.attacks.roc"), verbose=False)
    assert result.failed == 0 and result.attempted >= 1
