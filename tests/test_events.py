"""The events of a loss-PTQ release (theory.md section 3(a)): the path, the starts that lead elsewhere, the scale
codes; the population's precision (section 6); ``r = 0`` where the population path is not known."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

import qmis_jax as qj
from qmis_jax.indicator import (
    EVENT_KINDS,
    competitors,
    descent_path,
    descent_path_batched,
    gap_stats,
    gaussian_rate,
    loss_differences,
    population_indicator,
    ptq_loss,
    ptq_loss_batched,
    single_model_indicator,
)
from qmis_jax.indicator.margins import scale_margins
from qmis_jax.indicator.sandwich import sandwich_covariance_flagged
from qmis_jax.problems import gaussian_mean, logistic_mixture
from qmis_jax.quantizers import get, uniform
from qmis_jax.studies.synthetic import VALIDATION_PROBLEM

VALIDATION = VALIDATION_PROBLEM

LOGISTIC3 = logistic_mixture(dim=2, k_modes=2, separation=2.0, scale=1.0, seed=1)
QUANTIZERS = ("grid", "int4@e8m0", "sign@e8m0", "ternary_s33")


def _q(name):
    return uniform(step=0.5) if name == "grid" else get(name)


def _glm(problem):
    return {"design": problem.design, "margin_loss": problem.margin_loss}


def _fit(problem, key, n):
    x, y = problem.sample(key, n)
    fit = qj.train.fit_data(key, problem, x[None], y[None])
    return jax.tree.map(lambda a: a[0], fit.params), x, y


def test_descent_path_is_the_release_of_ptq_loss():
    # the recorded descent is the same code: the same release, one model or a batch (settled ones leave the batch)
    params, x, y = _fit(LOGISTIC3, jax.random.key(0), 300)
    for name in QUANTIZERS:
        q = _q(name)
        release, moves = ptq_loss(q, LOGISTIC3.loss, params, x, y, **_glm(LOGISTIC3))
        path = descent_path(q, LOGISTIC3.loss, params, x, y, **_glm(LOGISTIC3))
        flat = jax.flatten_util.ravel_pytree(release)[0]
        np.testing.assert_array_equal(np.asarray(path.release), np.asarray(flat))
        assert int(path.moves) == int(moves) and bool(path.settled)
        # every accepted move is recorded: the count of accepted slots is the move count
        rec = path.records
        d_a = jnp.where(rec.a.valid, rec.a.d, jnp.inf)
        d_b = jnp.where(rec.b.valid, rec.b.d, jnp.inf)
        assert int(jnp.sum(jnp.minimum(d_a, d_b) < 0)) == int(moves)
    stacked = jax.tree.map(lambda a: jnp.stack([a, a * 1.1]), params)
    xs, ys = jnp.stack([x, x]), jnp.stack([y, y])
    batch = descent_path_batched(uniform(step=0.5), LOGISTIC3.loss, stacked, xs, ys, **_glm(LOGISTIC3))
    releases, _ = ptq_loss_batched(uniform(step=0.5), LOGISTIC3.loss, stacked, xs, ys, **_glm(LOGISTIC3))
    np.testing.assert_array_equal(
        np.asarray(batch.release), np.asarray(jax.vmap(lambda r: jax.flatten_util.ravel_pytree(r)[0])(releases))
    )


def _old_competitor_rates(q, problem, params, x, y):
    """The indicator before the path and start events: the release's competitors and the scale code's events."""
    release, _ = ptq_loss(q, problem.loss, params, x, y, **_glm(problem))
    moves = competitors(q, release, params)
    D = loss_differences(problem.loss, release, moves, x, y, **_glm(problem))
    delta, sigma = gap_stats(D, moves.valid)
    rates = [jnp.where(moves.valid, gaussian_rate(delta, sigma), jnp.inf)]
    if q.discrete_scale:
        cov, _ = sandwich_covariance_flagged(problem.loss, params, x, y)
        m, s, v = scale_margins(q, params, cov)
        rates.append(jnp.where(v, gaussian_rate(m, s), jnp.inf))
    return float(jnp.min(jnp.concatenate(rates))), np.sort(np.asarray(delta)[np.asarray(moves.valid)])


def test_the_event_set_contains_the_old_competitors_so_r_never_rises():
    # on identical inputs, every event of the old indicator is an event of the new one: r can only go down
    for seed, n in ((0, 200), (1, 800)):
        params, x, y = _fit(LOGISTIC3, jax.random.key(seed), n)
        for name in QUANTIZERS:
            q = _q(name)
            old_r, old_delta = _old_competitor_rates(q, LOGISTIC3, params, x, y)
            new = single_model_indicator(q, LOGISTIC3, params, x, y)
            kinds = np.asarray([EVENT_KINDS[k] for k in np.asarray(new.kind)])
            valid = np.asarray(new.valid)
            mine = np.sort(np.asarray(new.delta)[valid & (kinds == "release")])
            np.testing.assert_allclose(mine, old_delta, rtol=1e-5, atol=1e-7)
            # r = c^2 / 2 doubles the gaps' float32 rounding (rtol 1e-5 above, and the two codes reduce in another
            # order on some CPUs): an equal r may come out 2e-5 apart
            assert float(new.r_hat) <= old_r * (1 + 4e-5) + 1e-12, (name, float(new.r_hat), old_r)


def test_gaussian_mean_population_flip_within_ten_percent_of_exact_with_defaults():
    # theory.md section 5's check: Z ~ N(0.3, 1), step 1, loss PTQ releases round(mean): the exact flip
    # probability is P(mean > 1/2) + P(mean < -1/2); the population sample grows with n (section 6), so the
    # prediction stays within 10% at n = 100 and 300 (it was 29% low at n = 300 with a fixed sample)
    problem = gaussian_mean(mu=[0.3])
    for n in (100, 300):
        report = qj.audit(jax.random.key(5), problem, {"grid": uniform(step=1.0)}, n=n, replicates=8,
                          attacks=("loss",))  # fmt: skip
        row = report.to_dict()["quantizers"]["grid"]
        exact = norm.cdf(-0.2 * math.sqrt(n)) + norm.cdf(-0.8 * math.sqrt(n))
        assert abs(row["flip_rate_predicted"] / exact - 1) < 0.10, (n, row["flip_rate_predicted"], exact)
        # its own standard error is at most 10% of it (sqrt(n) c = 2 and 3.5 here)
        assert row["flip_rate_predicted_se"] <= 0.10 * row["flip_rate_predicted"] * 1.05
        assert abs(row["r_population"] - 0.02) <= 4 * row["r_population_se"] + 1e-4


def test_undetermined_path_and_unsettled_descent_give_r_zero_with_a_reason():
    problem = gaussian_mean(mu=[0.5])
    q = uniform(step=1.0)
    theta = {"mu": jnp.array([0.5])}
    k = jax.random.split(jax.random.key(7), 2)
    z = jax.random.normal(k[0], (40_000, 1))
    # chosen on a sample of mean 0.6 (move up to 1), estimated on one of mean 0.4: the decision flips sign
    select = (z + 0.6, jnp.zeros(40_000))
    big = (jax.random.normal(k[1], (40_000, 1)) + 0.4, jnp.zeros(40_000))
    pop = population_indicator(q, problem, theta, *big, n=100, select=select)
    assert float(pop.r) == 0.0 and not pop.determined
    assert "population path not determined" in pop.r_zero_reason
    # one sweep moves the start up to 1: a second sweep would show it settled; max_sweeps=1 stops before
    select = (z + 0.9, jnp.zeros(40_000))
    pop = population_indicator(q, problem, {"mu": jnp.array([0.49])}, *big, n=100, select=select, max_sweeps=1)
    assert float(pop.r) == 0.0 and not pop.settled and "did not settle" in pop.r_zero_reason
    pop = population_indicator(q, problem, {"mu": jnp.array([0.49])}, *big, n=100, select=select, max_sweeps=2)
    assert pop.settled


def _fresh_population(problem, q, key, n):
    """The population indicator at the closed-form ``theta*`` on fresh samples of ``fold_in(key, 1..3)``: the
    release chosen on one, the gaps on another growing by chunks (the audit's population stage, by hand)."""
    k_sel, k_big, k_more = (jax.random.fold_in(key, i) for i in (1, 2, 3))
    return population_indicator(
        q, problem, problem.population(key), *problem.sample(k_big, 100_000), n=n,
        select=problem.sample(k_sel, 100_000), more=lambda c: problem.sample(jax.random.fold_in(k_more, c), 100_000),
    )  # fmt: skip


@pytest.mark.slow
def test_logistic_d2_loss_ptq_flip_matches_monte_carlo():
    # the case of theory.md section 3(a): logistic d = 2, fixed step 0.5, n = 1950, loss PTQ. The start one cell
    # over descends into a second local minimum: single moves of theta_0 predict 0.085, the full event set ~0.32
    problem = logistic_mixture(dim=2)
    q = uniform(step=0.5)
    n, reps = 1950, 800
    key = jax.random.key(11)
    pop = _fresh_population(problem, q, key, n)
    k_train = jax.random.fold_in(key, 4)
    assert pop.events.get("start", 0) >= 1 and pop.events.get("path", 0) >= 1
    fit = qj.train.fit_fresh(k_train, problem, n=n, replicates=reps)
    x, y = qj.train.replicate_data(k_train, problem, n=n, index=np.arange(reps))
    releases, _ = ptq_loss_batched(q, problem.loss, fit.params, x, y, **_glm(problem))
    flat = jax.vmap(lambda r: jax.flatten_util.ravel_pytree(r)[0])(releases)
    theta0 = jax.flatten_util.ravel_pytree(pop.release)[0]
    flip = float(jnp.mean(jnp.any(flat != theta0[None], axis=1)))
    se = math.sqrt(flip * (1 - flip) / reps)
    predicted = float(pop.flip_rate_predicted)
    assert abs(predicted - flip) <= 4 * math.hypot(se, pop.flip_se), (predicted, pop.flip_se, flip, se)


@pytest.mark.slow
@pytest.mark.parametrize("dim, step, n, shape", [(2, 0.5, 1950, {}), (3, 0.75, 1000, {}), (2, 0.5, 512, VALIDATION)])
def test_population_prediction_matches_the_exact_gaussian_limit(dim, step, n, shape):
    # the joint Gaussian limit of (theta_hat, L_n on the codebook points near theta*), the descent simulated on its
    # draws (indicator.loss_ptq_flip_exact), is what the event set approximates: within 10% (p = 3 and 4). On the
    # synthetic study's validation problem at n = 512 the start is the release and every crossing comes back to it,
    # by paths whose comparisons no other event holds: without those start_return events the prediction is 0.39
    # against 0.45
    problem = logistic_mixture(dim=dim, **shape)
    q = uniform(step=step)
    key = jax.random.key(13)
    theta_star = problem.population(key)
    pop = _fresh_population(problem, q, key, n)
    k_exact = jax.random.fold_in(key, 4)
    exact = qj.indicator.loss_ptq_flip_exact(k_exact, problem, q, theta_star, n=n, box=3 if shape else 2)
    assert float(exact.left_box) < 0.01
    np.testing.assert_array_equal(np.asarray(exact.release), np.asarray(jax.flatten_util.ravel_pytree(pop.release)[0]))
    assert abs(float(pop.flip_rate_predicted) / float(exact.flip) - 1) < 0.10, (pop.flip_rate_predicted, exact.flip)
    if shape:
        assert pop.events.get("start_return", 0) >= 1, pop.events
