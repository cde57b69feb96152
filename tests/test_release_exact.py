"""Releases with discrete scales against the exact MIS of the 1-D Gaussian mean (theory.md sections 5, 7 and 9)."""

import math

import jax
import numpy as np
import pytest

import qmis_jax as qj
from qmis_jax.indicator.exact import (
    gaussian_mean_quantized_delta,
    gaussian_mean_release_cells,
    gaussian_mean_release_delta,
)
from qmis_jax.quantizers import uniform


@pytest.fixture(autouse=True, scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def test_release_cells_closed_forms():
    # int4@e8m0 on one coordinate: X = 2^(floor(log2|t|) - 2), levels 4X..7X, so in [1, 2) the jumps are at the
    # midpoints 1.125, 1.375, 1.625 and at the binade edges 1 and 2 (7X = 1.75 -> 4 (2X) = 2)
    cells = gaussian_mean_release_cells("int4@e8m0", lo=0.9, hi=2.1)
    np.testing.assert_allclose(cells.edges, [1.0, 1.125, 1.375, 1.625, 2.0], atol=1e-9)
    # sign@e8m0: 0 and the E8M0 rounding boundaries 2^(k + 1/2) of |t|
    # (the binades accumulate at 0: search away from it)
    cells = gaussian_mean_release_cells("sign@e8m0", lo=0.2, hi=1.6)
    np.testing.assert_allclose(cells.edges, [2**-1.5, 2**-0.5, 2**0.5], atol=1e-9)
    cells = gaussian_mean_release_cells("sign@e8m0", lo=-0.5, hi=-0.2)
    np.testing.assert_allclose(cells.edges, [-(2**-1.5)], atol=1e-9)
    assert cells.codes[0] != cells.codes[1]


def test_release_delta_matches_the_fixed_grid_reference():
    # the generic cell search on a fixed grid reproduces the fixed-grid quadrature (theory.md section 5)
    for n in (10, 100):
        delta, flip, rate = gaussian_mean_release_delta(n, uniform(step=1.0), mu=0.3)
        assert delta == pytest.approx(gaussian_mean_quantized_delta(n, mu=0.3), rel=1e-6)
        assert rate == pytest.approx(0.02, rel=1e-6)
        s = math.sqrt(n)
        assert flip == pytest.approx(1 - (math.erf(0.2 * s / math.sqrt(2)) + math.erf(0.8 * s / math.sqrt(2))) / 2)


# (name, mu, n): the nearest cell boundary is a scale boundary, sqrt(n) c >= 2, flip probability ~ 2%
CASES = [("int4@e8m0", 1.85, 200), ("sign@e8m0", 1.2, 100)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mu", "n"), CASES)
def test_audit_against_exact_mis(name, mu, n):
    delta, flip, rate = gaussian_mean_release_delta(n, name, mu=mu)
    assert 0.01 < flip < 0.05 and math.sqrt(n) * math.sqrt(2 * rate) >= 2
    replicates = 1500
    report = qj.audit(
        jax.random.key(11),
        qj.problems.gaussian_mean(mu=[mu]),
        [name],
        n=n,
        replicates=replicates,
        attacks=(),
        population_size=400_000,
        n_boot=50,
    )
    e = report[name]
    se = math.sqrt(flip * (1 - flip) / replicates)
    assert abs(e["flip_rate"] - flip) < 4 * se, (e["flip_rate"], flip, se)
    assert e["r_population"] == pytest.approx(rate, rel=0.15)
    ratio = (1 - e["mis_asymptotic"]) / delta
    assert 0.7 <= ratio <= 1.2, ratio
