"""Memory budgets and peak memory: sizes on the command line, the per-replicate estimate, the peaks reported.

The budget's effect on an audit (chunks sized from it, diagnostics in the report and in report.md) is checked on
a real run in tests/test_devices.py; refusals of impossible budgets are rows of tests/test_hostile.py.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qmis_jax import _memory, quantizers
from qmis_jax.audit._programs import single_program
from qmis_jax.cli import build_parser
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.problems import logistic_mixture
from qmis_jax.studies import _budget, synthetic


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("536870912", 2**29),
        ("512M", 512 * 2**20),
        ("512m", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("2GiB", 2 * 2**30),
        ("1.5gb", 3 * 2**29),
        ("64K", 65536),
        ("1T", 2**40),
        (" 3 G ", 3 * 2**30),
    ],
)
def test_sizes_in_bytes_and_binary_units(text, expected):
    assert _memory.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1", "0", "0.5", "2X", "nan", "inf", "1e400", "2 GB extra", "1,5G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        _memory.parse_bytes(text)


def test_the_command_line_passes_the_budget_in_bytes():
    parser = build_parser()
    for command in (["synthetic"], ["molecular", "--dataset", "solubility"], ["audit", "--params", "p", "--data", "d"]):
        assert _budget(parser.parse_args([*command, "--memory-budget", "512M"])) == 512 * 2**20
        assert _budget(parser.parse_args(command)) == 2 * 2**30  # the default, 2G


def _compiled_audit_bytes(n: int, dim: int, replicates: int) -> int:
    """Argument + output + temporary bytes XLA reports for the audit's compiled per-replicate program (the
    releases, the single-model indicator and the code comparison of ``replicates`` float32 logistic replicates)."""
    problem, q, opts = logistic_mixture(dim=dim), quantizers.get("int8"), IndicatorOptions()
    key = jax.random.key(0)
    x, y = problem.sample(key, n)
    params0 = problem.init(key)
    stack = lambda a: jnp.broadcast_to(a, (replicates, *a.shape))  # noqa: E731
    pop_published = quantizers.tree_published(q, params0, params0, skip=opts.skip)
    args = (jax.tree.map(stack, params0), stack(x), stack(y), jax.random.split(key, replicates), pop_published)
    stats = single_program(q, problem, opts).lower(*args).compile().memory_analysis()
    if stats is None:  # the CPU backend (CI's) always reports them: there the test must run
        assert jax.default_backend() != "cpu", "XLA's CPU backend reported no compiled memory statistics"
        pytest.skip("this backend reports no compiled memory statistics")
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def test_replicate_estimate_bounds_the_compiled_audit_program():
    # The audit sizes its chunks as memory_budget // replicate_bytes: a chunk of R replicates must fit in R times
    # the estimate. XLA's own figures for the compiled program (CPU, float32) are the reference: the estimate is an
    # upper bound, and not a loose one (measured 1.5x at dim 4, 1.8x at dim 16; asserted within 3x), and it grows
    # like the compiled program when n doubles (both by 2 within 10%).
    r = 2
    sizes = [(200, 4), (400, 4), (400, 16)]
    compiled = {s: _compiled_audit_bytes(*s, r) for s in sizes}
    estimate = {(n, d): r * _memory.replicate_bytes(n=n, p=d + 1, dx=d) for n, d in sizes}
    for s in sizes:
        assert compiled[s] <= estimate[s] <= 3 * compiled[s], (s, compiled[s], estimate[s])
    for ratios in (compiled, estimate):
        assert ratios[(400, 4)] / ratios[(200, 4)] == pytest.approx(2.0, rel=0.1)
    # float64 doubles every term
    assert _memory.replicate_bytes(n=400, p=5, dx=4, itemsize=8) == 2 * _memory.replicate_bytes(n=400, p=5, dx=4)


def test_the_synthetic_study_refuses_budgets_with_the_audits_estimate():
    cfg = synthetic.SyntheticConfig(n_values=(500, 2000), dim=16, validation=False)
    assert synthetic.estimate_bytes(cfg) == _memory.replicate_bytes(n=2000, p=17, dx=16)
    # part one (logistic in validation_dim, up to validation_n_max) counts when it is the larger
    cfg = synthetic.SyntheticConfig(n_values=(100,), dim=4, validation_dim=8, validation_n_max=50_000)
    assert synthetic.estimate_bytes(cfg) == _memory.replicate_bytes(n=50_000, p=9, dx=8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_matches_the_kernels_high_water_mark():
    def vm_hwm() -> int:
        with open("/proc/self/status") as fh:
            line = next(ln for ln in fh if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB

    before = vm_hwm()
    block = np.ones(64 * 2**20 // 8)  # touch 64 MiB so the peak moves
    peak = _memory.peak_rss_bytes()
    after = vm_hwm()
    assert block.sum() > 0
    assert before <= peak <= after + 2**20
    assert peak >= 64 * 2**20


class _Device:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


def test_device_peak_is_the_largest_reported_and_none_without_reports():
    assert _memory.device_peak_bytes() is None  # CPU devices report nothing
    devices = [_Device({"peak_bytes_in_use": 3 * 2**20}), _Device(None), _Device({"peak_bytes_in_use": 5 * 2**20})]
    assert _memory.device_peak_bytes(devices) == 5 * 2**20
    assert _memory.device_peak_bytes([_Device(None), _Device(NotImplementedError("no stats"))]) is None
    assert _memory.mib(5 * 2**20) == 5.0 and _memory.mib(None) is None and _memory.mib(1536) == 0.001
