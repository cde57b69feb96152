"""The estimator's order-1/n bias against closed forms, and the start_return events' intersection geometry."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from qmis_jax.indicator import BIAS_MAX_P, estimator_bias
from qmis_jax.indicator._population import _intersection

pytestmark = pytest.mark.usefixtures("x64")


def _exponential(prm, xi, yi):
    return prm["rate"][0] * xi[0] - jnp.log(prm["rate"][0])


def _gaussian(prm, xi, yi):
    return (xi[0] - prm["mu"]) ** 2 / (2 * prm["v"]) + 0.5 * jnp.log(prm["v"])


def test_exponential_rate_bias_is_theta_cubed_times_the_variance():
    # l = theta z - log theta at theta = 1 / mean(z): H = 1/theta^2, J = var, T = -2/theta^3, so the formula gives
    # b = theta^3 var exactly, whatever the sample (theta for the exponential law, var = 1/theta^2: E 1/zbar - theta
    # = theta / n + ...)
    theta, var = 2.0, 0.3
    x = jnp.asarray([[1 / theta - var**0.5], [1 / theta + var**0.5]] * 3)
    b = estimator_bias(_exponential, {"rate": jnp.array([theta])}, x, jnp.zeros(6))
    np.testing.assert_allclose(b, [theta**3 * var], rtol=1e-10)


def test_gaussian_variance_bias_is_minus_v_and_the_mean_unbiased():
    # the MLE of (mu, v) on a symmetric sample (skewness 0, any kurtosis): b = (0, -v), E v_hat = v (n - 1) / n
    z = jnp.asarray([-2.0, -0.5, 0.5, 2.0, -1.0, 1.0]) + 0.7
    mu, v = float(jnp.mean(z)), float(jnp.var(z))
    b = estimator_bias(_gaussian, {"mu": jnp.array(mu), "v": jnp.array(v)}, z[:, None], jnp.zeros(6))
    np.testing.assert_allclose(b, [0.0, -v], atol=1e-10)


def test_quadratic_loss_is_unbiased_and_bad_input_is_named():
    x = jnp.asarray([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0]])

    def loss(prm, xi, yi):
        return 0.5 * jnp.sum((prm["mu"] - xi) ** 2)

    np.testing.assert_allclose(estimator_bias(loss, {"mu": jnp.mean(x, axis=0)}, x, jnp.zeros(3)), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="params"):
        estimator_bias(loss, {"mu": jnp.zeros(BIAS_MAX_P + 1)}, jnp.zeros((300, 1)), jnp.zeros(300))
    with pytest.raises(ValueError, match="x"):
        estimator_bias(loss, {"mu": jnp.zeros(2)}, x[:1], jnp.zeros(1))


@pytest.mark.parametrize("a, b, rho", [(1.0, 1.2, 0.3), (1.0, 0.4, 0.8), (0.5, 2.0, -0.6), (1.5, 1.5, 0.95)])
def test_intersection_rate_and_tangent_half_space(a, b, rho):
    # min y^T R^-1 y / 2 over {y_1 >= a, y_2 >= b} by a general optimiser; the half-space u^T y >= c has
    # Var(u^T Y) = 1 and touches the region at its most likely point
    r = np.array([[1.0, rho], [rho, 1.0]])
    r_inv = np.linalg.inv(r)
    best = minimize(lambda y: 0.5 * y @ r_inv @ y, x0=np.array([a + 1, b + 1]), method="SLSQP",
                    constraints=[{"type": "ineq", "fun": lambda y: y - np.array([a, b])}], tol=1e-12)  # fmt: skip
    c, u1, u2 = (float(v[0]) for v in _intersection(a, np.array([b]), np.array([rho])))
    np.testing.assert_allclose(c * c / 2, best.fun, rtol=1e-6)
    u = np.array([u1, u2])
    np.testing.assert_allclose(u @ r @ u, 1.0, rtol=1e-9)
    np.testing.assert_allclose(u @ best.x, c, rtol=1e-5)
    assert c >= max(a, b) - 1e-12  # an intersection is never likelier than either of its events
