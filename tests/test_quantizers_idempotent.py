"""Re-quantizing a release returns it bit for bit, ``q(q(w)) == q(w)``, for every deterministic preset and scale
format and every leaf size (theory.md section 9: a release re-derives its own scale), and the arithmetic that makes
it so: the absmax scale's fixed point, the exact mean of the absmean statistics, exact divisions under ``jit``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qmis_jax.quantizers as Q
from qmis_jax.quantizers._base import absmax_scale, accurate_mean, exact_div

SHAPES = [(1,), (2,), (3,), (7,), (31,), (32,), (33,), (64 * 32,), (1000,), (4097,), (64, 32), (33, 5)]
# BitNet's absmean ternary is not idempotent, whatever the scale format: the mean magnitude of a release
# g * |round(w / g)| is g times its fraction of nonzeros, so each re-quantization shrinks the level (to g p, then
# to 2^round(log2(g p)) for E8M0) unless no entry rounds to zero.
NOT_IDEMPOTENT = ("ternary", "ternary@e8m0", "ternary@bf16", "ternary@f16")


def _variants() -> list[str]:
    out = []
    for name in Q.names():
        q = Q.get(name)
        if q.stochastic:
            continue
        out.append(name)
        if q.scaled:
            out += [f"{name}@{fmt}" for fmt in Q.SCALE_FORMATS if fmt != q.scale_format]
    return out


IDEMPOTENT = [name for name in _variants() if name not in NOT_IDEMPOTENT]
# one of each family and format in the fast loop; the rest (a compilation each) with the slow tests
FAST = ("int4", "int4_channel", "int4_g32@bf16", "int2@f16", "sign", "sign@e8m0", "ternary_s90", "fp8_e4m3",
        "mxfp4", "mxint8@f32", "ternary_s33@f16")  # fmt: skip
GRID = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in IDEMPOTENT]


def _tensors(shape: tuple[int, ...]) -> np.ndarray:
    """``(5, *shape)`` float32: three normal tensors of random scales, one with exact ties and zeros, one
    heavy-tailed."""
    out = []
    for seed in range(5):
        rng = np.random.default_rng([seed, *shape])
        w = rng.standard_normal(shape) * 2.0 ** rng.integers(-8, 8)
        if seed == 3:
            w = np.round(w * 2) / 2  # ties on grid midpoints, zeros, repeated magnitudes
        elif seed == 4:
            w = np.clip(rng.standard_cauchy(shape), -1e3, 1e3)
        out.append(w)
    return np.stack(out).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _once_and_twice(q, ws):
    """For each stacked tensor batch: ``q`` and ``q o q`` under ``vmap`` (one program per quantizer)."""
    out = []
    for w in ws:
        once = jax.vmap(q)(w)
        out.append((once, jax.vmap(q)(once)))
    return out


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint32)


@pytest.mark.parametrize("name", GRID)
def test_requantizing_a_release_returns_it_bit_for_bit(name):
    q = Q.get(name)
    results = _once_and_twice(q, tuple(jnp.asarray(_tensors(s)) for s in SHAPES))
    for shape, (once, twice) in zip(SHAPES, results, strict=True):
        np.testing.assert_array_equal(_bits(twice), _bits(once), err_msg=f"{name} {shape}")


@pytest.mark.parametrize("name", ["int4", "int8@f16", "sign", "ternary_s33", "fp8_e4m3", "mxfp4", "mxint8@f32"])
def test_requantizing_outside_jit_and_vmap(name):
    q = Q.get(name)
    for shape in ((1,), (3,), (33, 5), (4097,)):
        w = jnp.asarray(_tensors(shape)[0])
        once = q(w)
        np.testing.assert_array_equal(_bits(q(once)), _bits(once), err_msg=f"{name} {shape}")


@pytest.mark.parametrize("name", NOT_IDEMPOTENT)
def test_absmean_ternary_is_not_idempotent(name):
    q = Q.get(name)
    w = jnp.asarray(_tensors((64, 32))[0])
    once = q(w)
    assert 0 < np.mean(np.asarray(once) == 0) < 1
    assert not np.array_equal(_bits(q(once)), _bits(once))


@pytest.mark.parametrize("name", ["int4", "sign", "ternary_s90", "fp8_e4m3@bf16", "mxfp4@f32"])
def test_idempotent_in_float64_and_in_half_precision(name, x64):
    q = Q.get(name)
    for dtype, udtype in ((jnp.float64, np.uint64), (jnp.bfloat16, np.uint16), (jnp.float16, np.uint16)):
        for shape in ((1,), (7,), (33, 5), (4097,)):
            w = jnp.asarray(_tensors(shape)[0], dtype)
            once = q(w)
            assert once.dtype == dtype
            np.testing.assert_array_equal(
                np.asarray(q(once)).view(udtype), np.asarray(once).view(udtype), err_msg=f"{dtype} {shape}"
            )


def test_a_zero_level_is_released_as_positive_zero():
    for name in ("mxfp4", "int4", "fp8_e4m3", "ternary_s90", "int4@e8m0"):
        w = jnp.asarray([-1e-6, 2.0, -3.0, 0.5, -0.0], jnp.float32)
        out = np.asarray(Q.get(name)(w))
        zeros = out == 0
        assert zeros[0] and np.all(np.signbit(out[zeros]) == False), name  # noqa: E712


# ------------------------------------------------------------------------------------------------------------
# The arithmetic
# ------------------------------------------------------------------------------------------------------------

QMAXES = [2 ** (b - 1) - 1 for b in range(2, 17)] + [448.0, 6.0]


@pytest.mark.parametrize("qmax", QMAXES)
def test_the_absmax_round_trip_is_idempotent_over_a_whole_binade(qmax):
    """``g(x) = fl(fl(qmax x) / qmax)`` satisfies ``g(g(x)) = g(x)`` for every float32 ``x`` in ``[1, 2)`` (hence in
    every binade of normal numbers, scaled by powers of two), which is what :func:`absmax_scale` relies on."""
    x = (np.arange(2**23, dtype=np.uint32) + np.uint32(0x3F800000)).view(np.float32)
    q = np.float32(qmax)
    g = (x * q) / q
    assert np.array_equal(((g * q) / q).view(np.uint32), g.view(np.uint32))
    assert np.max(np.abs(g - x) / x) <= 2.0**-23  # within an ulp of the quotient


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_absmax_scale_is_the_scale_its_release_re_derives(dtype, x64):
    rng = np.random.default_rng(0)
    stat = jnp.asarray(rng.uniform(0.5, 4.0, 20_000) * 2.0 ** rng.integers(-20, 20, 20_000), dtype)
    f = jax.jit(jax.vmap(absmax_scale, in_axes=(0, None)), static_argnums=1)
    for qmax in (7, 127, 448.0, 6.0, 32767):
        s = f(stat, qmax)
        np.testing.assert_array_equal(f(qmax * s, qmax), s)  # the top level fl(qmax s) re-derives s
        np.testing.assert_allclose(s, np.asarray(stat, np.float64) / qmax, rtol=2 * jnp.finfo(dtype).eps)
        g = jax.grad(lambda t, qmax=qmax: absmax_scale(t, qmax))(jnp.asarray(2.0, dtype))
        np.testing.assert_allclose(g, 1.0 / qmax, rtol=1e-6)


def test_exact_div_is_a_division_under_jit():
    x = jnp.asarray(np.random.default_rng(1).uniform(1, 2, 100_000), jnp.float32)
    ref = np.asarray(x) / np.float32(7.0)
    assert np.array_equal(np.asarray(jax.jit(lambda x: exact_div(x, 7.0))(x)), ref)
    assert np.array_equal(np.asarray(jax.jit(jax.vmap(lambda x: exact_div(x, 7.0)))(x)), ref)
    assert jnp.isnan(exact_div(jnp.float32(jnp.nan), 3.0))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 33, 1000, 4097, 100_003])
def test_the_mean_of_equal_values_is_that_value(n):
    values = jnp.asarray(np.random.default_rng(n).uniform(0.1, 10.0, 16) * 2.0 ** np.arange(-8, 8), jnp.float32)
    got = jax.jit(jax.vmap(lambda v: accurate_mean(jnp.full((n,), v))))(values)
    np.testing.assert_array_equal(got, values)
    mask = jnp.arange(2 * n) % 2 == 0  # n kept entries among 2n
    got = jax.jit(jax.vmap(lambda v: accurate_mean(jnp.where(mask, v, 123.0), mask, count=n)))(values)
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize("n", [5, 1000, 65_537])
def test_accurate_mean_is_within_an_ulp_and_has_the_gradient_of_the_mean(n):
    x = jnp.asarray(np.abs(np.random.default_rng(n).standard_normal(n)) * 3.7, jnp.float32)
    exact = np.mean(np.asarray(x, np.float64))
    got = float(jax.jit(accurate_mean)(x))
    assert abs(got - exact) <= np.spacing(np.float32(exact))
    np.testing.assert_allclose(jax.grad(accurate_mean)(x), jnp.full((n,), 1.0 / n), rtol=1e-6)
    mask = x > 1.0
    k = int(mask.sum())
    exact_kept = np.mean(np.asarray(x, np.float64)[np.asarray(mask)])
    assert abs(float(accurate_mean(x, mask, count=k)) - exact_kept) <= np.spacing(np.float32(exact_kept))
    np.testing.assert_allclose(jax.grad(lambda x: accurate_mean(x, mask, count=k))(x), np.where(mask, 1.0 / k, 0.0))
    assert jnp.isinf(accurate_mean(x.at[0].set(jnp.inf)))


def test_accurate_mean_bad_arguments():
    x = jnp.ones(4)
    with pytest.raises(ValueError, match="`count`"):
        accurate_mean(x, x > 0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`count`"):
            accurate_mean(x, count=bad)
