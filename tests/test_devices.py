"""A whole audit does not depend on the device count or the chunk size (design.md: replicate ``i`` uses
``fold_in(key, i)``).

The same audit (Gaussian mean, a fixed grid and round-to-nearest, so that every release is a function of its
trained replicate: every sharded training path of the audit, fresh data and LiRA's per-replicate data sets, at a
small compile cost) runs in two fresh processes on the CPU: one device with chunks of 4 replicates (sized from
``memory_budget``), and four virtual devices (``--xla_force_host_platform_device_count=4``) with chunks of 6, which
the replicate engine pads to 8 and splits over the four devices along its 1-D mesh. Every number of the two
reports must agree. (The sharded Newton solver is compared with one device in tests/test_train.py.)

Tolerance: ``rtol = 1e-5`` (about 80 float32 ulps) and ``atol = 1e-9``. Each replicate's program is the same in both
runs, but XLA may partition a float32 reduction differently when the batch is split over devices, which moves the
last bits; anything beyond that (a replicate trained on other data or keys, a shifted chunk, a padded replicate
leaking in) moves the statistics by far more than 1e-5 relative.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from qmis_jax._memory import replicate_bytes
from qmis_jax.studies.markdown import render

pytestmark = pytest.mark.slow  # subprocess runs on 1 and 4 host devices

RTOL, ATOL = 1e-5, 1e-9

SCRIPT = """
import json, sys
import jax
import qmis_jax as qj

report = qj.audit(
    jax.random.key(0),
    qj.problems.gaussian_mean(mu=[0.3, -0.2]),
    {"grid": qj.quantizers.uniform(step=0.5)},
    ptq="rtn",
    n=100,
    replicates=12,
    **json.loads(sys.argv[2]),
    attacks=("loss", "lira"),
    population_size=2000,
    test_size=500,
    n_boot=200,
)
with open(sys.argv[1], "w") as fh:
    json.dump(report.to_dict(), fh)
"""

# The one-device run sizes its chunks from a budget of four replicates and a bit (n = 100, p = dx = 2).
PER_REPLICATE = replicate_bytes(n=100, p=2, dx=2)
BUDGET = 4 * PER_REPLICATE + 100

# Diagnostics that describe the run rather than the result.
RUN_SPECIFIC = {
    "chunk_size",
    "peak_rss_mib",
    "device_peak_mib",
    "memory_budget_mib",
    "replicate_estimate_mib",
    "compiled_programs",  # the process's compiled programs and memory mappings depend on the chunking
    "live_compiled_programs",
    "program_releases",
    "peak_memory_mappings",
    "memory_mapping_limit",
}


def _start(out: str, devices: int, sizes: dict) -> subprocess.Popen:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, out, json.dumps(sizes)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _differences(a, b, path: str = "") -> list[str]:
    """Every leaf where ``a`` and ``b`` differ (numbers beyond the tolerance, anything else exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        if a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= ATOL + RTOL * abs(b)):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("devices")
    runs = {"one": (1, {"memory_budget": BUDGET}), "four": (4, {"chunk_size": 6})}
    procs = {name: _start(str(folder / f"{name}.json"), dev, sizes) for name, (dev, sizes) in runs.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err.decode()[-3000:]}"
    out = {}
    for name in runs:
        with open(folder / f"{name}.json") as fh:
            out[name] = json.load(fh)
    return out


def test_the_runs_used_one_and_four_devices(reports):
    assert reports["one"]["environment"]["device_count"] == 1
    assert reports["four"]["environment"]["device_count"] == 4
    assert reports["one"]["diagnostics"]["chunk_size"] == 4  # from the budget: three chunks of 4
    assert reports["four"]["diagnostics"]["chunk_size"] == 6  # two chunks, padded to 8 over 4 devices


def test_every_number_agrees_across_device_counts_and_chunk_sizes(reports):
    one, four = reports["one"], reports["four"]
    # the quantities of the reliability contract, named so that a missing one fails loudly
    for name in ("grid",):
        a, b = one["quantizers"][name], four["quantizers"][name]
        assert 0.05 < a["flip_rate"] < 0.95  # a statistic that depends on every replicate's own data
        for key in ("r_population", "flip_rate", "mis_asymptotic"):
            assert _differences(a[key], b[key]) == [], (name, key)
        assert _differences(a["r_single"], b["r_single"]) == []
        assert _differences(a["utility"], b["utility"]) == []
        for attack in ("loss", "lira"):
            for key in ("advantage", "advantage_heldout", "auc", "tpr_at_1pct_fpr"):
                assert _differences(a["attacks"][attack][key], b["attacks"][attack][key]) == [], (name, attack, key)
    # and everything else in the reports, save what describes the machine and the run
    strip = lambda r: {
        **{k: v for k, v in r.items() if k != "environment"},
        "diagnostics": {k: v for k, v in r["diagnostics"].items() if k not in RUN_SPECIFIC},
    }
    assert _differences(strip(one), strip(four)) == []
    assert one["ranking"] == four["ranking"] and one["config_hash"] == four["config_hash"]


def test_reports_record_the_budget_the_chunks_and_the_peak_memory(reports):
    """``diagnostics`` hold the budget, the per-replicate estimate, the chunk size and the peak memory (the
    process's peak resident set; no device peak on CPU), and report.md shows them."""
    diag = reports["one"]["diagnostics"]
    assert diag["memory_budget_mib"] == round(BUDGET / 2**20, 3)
    assert diag["replicate_estimate_mib"] == round(PER_REPLICATE / 2**20, 3)
    assert reports["four"]["diagnostics"]["memory_budget_mib"] == 2048.0  # the default, 2 GiB
    for run in reports.values():
        # a process that imported JAX and compiled an audit holds well over 50 MiB and far less than 1 TiB
        assert 50 < run["diagnostics"]["peak_rss_mib"] < 2**20
        assert run["diagnostics"]["device_peak_mib"] is None
    md = render("test", [reports["one"]])
    line = next(ln for ln in md.splitlines() if ln.startswith("Diagnostics: "))
    assert "chunk_size = 4" in line and "device_peak_mib = -" in line and "peak_rss_mib = " in line
