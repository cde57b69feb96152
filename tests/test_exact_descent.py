"""Tests of the exact loss-PTQ flip probability in the Gaussian limit (theory.md sections 2, 3(a) and 5).

- 1-D Gaussian mean on a unit grid: loss PTQ releases ``round(xbar)``, so the flip probability is
  ``P(xbar > 1/2) + P(xbar < -1/2)`` with ``xbar ~ N(0.3, 1/n)`` in closed form.
- The simulated descent against ``ptq_loss`` itself on real data sets (the same release from the same ``L_n``).
- Logistic regression with correlated coordinates (d = 2, 3 and 5, so p = 3, 4 and 6): the flip probability against
  a Monte Carlo of real training and release on fresh data, within 4 combined standard errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import norm

import qmis_jax as qj
from qmis_jax.indicator import LossPtqFlip, loss_ptq_flip_exact, ptq_loss_batched
from qmis_jax.indicator.exact import _box_points, _descend


def _theta_star(problem):
    """``theta*`` in closed form where the problem has it, else the ERM of a large fresh sample."""
    if problem.population is not None:
        return problem.population(None)
    x, y = problem.sample(jax.random.key(2024), 1 << 20)
    fit = qj.train.fit_data(jax.random.key(2025), problem, x[None], y[None])
    return jax.tree.map(lambda a: a[0], fit.params)


def _trained_releases(key, problem, q, n, replicates):
    """Flat loss-PTQ releases, their round-to-nearest starts (grid indices) and the data of ``replicates`` models
    trained on fresh data sets of size ``n``."""
    fit = qj.train.fit_fresh(key, problem, n=n, replicates=replicates)
    assert bool(np.all(fit.converged))
    x, y = qj.train.replicate_data(key, problem, n=n, index=np.arange(replicates))
    rel, _ = ptq_loss_batched(q, problem.loss, fit.params, x, y, design=problem.design, margin_loss=problem.margin_loss)
    flat = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(rel))
    theta_hat = jax.vmap(lambda p: ravel_pytree(p)[0])(fit.params)
    start = np.rint(np.asarray(jax.vmap(q)(theta_hat)) / q.step).astype(np.int64)
    return np.rint(flat / q.step).astype(np.int64), start, x, y


def _monte_carlo_flip(key, problem, q, n, replicates, release):
    idx, *_ = _trained_releases(key, problem, q, n, replicates)
    flip = float(np.mean(np.any(idx != np.rint(release / q.step).astype(np.int64)[None, :], axis=1)))
    return flip, math.sqrt(flip * (1.0 - flip) / replicates)


def _agree(exact: LossPtqFlip, mc: float, mc_se: float) -> None:
    """The Monte Carlo flip lies within 4 combined standard errors of ``[flip - left_box, flip]`` (the flip of the
    Gaussian limit when the draws that left the box are all flips, or none)."""
    assert exact.left_box < 0.005
    gap = max(exact.flip - exact.left_box - mc, mc - exact.flip, 0.0)
    assert gap <= 4.0 * math.hypot(exact.se, mc_se), (exact, mc, mc_se)


@pytest.mark.parametrize("n, draws", [(100, 20_000), (300, 200_000)])
def test_gaussian_mean_flip_is_the_closed_form(n, draws):
    problem = qj.problems.gaussian_mean(mu=[0.3])
    res = loss_ptq_flip_exact(
        jax.random.key(n), problem, qj.quantizers.uniform(step=1.0), problem.population(None), n=n, draws=draws
    )
    exact = norm.sf(0.2 * math.sqrt(n)) + norm.cdf(-0.8 * math.sqrt(n))
    assert abs(res.flip - exact) <= 4.0 * math.sqrt(exact * (1.0 - exact) / draws)
    # a separable quadratic: the descent never leaves round-to-nearest (section 3, last paragraph)
    assert res.flip == res.flip_rtn
    assert res.left_box == 0.0 and res.sweeps_capped == 0.0
    assert res.release.tolist() == [0.0] and res.release_rtn.tolist() == [0.0]
    assert res.points == 5 and res.draws == draws


def test_box_points_are_those_a_descent_inside_the_box_can_reach():
    grid = _box_points(3, 2)
    assert grid.offsets.shape == (81, 3)  # 27 positions + 6 * 9 single-coordinate neighbours
    assert np.all(np.sum(np.abs(grid.offsets) == 2, axis=1) <= 1)
    assert np.all(grid.lookup[(grid.offsets + 2) @ grid.strides] == np.arange(81))
    assert _box_points(6, 2).offsets.shape[0] == 3**6 + 12 * 3**5


def test_descent_rules_ties_go_down_and_edges_are_flagged():
    grid = _box_points(1, 2)  # offsets -2..2 in order
    values = np.array(
        [
            [5.0, 1.0, 2.0, 1.0, 5.0],  # a tie from the centre: the lower level wins
            [9.0, 3.0, 2.0, 1.0, 0.0],  # wants to go up past the box
            [9.0, 3.0, 2.0, 1.0, 1.5],  # one move up, then a local minimum
            [0.0, 0.0, 0.0, 0.0, 0.0],  # flat: no strict decrease, no move
        ]
    )
    final, left, capped = _descend(values, np.zeros((4, 1), np.int64), grid, 16)
    assert final[:, 0].tolist() == [-1, 2, 1, 0]  # the flagged descent stops where it needed offset 3
    assert left.tolist() == [False, True, False, False]
    assert not capped.any()
    final, left, capped = _descend(values[1:2], np.zeros((1, 1), np.int64), grid, 1)  # one sweep: still moving
    assert final[0, 0] == 1 and not left[0] and capped[0]


def test_simulated_descent_is_ptq_loss_on_real_data():
    """The descent run on ``L_n`` at the box points releases what ``ptq_loss`` releases on the same data."""
    problem = qj.problems.logistic_mixture(dim=3)
    q = qj.quantizers.uniform(step=0.75)
    theta, _ = ravel_pytree(_theta_star(problem))
    idx, start, x, y = _trained_releases(jax.random.key(5), problem, q, 1000, 96)
    grid = _box_points(theta.size, 2)
    centre = np.rint(np.asarray(q(theta)) / q.step).astype(np.int64)
    points = q.step * jnp.asarray(centre[None, :] + grid.offsets, theta.dtype)

    def mean_losses(xr, yr):
        eta = problem.design(xr) @ points.T
        return jnp.mean(problem.margin_loss(eta, jnp.broadcast_to(yr[:, None], eta.shape)).astype(jnp.float32), axis=0)

    values = np.asarray(jax.lax.map(lambda d: mean_losses(*d), (x, y)), np.float64)
    final, left, capped = _descend(values, start - centre[None, :], grid, 16)
    assert np.mean(left) < 0.1 and not capped.any()
    assert np.array_equal(final[~left] + centre[None, :], idx[~left])
    assert np.sum(np.any(idx != start, axis=1)) >= 10  # the descent moved in many of them


def test_validation():
    problem = qj.problems.gaussian_mean(mu=[0.3])
    star = problem.population(None)
    key = jax.random.key(0)
    grid = qj.quantizers.uniform(step=1.0)
    for bad in (qj.quantizers.uniform(bits=4), "ternary", "fp32"):
        with pytest.raises(ValueError, match="q must be a fixed-step grid"):
            loss_ptq_flip_exact(key, problem, bad, star, n=100)
    with pytest.raises(ValueError, match="round to nearest"):
        loss_ptq_flip_exact(key, problem, qj.quantizers.uniform(step=1.0, rounding="stochastic"), star, n=100)
    with pytest.raises(ValueError, match="key must be"):
        loss_ptq_flip_exact(0, problem, grid, star, n=100)
    for name, value in (("n", 0), ("draws", -1), ("box", 0), ("sample_size", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be"):
            loss_ptq_flip_exact(key, problem, grid, star, **{"n": 100, name: value})
    with pytest.raises(ValueError, match="max_sweeps"):
        loss_ptq_flip_exact(key, problem, grid, star, n=100, max_sweeps=-1)
    with pytest.raises(ValueError, match="sample_size must exceed"):
        loss_ptq_flip_exact(key, problem, grid, star, n=100, sample_size=5)
    wide = qj.problems.gaussian_mean(mu=np.zeros(7))
    with pytest.raises(ValueError, match="theta_star must have 1..6 parameters"):
        loss_ptq_flip_exact(key, wide, grid, wide.population(None), n=100)
    six = qj.problems.gaussian_mean(mu=np.zeros(6))
    with pytest.raises(ValueError, match="lower box"):
        loss_ptq_flip_exact(key, six, grid, six.population(None), n=100, box=3)


def test_logistic_d2_flip_is_the_theory_value():
    """theory.md section 3(a): logistic d = 2, step 0.5, n = 1950: the population start (0, 1.5, -2) descends to
    theta_0 = (0, 2, -2), and the exact enumeration gives a flip probability of about 0.316."""
    problem = qj.problems.logistic_mixture(dim=2)
    res = loss_ptq_flip_exact(jax.random.key(1), problem, qj.quantizers.uniform(step=0.5), _theta_star(problem), n=1950)
    assert res.release.tolist() == [0.0, 2.0, -2.0]
    assert res.release_rtn.tolist() == [0.0, 1.5, -2.0]
    assert res.left_box == 0.0 and res.points == 81
    assert abs(res.flip - 0.316) <= 0.02
    assert res.flip_rtn > res.flip + 0.1  # most start events descend back to theta_0


@pytest.mark.slow
def test_logistic_d2_flip_matches_training():
    problem = qj.problems.logistic_mixture(dim=2)
    q = qj.quantizers.uniform(step=0.5)
    res = loss_ptq_flip_exact(jax.random.key(2), problem, q, _theta_star(problem), n=1950)
    mc, mc_se = _monte_carlo_flip(jax.random.key(3), problem, q, 1950, 1000, res.release)
    _agree(res, mc, mc_se)


@pytest.mark.slow
def test_logistic_d3_flip_matches_training():
    """p = 4, step 0.75, n = 1000: the population descent moves (theta_0 is not Q(theta*)) and start events,
    path decisions and correlated coordinates all matter (flip about 0.39, round-to-nearest about 0.24)."""
    problem = qj.problems.logistic_mixture(dim=3)
    q = qj.quantizers.uniform(step=0.75)
    res = loss_ptq_flip_exact(jax.random.key(4), problem, q, _theta_star(problem), n=1000)
    assert not np.array_equal(res.release, res.release_rtn)
    assert 0.05 < res.flip < 0.9
    mc, mc_se = _monte_carlo_flip(jax.random.key(5), problem, q, 1000, 1000, res.release)
    _agree(res, mc, mc_se)


@pytest.mark.slow
def test_logistic_d5_flip_matches_training():
    """p = 6 (the largest the check takes), step 0.5, n = 2000: 3645 codebook points."""
    problem = qj.problems.logistic_mixture(dim=5)
    q = qj.quantizers.uniform(step=0.5)
    res = loss_ptq_flip_exact(jax.random.key(6), problem, q, _theta_star(problem), n=2000, sample_size=100_000)
    assert res.points == 3645 and 0.05 < res.flip < 0.9
    mc, mc_se = _monte_carlo_flip(jax.random.key(7), problem, q, 2000, 1000, res.release)
    _agree(res, mc, mc_se)
