"""Scale formats, MX presets and the published numbers of a release (theory.md section 9)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import W, normal
from test_quantizers import ref_mx

import qmis_jax.quantizers as Q


def test_preset_names_take_a_scale_format():
    for name in ("int4@e8m0", "sign@e8m0", "ternary_s90@e8m0", "int8@bf16", "ternary@f16", "fp8_e4m3@e8m0"):
        q = Q.get(name)
        assert q.name == name and q.scale_format == name.split("@")[1] and q.discrete_scale
    assert Q.get("int4").scale_format == "f32" and not Q.get("int4").discrete_scale
    assert Q.get("mxint8").scale_format == Q.get("mxfp4").scale_format == "e8m0"
    with pytest.raises(ValueError, match="scale format.*e5m2"):
        Q.get("int4@e5m2")
    with pytest.raises(ValueError, match="prune50.*no scale"):
        Q.get("prune50@e8m0")
    with pytest.raises(ValueError, match="scale_format"):
        Q.uniform(step=0.5, scale_format="e8m0")
    with pytest.raises(ValueError, match="scale_format"):
        Q.sign(scale_format="fp8")


def _small_int_times_power_of_two(v: np.ndarray, bound: int) -> bool:
    """Every nonzero |v| is m 2^e with m an integer in 1..bound."""
    a = np.abs(v[v != 0]).astype(np.float64)
    m, e = np.frexp(a)  # a = m 2^e, m in [0.5, 1)
    # strip trailing zero bits: the odd part of the significand times a power of two
    odd = m * 2.0**53
    while np.any((odd % 2 == 0) & (odd > 0)):
        odd = np.where(odd % 2 == 0, odd / 2, odd)
    return bool(np.all(odd <= bound))


@pytest.mark.parametrize(
    ("name", "bound", "most"),
    [("int4@e8m0", 7, 15), ("sign@e8m0", 1, 2), ("ternary@e8m0", 1, 3), ("ternary_s90@e8m0", 1, 3), ("mxfp4", 3, 60)],
)
def test_e8m0_releases_take_few_values_each_a_small_integer_times_a_power_of_two(name, bound, most):
    for seed in range(3):
        w = normal(seed, (48, 8)) * np.float32(0.37 * (seed + 1))
        v = np.asarray(Q.get(name)(jnp.asarray(w)))
        assert len(np.unique(v)) <= most, name
        assert _small_int_times_power_of_two(v, bound), name
    # a one-element leaf lands on a power-of-two grid instead of being published exactly
    for name_, value in (("int4@e8m0", -1.75), ("sign@e8m0", -2.0), ("ternary_s33@e8m0", -2.0)):
        assert float(Q.get(name_)(jnp.array([-1.7]))[0]) == value, name_


@pytest.mark.parametrize("shape", [(70, 5), (45,), (48, 8), (3, 4, 40)])
@pytest.mark.parametrize("name", ["mxint8", "mxfp4"])
def test_mx_presets_equal_the_ocp_reference(name, shape):
    w = normal(7, shape) * np.float32(3.3)
    w.ravel()[5] = 0.0
    element = "int8" if name == "mxint8" else "fp4"
    value, scale, elements = ref_mx(w, element)
    got = np.asarray(Q.get(name)(jnp.asarray(w)))
    np.testing.assert_array_equal(got, value)
    # scales are E8M0 numbers, elements are int8 / FP4 E2M1 numbers
    np.testing.assert_array_equal(scale.astype(ml_dtypes.float8_e8m0fnu).astype(np.float64), scale)
    if element == "fp4":
        np.testing.assert_array_equal(elements.astype(ml_dtypes.float4_e2m1fn).astype(np.float64), elements)
    else:
        np.testing.assert_array_equal(elements, np.round(elements))
        assert np.abs(elements).max() <= 127
    # the published scales are the per-block ones (blocks of 32 along axis 0 of the (rows, channels) view)
    scales = np.asarray(Q.get(name).scales(jnp.asarray(w)))
    rows = math.prod(shape[:-1]) if len(shape) >= 2 else shape[0]
    assert scales.shape == (math.ceil(rows / 32), shape[-1] if len(shape) >= 2 else 1)
    codes = np.asarray(Q.get(name).scale_codes(jnp.asarray(w)))
    np.testing.assert_array_equal(2.0**codes, scales)


def test_e8m0_rule_is_floor_not_the_nearest_cast():
    # amax = 1.2: the OCP rule gives 2^(floor(log2 1.2) - floor(log2 7)) = 2^-2 (elements 1.2 / 0.25 = 4.8 -> 5);
    # ml_dtypes' cast of 1.2 / 7 = 0.171 to E8M0 rounds to the nearest power of two, 2^-3: not the absmax rule
    w = jnp.array([1.2, 0.3])
    assert float(Q.get("int4@e8m0").scales(w)) == 0.25
    assert float(np.float32(1.2 / 7).astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)) == 0.125
    np.testing.assert_array_equal(Q.get("int4@e8m0")(w), [1.25, 0.25])
    # absmean families round log2 of the statistic: mean|w| = 1.1 -> 2^round(0.1375) = 1
    assert float(Q.get("sign@e8m0").scales(w)) == 1.0
    assert float(Q.get("sign@e8m0").scales(jnp.array([1.5, 1.5]))) == 2.0  # log2 1.5 = 0.585 rounds to 1


def test_bf16_and_f16_scales_are_the_casts():
    w = jnp.asarray(W)
    amax = np.abs(W).max()
    assert float(Q.get("int8@bf16").scales(w)) == float(np.float32(amax / 127).astype(ml_dtypes.bfloat16))
    assert float(Q.get("int8@f16").scales(w)) == float(np.float16(np.float32(amax / 127)))
    mean = np.float32(np.abs(W).mean())
    assert float(Q.get("sign@bf16").scales(w)) == float(mean.astype(ml_dtypes.bfloat16))
    bits = np.asarray(Q.get("sign@bf16").scale_codes(w))
    assert int(bits) == int(mean.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_codes_include_the_scale_code():
    q = Q.get("sign@e8m0")
    w = jnp.array([0.9, -1.1, 1.0])
    w2 = 2 * w  # same signs, scale 2^1 instead of 2^0
    elem = lambda c: np.right_shift(np.asarray(c), Q.SCALE_CODE_BITS["e8m0"])
    c1, c2 = q.codes(q(w), w), q.codes(q(w2), w2)
    np.testing.assert_array_equal(elem(c1), [1, -1, 1])
    np.testing.assert_array_equal(elem(c1), elem(c2))
    assert np.all(np.asarray(c1) != np.asarray(c2))  # the flip comparison sees the scale change
    # a float32 scale keeps today's element codes
    np.testing.assert_array_equal(Q.get("sign").codes(Q.get("sign")(w), w), [1, -1, 1])


def test_release_info_and_published():
    params = {"b": jnp.array([0.37]), "w": jnp.asarray(W[:, :1])}
    info = Q.release_info("int4", params)
    assert info == {
        "continuous": True,
        "continuous_parts": ["b: float32 scale", "w: float32 scale"],
        "scale_format": "f32",
    }
    assert Q.release_info("int4@e8m0", params) == {"continuous": False, "continuous_parts": [], "scale_format": "e8m0"}
    assert Q.release_info("int4@e8m0", params, skip=["b"])["continuous_parts"] == ["b: skipped (float32)"]
    assert Q.release_info("fp32", params)["continuous_parts"] == ["b: float32 values", "w: float32 values"]
    assert Q.release_info("prune50", params)["scale_format"] is None
    assert Q.release_info("int4_stochastic@e8m0", params, ptq="rtn")["continuous"]
    assert not Q.release_info("int4_stochastic@e8m0", params, ptq="loss")["continuous"]
    # fp8_e4m3 publishes max|w| / 448 in float32: continuous unless its scale is rounded
    assert Q.is_continuous("fp8_e4m3") and not Q.is_continuous("fp8_e4m3@e8m0")
    assert not Q.is_continuous(Q.uniform(step=0.1)) and not Q.is_continuous("mxfp4")
    assert Q.is_continuous("mxfp4", params, skip=["b"]) and not Q.is_continuous("mxfp4", params, skip=["c"])
    with pytest.raises(ValueError, match="params"):
        Q.is_continuous("mxfp4", skip=["b"])
    with pytest.raises(ValueError, match="ptq"):
        Q.is_continuous("int4", ptq="gptq")

    release = Q.quantize_tree("int4@e8m0", params, skip=["b"])
    pub = Q.published("int4@e8m0", release, params, skip=["b"])
    np.testing.assert_array_equal(pub.continuous["b"], [np.float32(0.37)])
    assert pub.scale_codes["b"].shape == (0,) and pub.continuous["w"].shape == (0,)
    x = 2.0 ** int(pub.scale_codes["w"])
    np.testing.assert_array_equal(np.asarray(pub.codes["w"]) * x, np.asarray(release["w"]))
    assert int(pub.scale_codes["w"]) == math.floor(math.log2(np.abs(W[:, 0]).max())) - 2
    pub32 = Q.published("int4", Q.quantize_tree("int4", params), params)
    np.testing.assert_allclose(pub32.continuous["w"], np.abs(W[:, 0]).max() / 7, rtol=1e-6)


def test_scale_margins_closed_forms():
    # int4@e8m0: amax 1.3 -> binade [1, 2): rising 2 - |w_j| for every j, falling |w_argmax| - 1 at the argmax
    w = jnp.array([0.5, -1.3, 0.2])
    m = np.asarray(Q.get("int4@e8m0").scale_margins(w)).reshape(3, 2)
    np.testing.assert_allclose(m[:, 0], [1.5, 0.7, 1.8], rtol=1e-6)
    np.testing.assert_allclose(m[:, 1], [np.inf, 0.3, np.inf], rtol=1e-6)
    # sign@e8m0: mean|w| = 2/3 rounds to 2^-1 (log2 = -0.585): boundaries 2^-1.5 and 2^-0.5; gradient sign(w)/3
    q = Q.get("sign@e8m0")
    m = np.asarray(q.scale_margins(w))
    np.testing.assert_allclose(m, [2 / 3 - 2**-1.5, 2**-0.5 - 2 / 3], rtol=1e-6)
    g = jax.grad(lambda v: q.scale_margins(v)[0])(w)
    np.testing.assert_allclose(g, np.sign(np.asarray(w)) / 3, rtol=1e-6)
    # no events for float32 scales or fixed grids
    assert Q.get("int4").scale_margins(w).shape == (0,) and Q.uniform(step=1.0).scale_margins(w).shape == (0,)


@pytest.mark.parametrize(
    "name",
    ["int4_channel@e8m0", "int4_g32@e8m0", "int4_stochastic@e8m0", "int8@f16", "ternary_s33@bf16", "fp8_e4m3@e8m0"],
)
def test_ladder_machinery_with_rounded_scales(name):
    from _helpers import run_all

    q = Q.get(name)
    out = run_all(name)
    value, lower, upper, codes = out["value"], out["lower"], out["upper"], out["codes"]
    assert np.all(lower <= value) and np.all(value <= upper)
    nearest = run_all(name.replace("_stochastic", "")) if q.stochastic else out
    assert np.all((nearest["t_lo"] < W) & (W < nearest["t_hi"]))
    if not q.stochastic:
        has_lo, has_hi = lower < value, upper > value
        np.testing.assert_array_equal(out["codes_lower"][has_lo], codes[has_lo] - 1)
        np.testing.assert_array_equal(out["codes_upper"][has_hi], codes[has_hi] + 1)
    # the thresholds do not move with the weights given the scale code: no gradient through a rounded scale
    finite_sum = lambda t: jnp.sum(jnp.where(jnp.isfinite(t), t, 0))
    g = jax.grad(lambda w: finite_sum(q.thresholds(w)[1]))(jnp.asarray(W))
    if q.family != "ternary":  # (sparse ternary's support thresholds are order statistics of the weights)
        assert np.count_nonzero(np.asarray(g)) == 0
    m = np.asarray(q.scale_margins(jnp.asarray(W)))
    assert m.size and np.all(m[np.isfinite(m)] > 0)
