"""Memory budgets and peak memory: sizes on the command line, the per-replicate estimate, the peaks reported.

The budget's effect on an audit (chunks sized from it, diagnostics in the report and in report.md) is checked on
a real run in tests/test_devices.py; refusals of impossible budgets are rows of tests/test_hostile.py.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from qmis_jax import _memory
from qmis_jax.cli import build_parser
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


def test_replicate_estimate_counts_its_terms():
    # float32: 3 (2p + 2)-column blocks of n rows (gradients, loss differences), 4 copies of the data, p x p
    n, p, dx = 1000, 129, 128
    assert _memory.replicate_bytes(n=n, p=p, dx=dx) == 4 * (3 * n * (2 * p + 2) + 4 * n * (dx + 1) + p * p)
    assert _memory.replicate_bytes(n=n, p=p, dx=dx, itemsize=8) == 2 * _memory.replicate_bytes(n=n, p=p, dx=dx)
    # the synthetic study refuses budgets with the same estimate as the audit
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
