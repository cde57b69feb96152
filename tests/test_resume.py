"""A study killed at any moment (SIGKILL) and resumed gives the same report as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TIMEOUT = 900  # a hang guard: one run takes 1 to 3 minutes on 2 cores

# Part one (validation) is left out: its points are stored and resumed by the same code as part two's (one
# stored point per unit of work), and the quick run of both parts takes 5 to 10 minutes on 2 cores.

ARGS = [
    "synthetic",
    "--quick",
    "--no-validation",
    "--n",
    "100,200",
    "--replicates",
    "48",
    "--dim",
    "4",
    "--k-modes",
    "2",
    "--quantizers",
    "int4,sign,fp32",
    "--no-progress",
]


def qmis(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "qmis_jax.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def summary(path):
    with open(os.path.join(path, "report.json")) as fh:
        report = json.load(fh)
    out = {}
    for run in report["runs"]:
        for name, q in run["quantizers"].items():
            out[(run["n"], name)] = (
                q["r_population"],
                q["r_single"]["mean"],
                q["flip_rate"],
                q["attacks"]["loss"]["advantage"],
                q["attacks"]["lira"]["auc"],
            )
    validation = report.get("validation") or {}
    for row in validation.get("rows", []) + validation.get("width", []):
        out[("validation", row["quantizer"], row["n"], row["replicates"])] = (
            row["r"],
            row["flip_rate"],
            tuple(row["mis_bracket"]),
        )
    return out, report["config_hash"]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = qmis(*ARGS, "--out", full)
    assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read()

    proc = qmis(*ARGS, "--out", killed)
    manifest = os.path.join(killed, "manifest.json")
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:  # kill as soon as some, not all, work is saved
        if os.path.exists(manifest):
            with open(manifest) as fh:
                try:
                    done = json.load(fh)["done"]
                except json.JSONDecodeError:  # never torn: writes are atomic renames
                    raise AssertionError("torn manifest") from None
            if len(done) >= 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "report.json"))

    again = qmis(*ARGS, "--out", killed)  # without --resume: refused, one line, exit 2
    assert again.wait(timeout=120) == 2 and "--resume" in again.stderr.read()
    resumed = qmis(*ARGS, "--out", killed, "--resume")
    assert resumed.wait(timeout=TIMEOUT) == 0, resumed.stderr.read()
    assert summary(killed) == summary(full)
