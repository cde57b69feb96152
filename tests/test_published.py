"""What a release publishes, and whether two releases differ (theory.md sections 9-10).

``tree_published`` / ``releases_differ`` compare everything published as stored (element codes, scale codes, the
bits of float leaves), and the Monte Carlo flip (``single_program``) and the swap coupling (``_releases_differ``)
of the audit both use them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qmis_jax as qj
import qmis_jax.quantizers as Q
from qmis_jax.audit import _programs, _statistics
from qmis_jax.indicator.options import IndicatorOptions

# int4@e8m0: [0.75, 0.5] is codes [3, 2] at scale 2^-2 in A's codebook and codes [6, 4] at 2^-3 in B's
SAME_VALUES = {"w": jnp.array([0.75, 0.5])}
A = {"w": jnp.array([1.0, 0.5])}  # max 1.0: scale 2^(0 - 2)
B = {"w": jnp.array([0.75, 0.5])}  # max 0.75: scale 2^(-1 - 2)


def _variants() -> list[str]:
    out = []
    for name in Q.names():
        out.append(name)
        q = Q.get(name)
        if q.scaled:
            out += [f"{name}@{fmt}" for fmt in Q.SCALE_FORMATS if fmt != q.scale_format]
    return out


def _params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)},
        "bias": jnp.asarray(rng.standard_normal(3), jnp.float32),
    }


def _release(q, params, skip=None):
    key = jax.random.key(3) if q.stochastic else None
    return Q.quantize_tree(q, params, key=key, skip=skip)


# ------------------------------------------------------------------------------------------------------------
# tree_published / releases_differ
# ------------------------------------------------------------------------------------------------------------


def test_equal_values_with_other_codes_are_another_release():
    q = Q.get("int4@e8m0")
    np.testing.assert_array_equal(SAME_VALUES["w"], [0.75, 0.5])
    pa = Q.tree_published(q, SAME_VALUES, A)["w"]
    pb = Q.tree_published(q, SAME_VALUES, B)["w"]
    assert isinstance(pa, Q.PublishedLeaf)
    assert pa.codes.tolist() == [3, 2] and int(pa.scale_codes) == -2 and pa.float_bits.shape == (0,)
    assert pb.codes.tolist() == [6, 4] and int(pb.scale_codes) == -3
    assert bool(Q.releases_differ(q, SAME_VALUES, A, SAME_VALUES, B))
    assert bool(Q.releases_differ("int4@e8m0", SAME_VALUES, B, SAME_VALUES, A))
    assert not bool(Q.releases_differ(q, SAME_VALUES, A, SAME_VALUES, A))
    assert not bool(Q.releases_differ(q, SAME_VALUES, A, {"w": jnp.array([0.75, 0.5])}, {"w": jnp.array([1.0, 0.5])}))


def test_an_all_zero_ternary_block_with_two_scale_codes_is_two_releases():
    q = Q.get("ternary@e8m0")
    zeros = {"w": jnp.zeros(4)}
    a = {"w": jnp.array([1.0, -1.0, 1.0, 1.0])}  # mean 1: scale 2^0
    b = {"w": jnp.array([0.25, -0.25, 0.25, 0.25])}  # mean 1/4: scale 2^-2
    assert Q.tree_published(q, zeros, a)["w"].codes.tolist() == [0, 0, 0, 0]
    assert Q.tree_published(q, zeros, b)["w"].codes.tolist() == [0, 0, 0, 0]
    assert bool(Q.releases_differ(q, zeros, a, zeros, b))
    assert not bool(Q.releases_differ(q, zeros, a, zeros, {"w": a["w"] * 1.1}))  # 2^round(log2 1.1) = 1


@pytest.mark.parametrize("name", _variants())
def test_equal_releases_of_equal_params_do_not_differ(name):
    q = Q.get(name)
    params = _params()
    copy = jax.tree.map(lambda a: jnp.array(np.asarray(a)), params)
    for skip in (None, ("bias",)):
        release = _release(q, params, skip)
        assert not bool(Q.releases_differ(q, release, params, _release(q, copy, skip), copy, skip=skip))


@pytest.mark.parametrize("name", ["fp32", "prune50", "int4", "sign", "int4@e8m0"])
def test_a_float_number_differing_in_its_last_bit_is_another_release(name):
    q = Q.get(name)
    params = _params()
    release = _release(q, params)
    bumped = dict(params, bias=params["bias"].at[1].set(jnp.nextafter(params["bias"][1], jnp.inf)))
    # the bias left in float32 (skipped): its last bit is published
    assert bool(Q.releases_differ(q, release, params, dict(release, bias=bumped["bias"]), bumped, skip=["bias"]))
    if q.continuous or not q.discrete_scale:  # fp32 / prune values, or a float32 scale: the bits are published
        new = _release(q, bumped)
        assert bool(Q.releases_differ(q, release, params, new, bumped))
    else:  # the scale code and the element codes of int4@e8m0 do not move with one bit of the bias
        assert not bool(Q.releases_differ(q, release, params, _release(q, bumped), bumped))


def test_float_leaves_are_compared_as_stored():
    q = Q.get("fp32")
    pos, neg = {"w": jnp.array([0.0, 1.0])}, {"w": jnp.array([-0.0, 1.0])}
    assert Q.tree_published(q, pos, pos)["w"].float_bits.dtype == jnp.uint32
    assert bool(Q.releases_differ(q, pos, pos, neg, neg))  # -0.0 is stored with other bits
    nan = {"w": jnp.array([jnp.nan, 1.0])}
    assert not bool(Q.releases_differ(q, nan, nan, nan, nan))  # the same NaN is the same number
    ints = {"w": jnp.array([0.5, 1.0]), "step": jnp.array(3, jnp.int32)}
    other = dict(ints, step=jnp.array(4, jnp.int32))
    assert bool(Q.releases_differ("int4@e8m0", ints, ints, other, other, skip=["step"]))


@pytest.mark.parametrize(
    "name", ["int4@e8m0", "sign@bf16", "ternary_s90@e8m0", "mxfp4", "int8", "prune50", "int4_stochastic@e8m0"]
)
def test_vmap_and_jit_agree_with_the_per_model_call(name):
    q = Q.get(name)
    rng = np.random.default_rng(5)
    base = _params()
    batch = jax.tree.map(lambda a: jnp.asarray(a[None] + 0.02 * rng.standard_normal((8, *a.shape)), a.dtype), base)
    keys = jax.random.split(jax.random.key(1), 8)

    def release(p, k):
        return Q.quantize_tree(q, p, key=k if q.stochastic else None, skip=["bias"])

    releases = jax.vmap(release)(batch, keys)
    take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    ref_release, ref_params = take(releases, 0), take(batch, 0)

    def differ(r, p):
        return Q.releases_differ(q, r, p, ref_release, ref_params, skip=["bias"])

    got = np.asarray(jax.jit(jax.vmap(differ))(releases, batch))
    want = [bool(differ(take(releases, i), take(batch, i))) for i in range(8)]
    assert got.shape == (8,) and got.tolist() == want
    assert want == [False] + [True] * 7  # the bias (published in float32) moves in every other replicate


def test_published_differ_refuses_other_structures():
    q = Q.get("int4@e8m0")
    a = Q.tree_published(q, SAME_VALUES, A)
    with pytest.raises(ValueError, match="`b`"):
        Q.published_differ(a, {"v": a["w"]})
    with pytest.raises(ValueError, match="`release`|`values`"):
        Q.tree_published(q, {"v": SAME_VALUES["w"]}, A)


# ------------------------------------------------------------------------------------------------------------
# The audit's flip and swap coupling
# ------------------------------------------------------------------------------------------------------------


def test_the_swap_coupling_compares_what_is_published():
    q = Q.get("int4@e8m0")
    stack = lambda *ts: jax.tree.map(lambda *a: jnp.stack(a), *ts)  # noqa: E731
    release = stack(SAME_VALUES, SAME_VALUES, SAME_VALUES)
    params = stack(A, A, B)
    params_s = stack(B, A, B)
    got = _statistics._releases_differ(q, release, params, release, params_s, None)
    assert np.asarray(got).tolist() == [True, False, False]


def test_the_flip_compares_what_is_published():
    q = Q.get("int8@e8m0")  # max 1.0: scale 2^-6, codes [64, 32]; max 2.5: scale 2^-5, codes [32, 16]
    problem = qj.problems.gaussian_mean(mu=[1.0, 0.5])
    opts = IndicatorOptions(ptq="rtn")
    params = {"mu": jnp.array([[1.0, 0.5], [1.0, 0.5], [0.9, 0.5]], jnp.float32)}
    x, y = jax.vmap(lambda k: problem.sample(k, 16))(jax.random.split(jax.random.key(0), 3))
    keys = jax.random.split(jax.random.key(1), 3)
    release = {"mu": jnp.array([1.0, 0.5], jnp.float32)}
    program = _programs.single_program(q, problem, opts)
    same_codebook = Q.tree_published(q, release, {"mu": jnp.array([1.0, 0.5])})
    single, same = program(params, x, y, keys, same_codebook)
    np.testing.assert_array_equal(single.release["mu"][:2], [[1.0, 0.5], [1.0, 0.5]])
    assert np.asarray(same).tolist() == [True, True, False]
    # the same values in a codebook of twice the scale: other codes, another scale code, a flip
    other_codebook = Q.tree_published(q, release, {"mu": jnp.array([2.5, 0.5])})
    assert other_codebook["mu"].codes.tolist() == [32, 16]
    _, same = program(params, x, y, keys, other_codebook)
    assert np.asarray(same).tolist() == [False, False, False]


def test_the_population_audit_carries_what_it_publishes():
    q = Q.get("int4@e8m0")
    problem = qj.problems.gaussian_mean(mu=[1.0, 0.37])
    theta_star = problem.population(jax.random.key(0))
    x, y = problem.sample(jax.random.key(1), 4000)
    pop = qj.indicator.population_indicator(q, problem, theta_star, x, y, n=50, options=IndicatorOptions(ptq="rtn"))
    assert pop._fields[-1] == "published"
    want = Q.tree_published(q, pop.release, theta_star)
    assert not bool(Q.published_differ(pop.published, want))
    assert pop.published["mu"].codes.tolist() == [4, 1] and int(pop.published["mu"].scale_codes) == -2
