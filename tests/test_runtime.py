"""The runtime the package runs on: the deadlock guard, bounded compiled-program memory, the stall watchdog.

- The deadlock probe (``tests/_deadlock_probe.py``): several independent batched LAPACK kernels in one ``jit``,
  run ``PROBE_RUNS`` times in a process pinned to 2 CPUs, must return within ``PROBE_TIMEOUT`` seconds. On jaxlib
  0.10.2 the same probe stops for good within its first runs; on the pinned 0.9.2 it takes about 2 s.
- The guard: an affected jaxlib warns once at import (decided without starting a backend) and makes ``qmis``
  refuse a study with one line and exit status 2 unless overridden.
- Many audits of different shapes in one process keep the memory-mapping count bounded.
- An injected stall ends a study with a stack dump, one line on stderr and exit status 3.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from qmis_jax import _runtime, _watchdog
from qmis_jax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_RUNS = 200
PROBE_TIMEOUT = 120  # seconds; the probe needs about 2 s of work plus the interpreter's start on the pinned jaxlib


def _python(code: str, *, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_batched_lapack_probe_returns_on_two_cpus():
    probe = os.path.join(ROOT, "tests", "_deadlock_probe.py")
    try:
        done = subprocess.run(
            [sys.executable, probe, "--runs", str(PROBE_RUNS), "--cpus", "2"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{PROBE_RUNS} runs of several batched LAPACK kernels in one program did not return in {PROBE_TIMEOUT} s "
            f"on 2 CPUs: the installed jaxlib ({_runtime.jaxlib_version()}) deadlocks XLA's CPU pool"
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok {PROBE_RUNS}"), done.stdout


@pytest.mark.parametrize(
    ("version", "backend", "risky"),
    [("0.9.2", "cpu", False), ("0.10.0", "cpu", True), ("0.10.2", "cpu", True), ("0.11.0", "cpu", True),
     ("0.11.1", "cpu", False), ("0.10.2", "gpu", False), ("0.10.2.dev20260101", "cpu", True)],
)  # fmt: skip
def test_deadlock_risk_names_version_and_fix(monkeypatch, version, backend, risky):
    monkeypatch.setattr(_runtime, "jaxlib_version", lambda: version)
    message = _runtime.deadlock_risk(backend)
    assert (message is not None) == risky
    if risky:
        assert f"jaxlib {version}" in message and _runtime.PINNED in message and "deadlock" in message


def test_affected_jaxlib_warns_once(monkeypatch):
    monkeypatch.setattr(_runtime, "jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(_runtime, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _runtime.warn_if_affected("cpu") is not None
        _runtime.warn_if_affected("cpu")
    risks = [w for w in caught if issubclass(w.category, _runtime.DeadlockRiskWarning)]
    assert len(risks) == 1 and "0.10.2" in str(risks[0].message)


def test_import_starts_no_backend_and_warns_on_an_affected_jaxlib():
    """Importing qmis_jax decides from versions and configuration alone: no backend is started (a started backend
    makes a later ``jax.distributed.initialize`` fail). With the installed jaxlib's version reported as 0.10.2,
    the import warns once, naming it."""
    code = """
        import importlib.metadata, warnings
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "0.10.2" if name == "jaxlib" else real(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import qmis_jax
        from jax._src import xla_bridge
        print(len(xla_bridge._backends), sum("jaxlib 0.10.2 can deadlock" in str(w.message) for w in caught))
    """
    done = _python(code, timeout=120, env={"JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1"], done.stdout


def test_cli_refuses_an_affected_jaxlib_unless_overridden(capsys, monkeypatch, tmp_path):
    import qmis_jax.studies as studies

    monkeypatch.setattr(_runtime, "jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(_runtime, "cpu_expected", lambda: True)
    monkeypatch.delenv(_runtime.ALLOW_ENV, raising=False)
    code = main(["synthetic", "--quick", "--no-progress", "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("qmis: error: jaxlib 0.10.2 can deadlock") and "--allow-affected-jaxlib" in err
    assert not (tmp_path / "refused").exists()

    ran = []
    monkeypatch.setattr(studies, "run_study", lambda args: ran.append(args.out) or args.out)
    assert main(["synthetic", "--quick", "--allow-affected-jaxlib", "--out", str(tmp_path / "a")]) == 0
    monkeypatch.setenv(_runtime.ALLOW_ENV, "1")
    assert main(["synthetic", "--quick", "--out", str(tmp_path / "b")]) == 0
    assert ran == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_near_the_mapping_limit_says_so_once(capsys, monkeypatch):
    monkeypatch.setattr(_runtime, "mapping_limit", lambda: 100)
    monkeypatch.setitem(_runtime._state, "said_near_limit", False)
    _runtime.sample_mappings()
    _runtime.sample_mappings()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "of the 100 memory mappings" in lines[0] and "vm.max_map_count" in lines[0]


def test_stages_release_between_quantizers_when_crowded(monkeypatch):
    """A stage runs its quantizers in turn and releases the compiled programs after each one that leaves the
    mappings past the threshold, not only at the stage's end (the population stage of the default study's 22
    quantizers at d = 128 passed the kernel's limit before its end)."""
    from qmis_jax.audit._programs import per_quantizer

    seen = []

    def one(j, name, q):
        seen.append(_runtime.counters().releases)
        return name

    monkeypatch.setenv(_runtime.RELEASE_ENV, "1")  # always crowded
    before = _runtime.counters().releases
    assert per_quantizer(one, {"a": 0, "b": 1, "c": 2}) == ["a", "b", "c"]
    assert [r - before for r in seen] == [0, 1, 2] and _runtime.counters().releases - before == 3
    monkeypatch.setenv(_runtime.RELEASE_ENV, str(10**9))  # never crowded
    before = _runtime.counters().releases
    per_quantizer(one, {"a": 0, "b": 1})
    assert _runtime.counters().releases == before


@pytest.mark.slow
def test_many_audits_keep_the_mapping_count_bounded():
    """Five audits of five shapes in one process, as a user's script would run them. With releases at 2,500
    mappings the count never passes it by more than one audit's growth; with releases off it grows past that (so
    the bound is the release's doing: each audit of this size adds about 1,600 mappings, the first about 2,400, to
    about 1,000 after import). The report's diagnostics count the programs and the peak."""
    code = """
        import json, sys, jax
        import qmis_jax as qj
        peaks, growth = [], []
        for i, n in enumerate(range(20, 30, 2)):
            before = qj._runtime.memory_mappings()
            report = qj.audit(jax.random.key(i), qj.problems.gaussian_mean(mu=[0.3, -0.2]),
                              {"grid": qj.quantizers.uniform(step=1.0)}, n=n, replicates=8, attacks=("loss",))
            growth.append(qj._runtime.memory_mappings() - before)
            peaks.append(qj._runtime.memory_mappings())
        print(json.dumps({"peaks": peaks, "growth": growth, "diagnostics": report.to_dict()["diagnostics"]}))
    """
    runs = {}
    for label, threshold in (("released", 2500), ("kept", 10**9)):
        done = _python(code, timeout=600, env={_runtime.RELEASE_ENV: str(threshold)})
        assert done.returncode == 0, done.stderr[-3000:]
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    released, kept = runs["released"], runs["kept"]
    one_audit = max(released["growth"])
    assert max(released["peaks"]) <= 2500 + one_audit
    assert released["diagnostics"]["program_releases"] >= 1 and kept["diagnostics"]["program_releases"] == 0
    assert kept["peaks"][-1] > 2500 + one_audit, kept["peaks"]  # without releases the programs pile up
    diag = released["diagnostics"]
    assert 0 < diag["live_compiled_programs"] < diag["compiled_programs"]
    assert diag["peak_memory_mappings"] >= max(released["peaks"]) and diag["memory_mapping_limit"] > 0


def test_injected_stall_ends_with_stack_dump_and_one_line(tmp_path):
    """A study whose training never returns (injected: the fresh-data trainer sleeps) is ended after
    ``--stall-timeout`` seconds without progress: every thread's stack lands in ``OUT/stall-*.txt``, stderr's last
    line says where it stopped and how to continue, and the exit status is 3. The timeout, 20 s, outlasts the
    compilations before training on a loaded machine (with 3 s, two busy cores ended the run in its first
    compilation, before training)."""
    out = tmp_path / "study"
    code = f"""
        import sys, time
        import qmis_jax.train
        def never_returns(*args, **kwargs):
            time.sleep(3600)
        qmis_jax.train.fit_fresh = never_returns
        from qmis_jax.cli import main
        sys.exit(main(["synthetic", "--quick", "--no-validation", "--no-progress", "--quantizers", "int4",
                       "--stall-timeout", "20", "--out", {str(out)!r}]))
    """
    done = _python(code, timeout=300)
    assert done.returncode == _watchdog.EXIT_STALLED, (done.returncode, done.stderr[-3000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qmis: no progress for 20 s") and "--resume" in last and "stall-" in last, last
    dumps = list(out.glob("stall-*.txt"))
    assert len(dumps) == 1
    text = dumps[0].read_text()
    assert "in never_returns" in text and "train_chunk" in text and "qmis-watchdog" in text


def test_watchdog_off_and_bad_timeout(monkeypatch):
    monkeypatch.setenv(_watchdog.TIMEOUT_ENV, "0")
    assert _watchdog.default_timeout() == 0
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(_watchdog.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=_watchdog.TIMEOUT_ENV):
            _watchdog.default_timeout()


@pytest.mark.slow
def test_d128_round_to_nearest_audit_finishes():
    """The audit that stopped for good in 5 runs of 5 on jaxlib 0.10.2 (2 cores): logistic d = 128, n = 1000, 128
    replicates, the first 12 presets, round-to-nearest PTQ. On the pinned runtime it takes about 80 s."""
    code = """
        import jax, qmis_jax as qj
        report = qj.audit(jax.random.key(0), qj.problems.logistic_mixture(dim=128), qj.quantizers.names()[:12],
                          n=1000, replicates=128, ptq="rtn")
        print(len(report.to_dict()["quantizers"]))
    """
    try:
        done = _python(code, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("the d = 128 round-to-nearest audit did not finish in 900 s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "12"


def test_command_stderr_drops_only_the_harmless_cache_lines(tmp_path):
    """Programs read back from the persistent cache make jaxlib 0.9.2 log up to three harmless lines each (the two
    feature lines only on some hosts, so they are also written by hand here); the command's
    stderr filter drops exactly those, keeps any other line (a real missing processor feature included), passes
    a progress bar's ``\\r`` segments at once, and still forwards what was written before a crash."""
    code = f"""
        import os, sys
        from qmis_jax import _xla_log
        quiet = _xla_log.filter_stderr()
        import jax, jax.numpy as jnp
        jax.config.update("jax_compilation_cache_dir", {str(tmp_path / "xla")!r})
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        for _ in range(3):
            jax.clear_caches()
            jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
        sys.stderr.write("bar 1\\rbar 2\\r")
        for feature in ("gather", "scatter"):  # what some hosts log on each cache load; written here on every host
            print("E1206 12:00:00.000000 1 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target machine "
                  f"feature +prefer-no-{{feature}} is not  supported on the host machine.", file=sys.stderr)
        print("E1206 12:00:00.000000 1 cpu_aot_loader.cc:220] Loading XLA:CPU AOT result. Target machine feature "
              "+avx512f is not  supported on the host machine.", file=sys.stderr)
        print("last words", file=sys.stderr, flush=True)
        os.abort()
    """
    unfiltered = _python(code.replace("quiet = _xla_log.filter_stderr()", "quiet = None"), timeout=120)
    assert "Assume version compatibility" in unfiltered.stderr  # the lines the filter is for do appear
    assert "+prefer-no-gather is not" in unfiltered.stderr
    done = _python(code, timeout=120)
    assert done.returncode != 0
    assert "Assume version compatibility" not in done.stderr and "prefer-no-" not in done.stderr, done.stderr
    assert "bar 1\nbar 2\n" in done.stderr and "+avx512f is not" in done.stderr and "last words" in done.stderr
