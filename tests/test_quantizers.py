"""Tests of qmis_jax.quantizers against an independent NumPy reference, closed forms and properties."""

from __future__ import annotations

import doctest
import functools
import importlib
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import BATCH, KEY, KEYS, C, W, normal, run_all, run_batch

import qmis_jax.quantizers as Q

REQUIRED = (
    "fp32 int8 int4 int2 int4_channel int4_stochastic sign ternary ternary_s33 ternary_s90 prune50 prune90".split()
)
DETERMINISTIC = [n for n in Q.names() if n != "int4_stochastic"]


# ------------------------------------------------------------------------------------------------------------
# Independent NumPy reference (explicit loops and library calls, no code shared with the package)
# ------------------------------------------------------------------------------------------------------------


def ref_absmax(w: np.ndarray, granularity: str, group_size: int | None = None) -> np.ndarray:
    """Per-entry absmax, written with explicit loops over channels and groups."""
    a = np.abs(w)
    if granularity == "tensor" or (granularity == "channel" and w.ndim < 2):
        return np.full(w.shape, a.max(), w.dtype)
    mat = a.reshape(-1, w.shape[-1]) if w.ndim >= 2 else a.reshape(-1, 1)
    out = np.empty_like(mat)
    for col in range(mat.shape[1]):
        if granularity == "channel":
            out[:, col] = mat[:, col].max()
        else:
            for start in range(0, mat.shape[0], group_size):
                out[start : start + group_size, col] = mat[start : start + group_size, col].max()
    return out.reshape(w.shape)


def ref_uniform(w, bits, granularity="tensor", group_size=None, clip_ratio=1.0):
    """Returns (value, scale, integer code) of the symmetric absmax grid."""
    qmax = 2 ** (bits - 1) - 1
    scale = clip_ratio * ref_absmax(w, granularity, group_size) / qmax
    safe = np.where(scale > 0, scale, 1)
    k = np.clip(np.round(w / safe), -qmax, qmax)
    return scale * k, scale, k


def ref_sign(w):
    alpha = np.mean(np.abs(w))
    k = np.where(w >= 0, 1, -1)
    return alpha * k, alpha, k


def ref_kept(a: np.ndarray, sparsity: float) -> np.ndarray:
    """The k = round((1 - s) N) largest entries of `a` (halves up, ties broken by position), as a mask."""
    k = math.floor(round((1 - sparsity) * a.size, 9) + 0.5)
    keep = np.zeros(a.size, bool)
    keep[np.argsort(-a.ravel(), kind="stable")[:k]] = True
    return keep.reshape(a.shape)


def ref_ternary(w, sparsity=None):
    """(value, scale, code, thresholds info): absmean g, or the exact top-k support of theory.md section 9."""
    a = np.abs(w)
    if sparsity is None:
        g = np.mean(a)
        k = np.clip(np.round(w / g), -1, 1) if g > 0 else np.zeros_like(w)
        return g * k, g, k, g / 2
    keep = ref_kept(a, sparsity)
    alpha = a[keep].mean() if keep.any() else 0.0
    k = np.where(keep, np.where(w >= 0, 1, -1), 0)
    max_dropped = a[~keep].max() if (~keep).any() else 0.0
    min_kept = a[keep].min() if keep.any() else np.inf
    return alpha * k, alpha, k, (max_dropped, min_kept)


def ref_mx(w: np.ndarray, element: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OCP Microscaling, written from the spec with explicit loops: blocks of 32 along axis 0 of the (rows,
    channels) view, shared scale X = 2^(floor(log2 amax) - floor(log2 qmax)), elements w / X rounded to the element
    format (int8: round half to even, clip to +-127; FP4 E2M1 via ml_dtypes after saturating at +-6).

    Returns (value, per-entry scale X, per-entry element value w_q / X)."""
    qmax = 127.0 if element == "int8" else 6.0
    mat = w.reshape(-1, w.shape[-1]) if w.ndim >= 2 else w.reshape(-1, 1)
    value = np.zeros(mat.shape, np.float64)
    scale = np.zeros(mat.shape, np.float64)
    for col in range(mat.shape[1]):
        for start in range(0, mat.shape[0], 32):
            block = mat[start : start + 32, col].astype(np.float64)
            amax = np.abs(block).max()
            x = 2.0 ** (math.floor(math.log2(amax)) - math.floor(math.log2(qmax))) if amax > 0 else 2.0**-127
            y = block / x
            if element == "int8":
                e = np.clip(np.round(y), -qmax, qmax)
            else:
                e = np.clip(y, -qmax, qmax).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
            value[start : start + 32, col] = e * x
            scale[start : start + 32, col] = x
    return value.reshape(w.shape).astype(w.dtype), scale.reshape(w.shape), (value / scale).reshape(w.shape)


def ref_prune(w, sparsity):
    flat = w.ravel().copy()
    m = math.floor(sparsity * flat.size)
    flat[np.argsort(np.abs(flat), kind="stable")[:m]] = 0
    return flat.reshape(w.shape)


def ref_fp8(w):
    scale = np.abs(w).max() / 448.0
    x = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    bits = x.view(np.uint8).astype(np.int32)
    code = np.where(bits >= 128, -(bits - 128), bits)
    return scale * x.astype(w.dtype), scale, code


def reference(name: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(value, integer code or None) of preset `name` on w."""
    if name == "fp32":
        return w, None
    if name.startswith("int") and name != "int4_stochastic":
        bits = int(name[3])
        gran = "channel" if name.endswith("channel") else "group" if "_g" in name else "tensor"
        value, _, k = ref_uniform(w, bits, gran, 32 if gran == "group" else None)
        return value, k
    if name == "sign":
        value, _, k = ref_sign(w)
        return value, k
    if name.startswith("ternary"):
        s = None if name == "ternary" else int(name[-2:]) / 100
        value, _, k, _ = ref_ternary(w, s)
        return value, k
    if name.startswith("prune"):
        return ref_prune(w, int(name[5:]) / 100), None
    if name == "fp8_e4m3":
        value, _, code = ref_fp8(w)
        return value, code
    if name in ("mxint8", "mxfp4"):
        value, _, _ = ref_mx(w, "int8" if name == "mxint8" else "fp4")
        return value, None  # codes pack the scale code (see test_quantizers_release)
    raise AssertionError(name)


@functools.partial(jax.jit, static_argnums=0)
def lean(q, w, key, c):
    """Value, straight-through gradient, levels and thresholds of `q` on `w` in one small program."""
    out, vjp = jax.vjp(lambda w: q(w, key=key), w)
    return {"q": out, "grad": vjp(c.astype(out.dtype))[0], "levels": q.levels(w, key=key), "t": q.thresholds(w)}


# ------------------------------------------------------------------------------------------------------------
# Registry and construction
# ------------------------------------------------------------------------------------------------------------


def test_names_stable_and_complete():
    names = Q.names()
    assert isinstance(names, tuple)
    assert names == Q.names()
    assert names[: len(REQUIRED)] == tuple(REQUIRED)
    assert len(set(names)) == len(names)
    for name in names:
        q = Q.get(name)
        assert isinstance(q, Q.Quantizer)
        assert q.name == name
        assert q == Q.get(name) and hash(q) == hash(Q.get(name))
        assert Q.get(q) is q
    flags = {n: (Q.get(n).continuous, Q.get(n).stochastic) for n in names}
    assert {n for n, (c, _) in flags.items() if c} == {"fp32", "prune50", "prune90"}
    assert {n for n, (_, s) in flags.items() if s} == {"int4_stochastic"}


def test_constructors_build_the_presets():
    assert Q.uniform(bits=4) == Q.get("int4")
    assert Q.uniform(bits=4, granularity="channel") == Q.get("int4_channel")
    assert Q.uniform(bits=4, rounding="stochastic") == Q.get("int4_stochastic")
    assert Q.uniform(bits=4, group_size=32) == Q.get("int4_g32")
    assert Q.ternary(sparsity=0.9) == Q.get("ternary_s90")
    assert Q.prune(sparsity=0.5) == Q.get("prune50")
    assert Q.identity() == Q.get("fp32") and Q.sign() == Q.get("sign") and Q.fp8() == Q.get("fp8_e4m3")
    assert Q.uniform(step=0.5).name == "grid_0.5"
    assert Q.uniform(bits=3, clip_ratio=0.5).name == "int3_clip0.5"
    assert Q.uniform(bits=4) != Q.uniform(bits=5)
    info = Q.get("int4_channel").info()
    assert info["bits"] == 4 and info["granularity"] == "channel" and info["family"] == "uniform"


def test_size_adaptive_step():
    q = Q.size_adaptive(1600, h0=0.8, n0=100, alpha=0.25)
    assert q.step == pytest.approx(0.8 * 16**-0.25, rel=1e-15)
    assert q.bits is None and not q.continuous
    assert Q.size_adaptive(100, h0=0.8, n0=100, alpha=0.4).step == pytest.approx(0.8)


def test_jit_static_argument():
    f = jax.jit(lambda q, w: q(w), static_argnums=0)
    np.testing.assert_allclose(f(Q.get("int4"), W), run_all("int4")["q"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Values against the NumPy reference
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_matches_numpy_reference(name):
    out = run_all(name)
    value, code = reference(name, W)
    assert out["q"].shape == W.shape and out["q"].dtype == np.float32
    np.testing.assert_allclose(out["q"], value, rtol=1e-6, atol=1e-7)
    if code is not None:
        np.testing.assert_array_equal(out["codes"], code)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("int4_channel", (37,)),  # a 1-D leaf has one scale
        ("int4_channel", (3, 5, 4, 6)),  # a conv kernel: one scale per last-axis entry
        ("int4_g32", (70, 3)),  # ragged last group (32 + 32 + 6 rows)
        ("int4_g32", (37,)),
        ("ternary_s90", (3, 5, 4, 6)),
        ("prune50", (37,)),
    ],
    ids=str,
)
def test_matches_numpy_reference_other_shapes(name, shape):
    w = normal(len(shape), shape)
    out = np.asarray(Q.get(name)(w))
    value, _ = reference(name, w)
    np.testing.assert_allclose(out, value, rtol=1e-6, atol=1e-7)


def test_fp8_every_grid_point_and_rounding():
    grid = np.arange(127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert grid[-1] == 448.0 and grid[1] == 2.0**-9 and np.all(np.diff(grid) > 0)
    w = np.concatenate([-grid[:0:-1], grid])  # 253 distinct levels, one zero
    q = Q.fp8()
    # the scale is max|w| / 448 = 1: every E4M3 value is a fixed point, with the (signed) bit pattern as code
    out = run_all(q, w, w)
    np.testing.assert_array_equal(out["q"], w)
    np.testing.assert_array_equal(out["codes"], np.arange(-126, 127))
    np.testing.assert_array_equal(out["lower"][1:], w[:-1])
    np.testing.assert_array_equal(out["upper"][:-1], w[1:])
    assert out["t_lo"][0] == -np.inf and out["t_hi"][-1] == np.inf
    np.testing.assert_array_equal(out["t_hi"][:-1], 0.5 * (w[1:] + w[:-1]))
    # midpoints round to even mantissas, exactly like ml_dtypes' conversion
    mids = np.concatenate([0.5 * (w[1:] + w[:-1]), [448.0]]).astype(np.float32)
    ref = mids.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(run_all(q, mids, mids)["q"], ref)


# ------------------------------------------------------------------------------------------------------------
# Codebook sizes, sparsity, scales, idempotence
# ------------------------------------------------------------------------------------------------------------


def test_number_of_distinct_levels():
    count = lambda name: len(np.unique(run_all(name)["q"]))
    assert 10 <= count("int4") <= 15
    assert count("int2") == 3
    assert 100 <= count("int8") <= 255
    assert count("int4_stochastic") <= 15
    assert count("sign") == 2
    assert count("ternary") == 3 and count("ternary_s33") == 3 and count("ternary_s90") == 3
    assert 60 <= count("fp8_e4m3") <= 253
    per_channel = run_all("int4_channel")["q"]
    assert all(len(np.unique(per_channel[:, c])) <= 15 for c in range(8))
    per_group = run_all("int4_g32")["q"]
    assert all(len(np.unique(per_group[g : g + 32, c])) <= 15 for c in range(8) for g in (0, 32))
    assert len(np.unique(per_channel)) > 15 and len(np.unique(per_group)) > len(np.unique(per_channel))
    assert count("fp32") == W.size


def test_sparsity_fractions():
    w = normal(3, (1000,))
    zeros = lambda name: float(np.mean(np.asarray(Q.get(name)(w)) == 0))
    # exactly k = round((1 - s) N) nonzeros (theory.md section 9)
    assert zeros("ternary_s90") == 0.9 and zeros("ternary_s33") == 0.33
    for n, s, k in ((16, 0.9, 2), (16, 0.33, 11), (10, 0.25, 8), (3, 0.5, 2), (1, 0.33, 1), (1, 0.9, 0)):
        got = int(np.count_nonzero(np.asarray(Q.ternary(sparsity=s)(jnp.asarray(w[:n])))))
        assert got == k, (n, s, got)
    assert zeros("prune50") == 0.5 and zeros("prune90") == 0.9
    # absmean ternary zeroes |w| < g/2, g = mean|w| ~ sqrt(2/pi) for N(0, 1): P = 2 Phi(g/2) - 1 = 0.3108;
    # binomial standard error sqrt(p (1 - p) / N), 4 of them
    assert abs(zeros("ternary") - 0.3108) < 4 * math.sqrt(0.31 * 0.69 / 1000)
    # the pruned count is floor(s N) computed without floating error: 0.29 * 100 = 28.999999999999996
    assert int(np.sum(np.asarray(Q.prune(sparsity=0.29)(w[:100])) == 0)) == 29
    kept = np.asarray(Q.get("prune90")(w)) != 0
    assert np.abs(w)[kept].min() >= np.abs(w)[~kept].max()


def test_scale_formulas():
    a = np.abs(W)
    v = run_all("int4")["q"]
    s = a.max() / 7
    np.testing.assert_allclose(np.abs(v) / s, np.round(np.abs(v) / s), atol=1e-5)
    np.testing.assert_allclose(np.abs(v).max(), a.max(), rtol=1e-6)
    np.testing.assert_allclose(np.abs(run_all("int4_channel")["q"]).max(axis=0), a.max(axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.unique(np.abs(run_all("sign")["q"])), [a.mean()], rtol=1e-6)
    np.testing.assert_allclose(np.abs(run_all("ternary")["q"]).max(), a.mean(), rtol=1e-6)
    t = run_all("ternary_s33")["q"]
    np.testing.assert_allclose(np.abs(t).max(), a[t != 0].mean(), rtol=1e-6)
    assert a[t != 0].min() > a[t == 0].max() and np.count_nonzero(t) == round(0.67 * W.size)
    np.testing.assert_allclose(np.abs(run_all("fp8_e4m3")["q"]).max(), a.max(), rtol=1e-6)


def test_idempotence_where_it_holds():
    # exact fixed points: fixed grid, pruning, identity
    for q in (Q.uniform(step=0.3), Q.get("prune50"), Q.get("fp32")):
        once = q(W)
        np.testing.assert_array_equal(q(once), once)
    # absmax grids, fp8 and sign: the scale of q(w) is that of w up to rounding, so the same levels come back
    for name in ("int8", "int4", "int2", "int4_channel", "int4_g32", "fp8_e4m3", "sign"):
        q = Q.get(name)
        once = run_all(name)["q"]
        twice = run_all(name, once)
        np.testing.assert_allclose(twice["q"], once, rtol=1e-6)
        np.testing.assert_array_equal(twice["codes"], run_all(name)["codes"])
    # absmean ternary is not idempotent: the mean magnitude of a release is smaller than its level
    q = Q.ternary()
    once = q(jnp.array([1.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose(once, [0.25, 0, 0, 0])
    np.testing.assert_allclose(q(once), [0.0625, 0, 0, 0])


# ------------------------------------------------------------------------------------------------------------
# jit / vmap / gradients
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", Q.names())
def test_jit_and_vmap_agree(name):
    q = Q.get(name)
    batch = run_batch(name)  # jit(vmap(...)) over three tensors
    for i in range(3):
        plain = np.asarray(q(BATCH[i], key=KEYS[i]))  # the plain call
        np.testing.assert_allclose(batch["q"][i], plain, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(batch["value"][i], plain, rtol=1e-6, atol=1e-7)
        if name != "int4_stochastic":
            value, code = reference(name, BATCH[i])
            np.testing.assert_allclose(batch["q"][i], value, rtol=1e-6, atol=1e-7)
            if code is not None:
                np.testing.assert_array_equal(batch["codes"][i], code)


@pytest.mark.parametrize("name", Q.names())
def test_straight_through_gradient_identity(name):
    # every preset's clip range is the whole tensor: the straight-through gradient is the cotangent itself; the
    # MX presets saturate the entries beyond qmax X of their E8M0 block scale X, whose gradient is then zero
    inside = np.ones(W.shape, bool)
    if name in ("mxint8", "mxfp4"):
        _, scale, _ = ref_mx(W, "int8" if name == "mxint8" else "fp4")
        inside = np.abs(W) <= (127 if name == "mxint8" else 6) * scale
        assert not inside.all() or name == "mxint8"
    np.testing.assert_array_equal(run_all(name)["grad"], np.where(inside, C, 0))


def test_straight_through_forward_mode():
    jac = jax.jacfwd(Q.get("ternary_s90"))(jnp.asarray(W[:5, 0]))
    np.testing.assert_array_equal(jac, np.eye(5))


def test_clipped_straight_through_gradient():
    q = Q.uniform(bits=4, clip_ratio=0.5)
    out = lean(q, jnp.asarray(W), None, jnp.asarray(C))
    inside = np.abs(W) <= 0.5 * np.abs(W).max()
    assert 0 < inside.sum() < W.size
    np.testing.assert_array_equal(out["grad"][inside], C[inside])
    np.testing.assert_array_equal(out["grad"][~inside], 0)
    # clipped entries saturate at the top level +-qmax s = +-clip value, which has no level above
    top = 0.5 * np.abs(W).max()
    np.testing.assert_allclose(np.abs(out["q"])[~inside], top, rtol=1e-6)
    value, lower, upper = (np.asarray(x) for x in out["levels"])
    np.testing.assert_array_equal(np.where(value > 0, upper, lower)[~inside], value[~inside])
    np.testing.assert_array_equal(np.asarray(out["t"][1])[~inside & (value > 0)], np.inf)
    second = jax.grad(lambda w: jnp.sum(jax.grad(lambda w: jnp.sum(q(w) ** 2))(w)))(jnp.asarray(W))
    np.testing.assert_array_equal(second, 0)


# ------------------------------------------------------------------------------------------------------------
# Stochastic rounding
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stochastic_rounding_unbiased():
    q = Q.get("int4_stochastic")
    w = W[:, 0]
    n_keys = 8000
    draws = np.asarray(jax.jit(jax.vmap(lambda k: q(w, key=k)))(jax.random.split(jax.random.key(11), n_keys)))
    s = np.abs(w).max() / 7
    x = w / s
    lo, hi = np.floor(x) * s, np.ceil(x) * s
    up = np.isclose(draws, hi, rtol=1e-6, atol=1e-7)
    # every draw is one of the two grid points around w
    assert np.all(up | np.isclose(draws, lo, rtol=1e-6, atol=1e-7))
    # unbiased: coordinate k is floor + s Bernoulli(f_k), sd s sqrt(f (1 - f)); within 4 standard errors
    # (plus the lattice spacing s / n_keys of a mean of n_keys draws, for f_k near 0 or 1)
    f = x - np.floor(x)
    se = s * np.sqrt(f * (1 - f) / n_keys)
    err = np.abs(draws.astype(np.float64).mean(axis=0) - w)
    assert np.all(err <= 4 * se + s / n_keys), np.max(err / (se + s / n_keys))
    assert np.abs(up.mean(axis=0) - f).max() > 0  # random, not a deterministic rounding
    # independent coordinates: the rounding of two coordinates is uncorrelated (4 standard errors of 1/sqrt(K))
    both = (0.2 < f) & (f < 0.8)
    i, j = np.nonzero(both)[0][:2]
    assert abs(np.corrcoef(up[:, i], up[:, j])[0, 1]) < 4 / math.sqrt(n_keys)


def test_stochastic_requires_key_and_is_reproducible():
    q = Q.get("int4_stochastic")
    with pytest.raises(ValueError, match="key"):
        q(W)
    with pytest.raises(ValueError, match="key"):
        q.levels(W)
    out = run_all(q)
    np.testing.assert_allclose(q(W, key=KEYS[0]), out["q"], rtol=1e-6)
    np.testing.assert_array_equal(q(W, key=KEYS[0]), q(W, key=KEYS[0]))
    assert not np.allclose(q(W, key=KEYS[1]), out["q"])
    np.testing.assert_array_equal(out["value"], out["q"])
    np.testing.assert_array_equal(out["n_lo"], out["lower"])
    np.testing.assert_array_equal(out["n_hi"], out["upper"])
    # thresholds are those of the round-to-nearest grid
    nearest = run_all("int4")
    np.testing.assert_array_equal(out["t_lo"], nearest["t_lo"])
    np.testing.assert_array_equal(out["t_hi"], nearest["t_hi"])
    # a stochastic fixed grid rounds to one of the two grid points around w
    g = np.asarray(Q.uniform(step=0.25, rounding="stochastic")(W, key=KEY))
    np.testing.assert_allclose(g / 0.25, np.round(g / 0.25), atol=1e-6)
    assert np.all(np.abs(g - W) < 0.25)


# ------------------------------------------------------------------------------------------------------------
# levels / neighbors / codes / thresholds
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("i", range(3))
def test_levels_neighbors_codes_consistent(name, i):
    q = Q.get(name)
    out = {k: v[i] for k, v in run_batch(name).items()}
    value, lower, upper, codes = out["value"], out["lower"], out["upper"], out["codes"]
    np.testing.assert_array_equal(value, out["q"])
    assert np.all(lower <= value) and np.all(value <= upper)
    np.testing.assert_array_equal(out["n_lo"], lower)
    np.testing.assert_array_equal(out["n_hi"], upper)
    assert codes.dtype == np.int32
    if q.continuous:
        np.testing.assert_array_equal(lower, value)
        np.testing.assert_array_equal(upper, value)
        # continuous codes change with any change of value
        moved = np.asarray(q.codes(value * np.float32(1.0001), BATCH[i]))
        np.testing.assert_array_equal(moved == codes, value == 0)
        return
    # adjacent levels are adjacent codes (sign codes are -1, +1)
    step = 2 if name == "sign" else 1
    has_lo, has_hi = lower < value, upper > value
    assert has_lo.any() and has_hi.any()
    np.testing.assert_array_equal(out["codes_lower"][has_lo], codes[has_lo] - step)
    np.testing.assert_array_equal(out["codes_upper"][has_hi], codes[has_hi] + step)
    np.testing.assert_array_equal(out["codes_lower"][~has_lo], codes[~has_lo])
    # the neighbours of a neighbour lead back
    np.testing.assert_array_equal(out["up_of_lower"][has_lo], value[has_lo])
    np.testing.assert_array_equal(out["lo_of_upper"][has_hi], value[has_hi])


def test_uniform_spacing_and_codes_round_trip():
    for q, scale in (
        (Q.get("int4"), np.abs(W).max() / 7),
        (Q.get("int4_channel"), np.abs(W).max(axis=0) / 7),
        (Q.get("int4_g32"), ref_absmax(W, "group", 32) / 7),
        (Q.uniform(step=0.2), 0.2),
    ):
        out = run_all(q)
        value, lower, upper, codes = out["value"], out["lower"], out["upper"], out["codes"]
        scale = np.broadcast_to(scale, W.shape)
        np.testing.assert_allclose(value, codes * scale, rtol=1e-6, atol=1e-7)
        has_lo, has_hi = lower < value, upper > value
        np.testing.assert_allclose((value - lower)[has_lo], scale[has_lo], rtol=1e-5)
        np.testing.assert_allclose((upper - value)[has_hi], scale[has_hi], rtol=1e-5)
        if q.bits is not None:
            np.testing.assert_array_equal(has_lo, codes > -7)
            np.testing.assert_array_equal(has_hi, codes < 7)
        else:
            assert has_lo.all() and has_hi.all()
            np.testing.assert_array_equal(codes, np.round(W / 0.2))


@pytest.mark.parametrize("name", Q.names())
def test_thresholds_closed_forms(name):
    out = run_all(name)
    t_lo, t_hi = out["t_lo"], out["t_hi"]
    assert t_lo.dtype == np.float32 and t_lo.shape == W.shape
    if Q.get(name).continuous:
        assert np.all(t_lo == -np.inf) and np.all(t_hi == np.inf)
        return
    nearest = run_all(name.replace("_stochastic", ""))
    value, lower, upper = nearest["value"], nearest["lower"], nearest["upper"]
    assert np.all((t_lo < W) & (W < t_hi))
    if name.startswith("ternary_s"):
        # support thresholds (theory.md section 9): a kept entry leaves when it falls below the largest dropped
        # magnitude, a dropped one enters when it rises above the smallest kept magnitude
        _, _, _, (max_dropped, min_kept) = ref_ternary(W, int(name[-2:]) / 100)
        expect_lo = np.where(value > 0, max_dropped, np.where(value == 0, -min_kept, -np.inf))
        expect_hi = np.where(value < 0, -max_dropped, np.where(value == 0, min_kept, np.inf))
    else:
        expect_lo = np.where(lower < value, 0.5 * (lower + value), -np.inf)
        expect_hi = np.where(upper > value, 0.5 * (upper + value), np.inf)
    np.testing.assert_allclose(t_lo, expect_lo, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t_hi, expect_hi, rtol=1e-6, atol=1e-7)
    if name == "sign":
        assert set(np.unique(np.concatenate([t_lo.ravel(), t_hi.ravel()]))) == {-np.inf, 0.0, np.inf}
    if name == "ternary":
        g = np.abs(W).mean()
        np.testing.assert_allclose(np.unique(np.abs(t_lo[np.isfinite(t_lo)])), [g / 2], rtol=1e-6)


@pytest.mark.parametrize("name", ["int4", "int4_channel", "int4_g32", "fp8_e4m3", "sign"])
def test_crossing_a_threshold_moves_the_level(name):
    """w_k just past its threshold moves the release to the adjacent code (coordinates that fix no scale)."""
    q = Q.get(name)
    out = run_all(name)
    if name == "int4_g32":
        absmax = np.abs(W) == ref_absmax(W, "group", 32)
    else:
        absmax = np.abs(W) == np.abs(W).max(axis=0 if name == "int4_channel" else None, keepdims=True)
    step = 2 if name == "sign" else 1
    batch, expected = [], []
    for k in list(zip(*np.nonzero(~absmax)))[::13]:
        for t, direction in ((out["t_hi"][k], 1), (out["t_lo"][k], -1)):
            if not np.isfinite(t):
                continue
            eps = 1e-4 * max(abs(t), 1e-2)
            code = out["codes"][k]
            for pos, new in ((t - direction * eps, code), (t + direction * eps, code + direction * step)):
                w2 = W.copy()
                w2[k] = pos
                batch.append(w2)
                expected.append((k, new))
    assert len(batch) >= 40
    got = np.asarray(jax.vmap(lambda v: q.codes(q(v), v))(jnp.asarray(np.stack(batch))))
    for b, (k, code) in enumerate(expected):
        assert got[b][k] == code, (b, k, code)


@functools.partial(jax.jit, static_argnums=(0, 2))
def threshold_jacobians(q, w, ks, eps=1e-6):
    """Jacobian of the thresholds (t_lo[ks], t_hi[ks]) by autodiff and by central differences over every w_j."""
    g = lambda w: jnp.concatenate([t.ravel()[jnp.asarray(ks)] for t in q.thresholds(w)])
    basis = jnp.eye(w.size, dtype=w.dtype).reshape((w.size, *w.shape))
    fd = jax.vmap(lambda e: (g(w + eps * e) - g(w - eps * e)) / (2 * eps))(basis)  # (N, 2 len(ks))
    return jax.jacrev(g)(w).reshape(2 * len(ks), w.size), fd.T


@pytest.mark.parametrize("name", ["int4", "int4_channel", "int4_g32", "ternary", "ternary_s33", "fp8_e4m3"])
def test_threshold_gradient_matches_finite_difference(name):
    q = Q.get(name)
    with jax.enable_x64(True):
        w = normal(17, (12, 5), np.float64)
        v, _ = reference(name, w)
        absmax = np.abs(w) == np.abs(w).max()
        # coordinates with two finite thresholds that do not fix the scale
        ks = tuple(int(k) for k in np.nonzero((np.abs(v) < np.abs(v).max()).ravel() & ~absmax.ravel())[0][:3])
        jac, fd = (np.asarray(x) for x in threshold_jacobians(q, jnp.asarray(w), ks))
        assert jac.dtype == np.float64 and len(ks) == 3
        np.testing.assert_allclose(jac, fd, rtol=1e-6, atol=1e-8)
        assert np.all(np.abs(jac).max(axis=1) > 0)  # every threshold moves with the data
        # an all-zero tensor (every |w_j| tied at the absmax / quantile) has finite threshold derivatives
        assert np.all(np.isfinite(np.asarray(threshold_jacobians(q, jnp.zeros_like(jnp.asarray(w)), ks)[0])))
        wf = w.ravel()
        if name == "int4":
            # closed form: t = s (i -+ 1/2), s = max|w| / 7, so dt/dw_j = (i -+ 1/2) sign(w_j) / 7 at the argmax only
            j = np.argmax(np.abs(wf))
            i = np.round(wf[list(ks)] / (np.abs(wf).max() / 7))
            expect = np.zeros((6, w.size))
            expect[:, j] = np.concatenate([i - 0.5, i + 0.5]) * np.sign(wf[j]) / 7
            np.testing.assert_allclose(jac, expect, rtol=1e-12, atol=1e-15)
        if name == "ternary":
            # t = -+ g/2 with g = mean|w|: dt/dw_j = -+ sign(w_j) / (2 N) for every j
            np.testing.assert_allclose(jac[3:], np.tile(np.sign(wf) / (2 * w.size), (3, 1)), rtol=1e-12)
            np.testing.assert_allclose(jac[:3], -jac[3:], rtol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# dtypes, zeros, empty
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int4_channel", "int4_stochastic", "ternary_s33", "fp8_e4m3"])
def test_float64_preserved_and_matches_reference(name):
    q = Q.get(name)
    with jax.enable_x64(True):
        w = normal(18, (48, 8), np.float64)
        out = lean(q, jnp.asarray(w), KEY, jnp.asarray(C, np.float64))
        assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(out))
        np.testing.assert_array_equal(out["grad"], C.astype(np.float64))
        if name == "int4_stochastic":
            return
        value, code = reference(name, w)
        np.testing.assert_allclose(out["q"], value, rtol=1e-12, atol=1e-15)
        if code is not None:
            np.testing.assert_array_equal(q.codes(out["q"], w), code)


@pytest.mark.parametrize("name", ["int4_channel", "ternary_s90", "fp8_e4m3"])
def test_low_precision_dtypes_preserved(name):
    q = Q.get(name)
    for dtype in (jnp.bfloat16, jnp.float16) if name == "int4_channel" else (jnp.bfloat16,):
        w = jnp.asarray(W).astype(dtype)
        out = lean(q, w, KEYS[0], jnp.asarray(C))
        assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(out))
        np.testing.assert_array_equal(np.asarray(out["grad"], np.float32), np.asarray(jnp.asarray(C).astype(dtype)))
        # computed in float32 from the same inputs, then rounded once (half a unit in the last place)
        ref = run_all(q, np.asarray(w, np.float32))
        rtol = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
        np.testing.assert_allclose(np.asarray(out["q"], np.float32), ref["q"], rtol=rtol, atol=1e-30)
        np.testing.assert_allclose(np.asarray(out["t"][1], np.float32), ref["t_hi"], rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("name", Q.names())
def test_all_zero_input(name):
    out = run_all(name, np.zeros_like(W))
    for k in ("q", "value", "lower", "upper", "n_lo", "n_hi"):
        np.testing.assert_array_equal(out[k], 0)
    assert not np.isnan(out["t_lo"]).any() and not np.isnan(out["t_hi"]).any()
    np.testing.assert_array_equal(out["grad"], C)
    # a zero channel next to non-zero ones
    w = W.copy()
    w[:, 1] = 0
    out = run_all(name, w)
    assert all(np.all(np.isfinite(out[k])) for k in ("q", "lower", "upper", "grad"))
    if name != "fp32" and not name.startswith("prune"):
        np.testing.assert_allclose(out["q"][:, 1], 0 if name != "sign" else np.abs(w).mean(), rtol=1e-6)


@jax.disable_jit()
def test_scalar_and_empty_inputs():
    for name in Q.names():
        q = Q.get(name)
        assert q(jnp.zeros((0, 3)), key=KEY).shape == (0, 3)
        assert q.thresholds(jnp.zeros((0,)))[0].shape == (0,)
        assert all(x.shape == (0,) for x in q.levels(jnp.zeros((0,)), key=KEY))
        assert q.codes(jnp.zeros((0,)), jnp.zeros((0,))).shape == (0,)
        s = q(jnp.float32(-1.75), key=KEY)
        assert s.shape == () and s.dtype == jnp.float32
        if name in ("mxint8", "mxfp4"):  # E8M0: a power of two times an element value
            assert float(s) == (-1.75 if name == "mxint8" else -1.5), name  # X = 1/4: 7 saturates at 6
        elif name not in ("ternary_s90",):
            assert float(s) == -1.75, name  # a float32 scale publishes a lone coordinate exactly (continuous)
    # round((1 - s) 1) kept entries: ternary_s33 keeps its lone coordinate, ternary_s90 keeps none
    assert float(Q.get("ternary_s33")(jnp.float32(-1.75))) == -1.75
    assert float(Q.get("ternary_s90")(jnp.float32(-1.75))) == 0.0
    assert float(Q.get("sign")(jnp.float32(-1.75))) == -1.75
    assert float(Q.get("sign@e8m0")(jnp.float32(-1.75))) == -2.0


# ------------------------------------------------------------------------------------------------------------
# Tree helpers
# ------------------------------------------------------------------------------------------------------------


def make_params():
    """Leaves of W's shape, so that `run_batch` (leaves W, 2.5 C, W - 0.3) gives every per-leaf reference."""
    return {
        "dense": {"kernel": jnp.asarray(BATCH[0]), "bias": jnp.asarray(BATCH[1])},
        "out": [jnp.asarray(BATCH[1]), jnp.asarray(BATCH[2])],
        "count": jnp.arange(3),
    }


def test_tree_helpers_with_skip():
    params = make_params()
    q = Q.get("int4")
    skip = ("bias", "count")

    @jax.jit
    def helpers(p):
        values, lowers, uppers = Q.tree_levels(q, p, skip=skip)
        return {
            "q": Q.quantize_tree(q, p, skip=skip),
            "levels": (values, lowers, uppers),
            "neighbors": Q.tree_neighbors(q, values, p, skip=skip),
            "codes": Q.tree_codes(q, values, p, skip=skip),
            "thresholds": Q.tree_thresholds(q, p, skip=skip),
        }

    got = helpers(params)
    ref = run_batch(q)  # the three distinct leaves, one by one
    for leaf, i in ((got["q"]["dense"]["kernel"], 0), (got["q"]["out"][0], 1), (got["q"]["out"][1], 2)):
        np.testing.assert_allclose(leaf, ref["q"][i], rtol=1e-6)
    for tree, key in zip((*got["levels"], *got["neighbors"]), ("value", "lower", "upper", "n_lo", "n_hi")):
        np.testing.assert_allclose(tree["out"][0], ref[key][1], rtol=1e-6)
        np.testing.assert_array_equal(tree["dense"]["bias"], params["dense"]["bias"])  # skipped: the leaf itself
    np.testing.assert_array_equal(got["codes"]["out"][1], ref["codes"][2])
    np.testing.assert_allclose(got["thresholds"][0]["dense"]["kernel"], ref["t_lo"][0], rtol=1e-6)
    np.testing.assert_allclose(got["thresholds"][1]["out"][0], ref["t_hi"][1], rtol=1e-6)
    np.testing.assert_array_equal(got["codes"]["dense"]["bias"], np.zeros(W.shape, np.int32))
    assert got["codes"]["count"].dtype == jnp.int32
    assert np.all(np.asarray(got["thresholds"][0]["dense"]["bias"]) == -np.inf)
    assert np.all(np.asarray(got["thresholds"][1]["count"]) == np.inf)
    np.testing.assert_array_equal(got["q"]["count"], params["count"])
    # the eager call gives the same leaves, and skipped leaves are passed through untouched
    eager = Q.quantize_tree(q, params, skip=skip)
    assert eager["count"] is params["count"] and eager["dense"]["bias"] is params["dense"]["bias"]
    np.testing.assert_allclose(eager["out"][1], ref["q"][2], rtol=1e-6)
    # callable skip (sees every path, in flattening order), a bare string
    seen = []
    Q.quantize_tree("sign", params, skip=lambda path, leaf: seen.append(path) or path == "count")
    assert seen == ["count", "dense/bias", "dense/kernel", "out/0", "out/1"]
    by_str = Q.quantize_tree("sign", {"a": params["out"][1], "count": params["count"]}, skip="count")
    np.testing.assert_allclose(by_str["a"], run_all("sign", BATCH[2])["q"], rtol=1e-6)
    # thresholds keep their true gradient through the tree helper: only through the absmax of the leaf
    finite_sum = lambda t: jnp.sum(jnp.where(jnp.isfinite(t), t, 0))
    g = jax.grad(lambda p: finite_sum(Q.tree_thresholds(q, p, skip=skip)[1]["dense"]["kernel"]))(
        {k: v for k, v in params.items() if k != "count"}
    )
    assert np.count_nonzero(np.asarray(g["dense"]["kernel"])) == 1
    assert np.count_nonzero(np.asarray(g["out"][0])) == 0


def test_tree_stochastic_keys_fold_in_leaf_index():
    params = make_params()
    q = Q.get("int4_stochastic")
    with pytest.raises(ValueError, match="key"):
        Q.quantize_tree(q, params, skip=["count"])
    out = Q.quantize_tree(q, params, key=KEY, skip=["count"])
    # flattening order: count, dense/bias, dense/kernel, out/0, out/1 -> leaf indices 0..4
    np.testing.assert_array_equal(out["dense"]["kernel"], q(params["dense"]["kernel"], key=jax.random.fold_in(KEY, 2)))
    np.testing.assert_array_equal(out["out"][1], q(params["out"][1], key=jax.random.fold_in(KEY, 4)))
    # equal leaves get different randomness
    assert not np.array_equal(out["out"][0], out["dense"]["bias"])
    # skipping a leaf does not change the randomness of the others
    out2 = Q.quantize_tree(q, params, key=KEY, skip=["count", "bias"])
    np.testing.assert_array_equal(out2["out"][0], out["out"][0])


def test_tree_bad_inputs():
    params = make_params()
    with pytest.raises(ValueError, match="params.*count"):
        Q.quantize_tree("int4", params)
    with pytest.raises(ValueError, match="skip"):
        Q.quantize_tree("int4", params, skip=[1, 2])
    with pytest.raises(ValueError, match="values"):
        Q.tree_codes("int4", {"a": jnp.zeros(2)}, params, skip=["count"])
    with pytest.raises(KeyError, match="int4"):
        Q.quantize_tree("int3", params)


# ------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 0}, "bits.*0"),
        ({"bits": 1}, "sign"),
        ({"bits": 64}, "bits.*64"),
        ({"bits": 17}, "bits.*17"),
        ({"bits": 4.0}, "bits.*4.0"),
        ({"bits": True}, "bits.*True"),
        ({}, "bits.*step"),
        ({"bits": 4, "step": 0.1}, "bits.*step"),
        ({"step": 0.0}, "step.*0.0"),
        ({"step": -1.0}, "step.*-1.0"),
        ({"step": float("inf")}, "step.*inf"),
        ({"step": float("nan")}, "step.*nan"),
        ({"step": "0.1"}, "step"),
        ({"bits": 4, "granularity": "row"}, "granularity.*row"),
        ({"bits": 4, "rounding": "floor"}, "rounding.*floor"),
        ({"bits": 4, "granularity": "group"}, "group_size"),
        ({"bits": 4, "group_size": 0}, "group_size.*0"),
        ({"bits": 4, "granularity": "channel", "group_size": 32}, "group_size.*32"),
        ({"bits": 4, "clip_ratio": 0.0}, "clip_ratio.*0.0"),
        ({"bits": 4, "clip_ratio": 1.5}, "clip_ratio.*1.5"),
        ({"step": 0.1, "granularity": "channel"}, "granularity"),
    ],
)
def test_uniform_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Q.uniform(**kwargs)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
def test_sparsity_bad_arguments(bad):
    with pytest.raises(ValueError, match="sparsity"):
        Q.prune(sparsity=bad)
    if bad is not None:
        with pytest.raises(ValueError, match="sparsity"):
            Q.ternary(sparsity=bad)


def test_other_bad_inputs():
    with pytest.raises(KeyError) as err:
        Q.get("int3")
    assert "int3" in str(err.value) and all(n in str(err.value) for n in Q.names())
    with pytest.raises(ValueError, match="name"):
        Q.get(4)
    for name in Q.names():
        q = Q.get(name)
        with pytest.raises(ValueError, match="`w`.*int32"):
            q(jnp.arange(4), key=KEY)
        with pytest.raises(ValueError, match="`w`.*bool"):
            q.thresholds(np.array([True, False]))
        with pytest.raises(ValueError, match="`v`.*shape"):
            q.codes(jnp.zeros(3), jnp.zeros(4))
        with pytest.raises(ValueError, match="`v`"):
            q.neighbors(jnp.zeros(4, jnp.int32), jnp.zeros(4))
    with pytest.raises(ValueError, match="`w`"):
        Q.get("int4")("abc")
    for kwargs in ({"n": 0}, {"h0": -1.0}, {"n0": float("inf")}, {"alpha": -0.1}):
        args = {"n": 100, "h0": 1.0, "n0": 100, "alpha": 0.25, **kwargs}
        n = args.pop("n")
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Q.size_adaptive(n, **args)


MODULES = ("_ste", "_base", "binary", "fp8", "identity", "prune", "registry", "ternary", "tree", "uniform")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"qmis_jax.quantizers.{module}"), verbose=False)
    assert result.failed == 0 and result.attempted >= 1
