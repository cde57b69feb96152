"""Every PRNG key an audit derives is used for one purpose only.

Under JAX's partitionable threefry ``split(key, k)[j] == fold_in(key, j)``, so a replicate's data key
``fold_in(key, i)`` would equal a subkey ``split(key, k)[i]`` derived from the same key for another purpose (the
shared initialisation, the minibatches, the GLM pilot, the attacks' metrics). These tests build the keys of a small
audit (16 replicates, two quantizers) from the derivations the package uses (:func:`qmis_jax.audit._plan.plan`,
:func:`qmis_jax.train._engine.training_keys` and the derivations written in ``qmis_jax/audit``), including the
keys ``problem.sample`` and ``problem.init`` derive inside, and check that no two coincide; and they check that the
engine draws its data sets and initialisations from those subkeys.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qmis_jax.audit import audit as run_audit
from qmis_jax.audit._plan import plan
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import logistic_mixture, mlp_mixture
from qmis_jax.problems._mixture import mixture_centres
from qmis_jax.train import fit_data, fit_fresh, replicate_data
from qmis_jax.train._engine import TrainingKeys, training_keys

R = 16  # replicates (fresh-data and embedded-target designs)
QUANTIZERS = ("int4", "int4_stochastic")
fold_in, split = jax.random.fold_in, jax.random.split


def _bits(key) -> tuple[int, ...]:
    return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _old_training_keys(key) -> TrainingKeys:
    """The derivation before the keys were separated: data sets from ``fold_in(key, i)``, ``k_init, k_batch =
    split(key)`` and the pilot from ``split(key, 3)[2]``."""
    k_init, k_batch = split(key)
    return TrainingKeys(key, k_init, k_batch, split(key, 3)[2])


def _small_plan(key):
    """The audit's plan of a small audit (the options :func:`qmis_jax.audit` passes, its defaults elsewhere)."""
    problem = logistic_mixture(dim=4, k_modes=2)
    defaults = {k: p.default for k, p in inspect.signature(run_audit).parameters.items()}
    given = dict(
        n=40,
        replicates=R,
        attacks=("loss", "lira", "lira_pool"),
        indicator=IndicatorOptions(),
        test_size=100,
        n_boot=10,
    )
    kwargs = {
        name: given[name] if name in given else defaults[name]
        for name, p in inspect.signature(plan).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    return plan(key, problem, list(QUANTIZERS), **kwargs)


def audit_keys(key, derive=training_keys) -> dict[str, jax.Array]:
    """Every key a small audit derives, by name (one entry per use; a key used twice for the same purpose, as the
    swapped twin's minibatch key, appears once). ``derive``: the training engine's subkeys of a key."""
    keys: dict[str, jax.Array] = {}
    # nnx.Rngs(params=k) draws fold_in(k, 0), fold_in(k, 1), ... (checked in test_sampler_and_init_derivations)
    init_stream = 2  # the MLP's two kernels

    def add(name, k):
        keys[name] = k

    def sampled(name, k):  # a key given to problem.sample: the mixture sampler's k_y, k_m, k_z = split(k, 3)
        add(name, k)
        for j, part in enumerate(split(k, 3)):
            add(f"{name}.sample[{j}]", part)

    def training(name, k, *, fresh: bool, data: str | None = None):
        """The engine's subkeys of ``k`` with their replicates' keys (fit_fresh, fit_data, fit, replicate_data)."""
        t = derive(k)
        add(f"{name}.init", t.init)  # the shared initialisation problem.init(init)
        for c in range(init_stream):
            add(f"{name}.init.stream[{c}]", fold_in(t.init, c))
        add(f"{name}.batch", t.batch)
        for i in range(R):
            add(f"{name}.batch[{i}]", fold_in(t.batch, i))
        if fresh:
            add(f"{name}.data", t.data)
            for i in range(R):
                sampled(f"{data or name}.data[{i}]", fold_in(t.data, i))
            sampled(f"{name}.pilot", t.pilot)

    p = _small_plan(key)
    ak = p.keys
    for field in ak._fields:
        add(f"plan.{field}", getattr(ak, field))
    # fresh-data replicates (audit/_train.py), their data regenerated (audit/_statistics.py); theta* starts from the
    # same shared initialisation (audit/_population.py)
    training("train", ak.train, fresh=True)
    # non-members of the LOSS attack: replicate_data(keys.nonmember); the attack's metric keys (audit/_attacks.py)
    training("nonmember", ak.nonmember, fresh=True)
    add("loss.metrics", fold_in(ak.nonmember, 7))
    add("loss.epsilon", fold_in(ak.nonmember, 8))
    # the swap coupling's fresh points: replicate_data(keys.swap, n=1)
    training("swap", ak.swap, fresh=True)
    # population stage (audit/_population.py): big, star, select samples and the flip key
    for j, what in ((1, "big"), (2, "star"), (3, "select")):
        sampled(f"population.{what}", fold_in(ak.population, j))
    add("population.flip", fold_in(ak.population, 4))
    add("population.more", fold_in(ak.population, 5))  # further chunks c >= 1 of the gap sample
    for c in range(1, 5):
        sampled(f"population.more[{c}]", fold_in(fold_in(ak.population, 5), c))
    sampled("plan.test", ak.test)
    # embedded-target design (audit/_attacks.py)
    k_targets, k_member, k_fresh, k_fit = split(ak.lira, 4)
    sampled("lira.targets", k_targets)
    add("lira.member", k_member)
    for i in range(R):
        add(f"lira.member[{i}]", fold_in(k_member, i))
        sampled(f"lira.fresh[{i}]", fold_in(k_fresh, i))
    add("lira.fresh", k_fresh)
    add("lira.fit", k_fit)
    training("lira.fit", k_fit, fresh=False)
    sampled("lira.rmia_population", fold_in(ak.lira, 11))
    add("lira.metrics", fold_in(ak.lira, 7))
    add("lira.epsilon", fold_in(ak.lira, 8))
    # pool design (audit/_attacks.py)
    k_data, k_member, k_fit = split(ak.pool, 3)
    sampled("pool.data", k_data)
    add("pool.member", k_member)
    add("pool.fit", k_fit)
    training("pool.fit", k_fit, fresh=False)
    add("pool.metrics", fold_in(ak.pool, 7))
    # stochastic quantizers: population, per-replicate statistics, embedded-target and pool releases
    add("quantize.population", fold_in(ak.quantize, 0))
    for j in range(len(QUANTIZERS)):
        for offset, what in ((1, "statistics"), (1000, "lira"), (2000, "pool")):
            base = fold_in(ak.quantize, offset + j)
            add(f"quantize.{what}[{j}]", base)
            for i in range(R):
                add(f"quantize.{what}[{j}][{i}]", fold_in(base, i))
    return keys


def collisions(keys: dict[str, jax.Array]) -> list[list[str]]:
    """Groups of names whose keys coincide (compared by ``jax.random.key_data``)."""
    seen: dict[tuple[int, ...], list[str]] = {}
    for name, k in keys.items():
        seen.setdefault(_bits(k), []).append(name)
    return [names for names in seen.values() if len(names) > 1]


def test_partitionable_threefry_makes_split_a_fold_in():
    # The premise of the separation: with jax_threefry_partitionable (the default of the pinned jax 0.9.2), split
    # parts are fold_ins of the same key, so a key cannot be split for one use and folded per replicate for another.
    assert jax.config.jax_threefry_partitionable  # the runtime the project pins
    key = jax.random.key(5)
    assert _bits(split(key)[0]) == _bits(fold_in(key, 0))
    assert _bits(split(key)[1]) == _bits(fold_in(key, 1))
    assert _bits(split(key, 3)[2]) == _bits(fold_in(key, 2))


@pytest.mark.parametrize("partitionable", [True, False])
def test_no_two_keys_coincide_under_either_threefry(partitionable):
    # the separation does not rest on the premise: it holds with the flag off too
    with jax.threefry_partitionable(partitionable):
        assert collisions(audit_keys(jax.random.key(3))) == []


@pytest.mark.parametrize("seed", [0, 1445])
def test_no_two_keys_of_an_audit_coincide(seed):
    keys = audit_keys(jax.random.key(seed))
    assert len(keys) > 500
    assert collisions(keys) == []


def test_the_old_derivation_collides():
    # The check has power: with data sets from fold_in(key, i) and k_init, k_batch = split(key), replicate 0's data
    # key is the initialisation key, replicate 1's the minibatch key and replicate 2's the pilot's (under
    # partitionable threefry); replicates 7 and 8's non-members reuse the LOSS attack's metric keys.
    with jax.threefry_partitionable(True):
        groups = {frozenset(g) for g in collisions(audit_keys(jax.random.key(0), derive=_old_training_keys))}
    assert frozenset({"train.data[0]", "train.init"}) in groups
    assert frozenset({"train.data[1]", "train.batch"}) in groups
    assert frozenset({"train.data[2]", "train.pilot"}) in groups
    # the MLP's kernels were drawn with replicate 0's label and mode keys
    assert frozenset({"train.data[0].sample[0]", "train.init.stream[0]"}) in groups
    assert frozenset({"nonmember.data[7]", "loss.metrics"}) in groups
    assert frozenset({"nonmember.data[8]", "loss.epsilon"}) in groups


def test_training_keys_are_one_split():
    key = jax.random.key(3)
    t = training_keys(key)
    assert t._fields == ("data", "init", "batch", "pilot")
    for part, ref in zip(t, split(key, 4)):
        assert _bits(part) == _bits(ref)
    assert len({_bits(k) for k in t}) == 4


def test_sampler_and_init_derivations():
    # The key derivations audit_keys assumes inside the problems: the mixture sampler's k_y, k_m, k_z =
    # split(key, 3) (labels, modes, noise), and nnx.Rngs(params=k) drawing fold_in(k, 0), fold_in(k, 1), ...
    prior = 0.3
    p = logistic_mixture(dim=3, k_modes=2, seed=4, prior=prior)
    key = jax.random.key(9)
    x, y = p.sample(key, 50)
    k_y, k_m, k_z = split(key, 3)
    cls = jax.random.bernoulli(k_y, prior, (50,)).astype(jnp.int32)
    mode = jax.random.randint(k_m, (50,), 0, 2)
    centres = jnp.asarray(mixture_centres(dim=3, k_modes=2, separation=2.5, scale=2.0, seed=4), x.dtype)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(cls, y.dtype))
    np.testing.assert_allclose(np.asarray(x), np.asarray(centres[cls, mode] + jax.random.normal(k_z, (50, 3))))
    rngs = nnx.Rngs(params=key)
    assert _bits(rngs.params()) == _bits(fold_in(key, 0))
    assert _bits(rngs.params()) == _bits(fold_in(key, 1))


def _tree_equal(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7), a, b)


def test_engine_draws_data_and_initialisations_from_their_subkeys():
    # With a zero learning rate the trained parameters are the initialisation: the shared one is
    # problem.init(training_keys(key).init), the separate ones problem.init(fold_in(init, i)); the data sets are
    # problem.sample(fold_in(training_keys(key).data, i), n).
    mlp = mlp_mixture(dim=3, k_modes=2, hidden=4)
    key = jax.random.key(21)
    t = training_keys(key)
    x, y = replicate_data(key, mlp, n=8, index=np.arange(3))
    for i in range(3):
        xi, yi = mlp.sample(fold_in(t.data, i), 8)
        np.testing.assert_allclose(np.asarray(x[i]), np.asarray(xi), rtol=1e-6, atol=1e-6)  # jit vs eager rounding
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(yi))
    frozen = dict(optimizer=optax.sgd(0.0), max_steps=1)
    shared = fit_data(key, mlp, x, y, **frozen)
    fresh = fit_fresh(key, mlp, n=8, replicates=3, **frozen)
    separate = fit_data(key, mlp, x, y, shared_init=False, **frozen)
    init = mlp.init(t.init)
    for i in range(3):
        _tree_equal(jax.tree.map(lambda a, i=i: a[i], shared.params), init)
        _tree_equal(jax.tree.map(lambda a, i=i: a[i], fresh.params), init)
        _tree_equal(jax.tree.map(lambda a, i=i: a[i], separate.params), mlp.init(fold_in(t.init, i)))
