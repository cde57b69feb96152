"""Hypothesis property tests of qmis_jax.quantizers: codebook membership, ordering, scaling and symmetry.

Tensors are (48, 8) float32 built from drawn structure (scale, zeros, ties, heavy tails, a zero column) so that
every example reuses the compiled programs of tests/_helpers.py that tests/test_quantizers.py also runs. Runs are
derandomized (fixed examples).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import BATCH, KEYS, C, W, run_all, run_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmis_jax.quantizers as Q

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw) -> np.ndarray:
    """A (48, 8) float32 tensor with drawn scale and structure."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = 2.0 ** draw(st.integers(-8, 8))
    kind = draw(st.sampled_from(["normal", "zeros", "ties", "heavy", "zero_column", "constant"]))
    w = rng.standard_normal(W.shape)
    if kind == "zeros":
        w[rng.random(W.shape) < draw(st.floats(0.0, 0.95))] = 0.0
    elif kind == "ties":
        w = np.round(w * draw(st.integers(1, 4))) / 2  # many exact ties and grid midpoints
    elif kind == "heavy":
        w = np.clip(rng.standard_cauchy(W.shape), -1e3, 1e3)
    elif kind == "zero_column":
        w[:, draw(st.integers(0, 7))] = 0.0
    elif kind == "constant":
        w = np.full(W.shape, draw(st.sampled_from([-1.0, 0.5, 3.0])))
    return (w * scale).astype(np.float32)


def ulps(w: np.ndarray) -> np.float32:
    return 4 * np.spacing(np.float32(np.abs(w).max()) + np.float32(1e-30))


@pytest.mark.parametrize("name", Q.names())
@SETTINGS
@given(w=tensors())
def test_release_is_a_codebook_point_with_ordered_levels(name, w):
    out = run_all(name, w)
    q = Q.get(name)
    value, lower, upper, codes = out["value"], out["lower"], out["upper"], out["codes"]
    assert out["q"].shape == w.shape and out["q"].dtype == np.float32
    assert all(np.all(np.isfinite(out[k])) for k in ("q", "lower", "upper", "grad"))
    np.testing.assert_allclose(out["q"], value, rtol=1e-6, atol=1e-30)
    assert np.all(lower <= value) and np.all(value <= upper)
    np.testing.assert_array_equal(out["n_lo"], lower)
    np.testing.assert_array_equal(out["n_hi"], upper)
    if q.discrete_scale:  # identity STE except on entries saturated at qmax times the rounded scale
        assert np.all((out["grad"] == C) | (out["grad"] == 0))
    else:
        np.testing.assert_array_equal(out["grad"], np.asarray(run_all(name)["grad"]))  # identity STE everywhere
    # thresholds bracket the weights (up to rounding at exact ties)
    assert np.all(out["t_lo"] <= w + ulps(w)) and np.all(w - ulps(w) <= out["t_hi"])
    if q.continuous:
        return
    if name != "int4_stochastic":
        # a release is a fixed point of its own codebook: the codes of value, lower and upper are consecutive
        step = 2 if name == "sign" else 1
        has_lo, has_hi = lower < value, upper > value
        np.testing.assert_array_equal(out["codes_lower"][has_lo], codes[has_lo] - step)
        np.testing.assert_array_equal(out["codes_upper"][has_hi], codes[has_hi] + step)
        np.testing.assert_array_equal(out["up_of_lower"][has_lo], value[has_lo])
        np.testing.assert_array_equal(out["lo_of_upper"][has_hi], value[has_hi])
    distinct = {"int2": 3, "int4": 15, "int8": 255, "sign": 2, "ternary": 3, "ternary_s33": 3, "fp8_e4m3": 253}
    if name in distinct:
        assert len(np.unique(value)) <= distinct[name]


@pytest.mark.parametrize("name", [n for n in Q.names() if n != "fp32"])
@SETTINGS
@given(w=tensors(), k=st.integers(-6, 6))
def test_scaling_by_a_power_of_two_scales_the_release(name, w, k):
    """q(c w) = c q(w) for c = 2^k: every codebook here is scale-equivariant (absmax, mean, quantile, E4M3)."""
    c = np.float32(2.0**k)
    base, scaled = run_all(name, w), run_all(name, c * w)
    np.testing.assert_array_equal(scaled["q"], c * base["q"])
    np.testing.assert_array_equal(scaled["lower"], c * base["lower"])
    np.testing.assert_array_equal(scaled["upper"], c * base["upper"])
    if not Q.get(name).continuous:  # (continuous releases are coded by their bit patterns)
        np.testing.assert_array_equal(scaled["codes"], base["codes"])
    np.testing.assert_array_equal(scaled["t_hi"], c * base["t_hi"])


@pytest.mark.parametrize("name", [n for n in Q.names() if n != "int4_stochastic"])
@SETTINGS
@given(w=tensors())
def test_odd_symmetry(name, w):
    """q(-w) = -q(w) away from w = 0 (where sign() releases +alpha) for every deterministic preset."""
    base, flipped = run_all(name, w), run_all(name, -w)
    nonzero = w != 0
    np.testing.assert_array_equal(flipped["q"][nonzero], -base["q"][nonzero])
    if not Q.get(name).continuous:
        np.testing.assert_array_equal(flipped["codes"][nonzero], -base["codes"][nonzero])


@SETTINGS
@given(w=tensors(), step=st.sampled_from([0.125, 0.3, 1.0, 2.5]))
def test_fixed_grid_rounds_to_nearest_multiple(w, step):
    q = Q.uniform(step=step)
    with jax.disable_jit():  # eager: the primitives compile once for this shape, whatever the step
        value, lower, upper = (np.asarray(x) for x in q.levels(jnp.asarray(w)))
        codes = np.asarray(q.codes(jnp.asarray(value), jnp.asarray(w)))
    np.testing.assert_array_equal(codes, np.round(w / np.float32(step)))
    np.testing.assert_allclose(value, codes * np.float32(step), rtol=1e-6)
    assert np.all(np.abs(value - w) <= step / 2 * (1 + 1e-6) + ulps(w))
    np.testing.assert_allclose(upper - value, step, rtol=1e-5, atol=ulps(w))
    np.testing.assert_allclose(value - lower, step, rtol=1e-5, atol=ulps(w))


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_jit_vmap_batch_matches_the_plain_call_on_each_tensor(seed):
    """Each release of the jitted, vmapped batch equals the eager un-batched call on that tensor with its key (up to
    float32 rounding of the scale products: a per-channel scale taken over the wrong axis would be far off)."""
    w = np.random.default_rng(seed).standard_normal(W.shape).astype(np.float32)
    ws = np.stack([w, *BATCH[1:]])
    for name in ("int4_channel", "ternary_s90", "int4_stochastic"):
        q, batch = Q.get(name), run_batch(name, w)
        with jax.disable_jit():
            for i in range(ws.shape[0]):
                plain = np.asarray(q(jnp.asarray(ws[i]), key=KEYS[i]))
                np.testing.assert_allclose(batch["q"][i], plain, rtol=1e-6, atol=0, err_msg=f"{name}[{i}]")
