"""Compile cost drives the audit's design: each program is compiled once per static configuration and shape, and a
second audit of the same shapes compiles nothing at all."""

import contextlib

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import monitoring

import qmis_jax as qj
from qmis_jax import _runtime
from qmis_jax.audit import _programs
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.train import _engine

pytestmark = pytest.mark.slow  # whole audits, twice

TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"


_ACTIVE: list[dict[str, int]] = []


def _listener(event, duration, **kwargs):
    for counts in _ACTIVE:
        if event in counts:
            counts[event] += 1


monitoring.register_event_duration_secs_listener(_listener)  # once per session; counts only inside the block


@contextlib.contextmanager
def count_compilations():
    """Count the programs traced and compiled (by XLA, or loaded from the persistent cache) inside the block."""
    counts = {TRACE: 0, COMPILE: 0}
    _ACTIVE.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE.remove(counts)


PROBLEM = qj.problems.gaussian_mean(mu=[0.3, -0.2])
SETTINGS = dict(n=40, replicates=8, attacks=("loss", "lira"), population_size=4000, test_size=500, n_boot=50)


def test_a_second_audit_of_the_same_shapes_compiles_nothing(monkeypatch):
    # no release of compiled programs, however crowded the test process's memory mappings are
    monkeypatch.setenv(_runtime.RELEASE_ENV, str(10**9))
    qs = ["int4", "sign"]
    qj.audit(jax.random.key(0), PROBLEM, qs, **SETTINGS)
    with count_compilations() as counts:
        report = qj.audit(jax.random.key(1), PROBLEM, qs, **SETTINGS)
    assert report.ranking  # it ran
    assert counts[COMPILE] == 0, f"{counts[COMPILE]} programs compiled again"
    # the only traces left are abstract shape checks (jax.eval_shape of one example's loss or of a sample), which
    # compile nothing; a program traced again would also have been compiled (or fetched) again, counted above
    assert counts[TRACE] <= 8, f"{counts[TRACE]} programs traced again"


def test_statistics_and_lira_share_one_release_program_per_quantizer(monkeypatch):
    """The swap coupling of the fresh-data statistics and the embedded-target LiRA chunks have the same shapes, so
    each quantizer's release program is traced once for both, and its single-model program once."""
    monkeypatch.setenv(_runtime.RELEASE_ENV, str(10**9))  # no release of compiled programs between the stages
    _programs.single_program.cache_clear()
    _programs.release_program.cache_clear()
    qj.audit(jax.random.key(2), PROBLEM, ["int4", "ternary"], **SETTINGS)
    opts = IndicatorOptions()
    for name in ("int4", "ternary"):
        for make in (_programs.single_program, _programs.release_program):
            assert make(qj.quantizers.get(name), PROBLEM, opts)._cache_size() == 1, (name, make.__name__)
    assert _programs.single_program.cache_info().currsize == 2
    assert _programs.release_program.cache_info().currsize == 2


@pytest.mark.parametrize("chunk_size", [3, 8])
def test_training_compiles_once_per_chunk_shape(chunk_size, monkeypatch):
    """Chunks of one size share one compiled training program (a shorter last chunk is padded to their size, so it
    adds none): the first call traces it once for all its chunks, the second compiles nothing."""
    _engine._fresh_program.cache_clear()  # a new program, traced by the first call below
    chex.clear_trace_counter()  # chex counts by the wrapper's place in the source: one count per case
    # every trace of the chunk program traces one replicate's training once (vmap and lax.map trace their body once)
    monkeypatch.setattr(_engine, "_train_one", chex.assert_max_traces(_engine._train_one, n=1))
    with count_compilations() as counts:
        qj.train.fit_fresh(jax.random.key(3), PROBLEM, n=33, replicates=8, chunk_size=chunk_size)
    assert counts[COMPILE] >= 1
    with count_compilations() as counts:
        res = qj.train.fit_fresh(jax.random.key(4), PROBLEM, n=33, replicates=8, chunk_size=chunk_size)
    assert res.params["mu"].shape == (8, 2)
    assert counts[COMPILE] == 0
    assert jnp.all(jnp.isfinite(res.params["mu"]))
