"""The runtime qmis_jax runs on: the jaxlib releases that deadlock on CPU, and the memory compiled programs hold.

**Affected jaxlib.** jaxlib 0.10.0 up to (not including) 0.11.1 runs batched LAPACK kernels (``solve``, ``eigh``,
``cholesky`` under ``vmap``) by scheduling their batch chunks onto XLA's CPU intra-op pool and blocking on them: when
as many such kernels run at once as the pool has threads, nothing is left to run the chunks and the process waits
forever. ``pyproject.toml`` pins 0.9.2, which lacks that path. For people who install qmis_jax into an environment of
their own, :func:`warn_if_affected` (called at import, without starting a backend: a started backend makes a later
``jax.distributed.initialize`` fail) and :func:`check_backend` (at the first audit, on the real backend) warn once.

**Compiled programs.** Every program XLA compiles for the CPU keeps a few anonymous memory mappings for as long as
it lives, compiled programs are never released by JAX on their own, and Linux allows ``vm.max_map_count`` (65,530 by
default) mappings per process: a long study that compiles thousands of programs dies with "Cannot allocate memory"
while most of its RAM is free. This module counts the programs loaded (a :mod:`jax.monitoring` listener on the
backend-compile event, which also fires for persistent-cache hits), samples the process's mapping count, releases
every compiled program with :func:`release_compiled_programs` (studies do it between their points) and, through
:func:`release_if_crowded`, whenever the mappings pass half of the limit (audits check after each quantizer of each
stage and each chunk); near the limit it says so in one line.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import re
import sys
import threading
import warnings
from typing import NamedTuple

import jax

AFFECTED = ((0, 10, 0), (0, 11, 1))  # [first affected, first fixed) jaxlib releases
ALLOW_ENV = "QMIS_JAX_ALLOW_AFFECTED_JAXLIB"
RELEASE_ENV = "QMIS_JAX_RELEASE_MAPPINGS"
PINNED = "jax==0.9.2 jaxlib==0.9.2"
NEAR_LIMIT = 0.9  # fraction of vm.max_map_count at which a run says it is near the limit
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu")


class DeadlockRiskWarning(RuntimeWarning):
    """The installed jaxlib can deadlock qmis_jax's batched linear algebra on the CPU backend."""


def _parse(version: str) -> tuple[int, int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)\.(\d+)", version)
    return None if match is None else tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def jaxlib_version() -> str:
    """The installed jaxlib's version, read from its package metadata (no backend is started)."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:  # a source build without metadata
        import jaxlib.version

        return jaxlib.version.__version__


def is_affected(version: str) -> bool:
    """Whether jaxlib ``version`` has the blocking batched-LAPACK path (0.10.0 <= version < 0.11.1).

    >>> is_affected("0.9.2"), is_affected("0.10.2"), is_affected("0.11.0"), is_affected("0.11.1")
    (False, True, True, False)
    """
    parsed = _parse(version)
    return parsed is not None and AFFECTED[0] <= parsed < AFFECTED[1]


def cpu_expected() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting a backend: from the configured
    platforms (``JAX_PLATFORMS`` / ``jax_platforms``, whose first entry wins) or, when none is configured, from the
    absence of an installed accelerator plugin."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    names = [p.strip() for p in platforms.split(",") if p.strip()]
    if names:
        return names[0] == "cpu"
    for plugin in _ACCELERATOR_PLUGINS:
        try:
            importlib.metadata.version(plugin)
            return False
        except importlib.metadata.PackageNotFoundError:
            continue
    return True


def deadlock_risk(backend: str | None = None) -> str | None:
    """One sentence naming the risk when the installed jaxlib is affected and the backend is (or, with ``backend``
    None, will be) the CPU; None otherwise."""
    version = jaxlib_version()
    on_cpu = cpu_expected() if backend is None else backend == "cpu"
    if not (on_cpu and is_affected(version)):
        return None
    return (
        f"jaxlib {version} can deadlock on CPU: its batched LAPACK kernels (solve, eigh, cholesky under vmap) block "
        f"on XLA's own thread pool, and a run may stop for good; install the verified runtime: "
        f"pip install {PINNED}"
    )


def override_allowed() -> bool:
    """Whether the user asked to run on an affected jaxlib anyway (``QMIS_JAX_ALLOW_AFFECTED_JAXLIB=1``)."""
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_warned = False


def warn_if_affected(backend: str | None = None) -> str | None:
    """Warn once per process (:class:`DeadlockRiskWarning`) when :func:`deadlock_risk` finds a risk; returns the
    message (None when there is none)."""
    global _warned
    message = deadlock_risk(backend)
    if message is not None and not _warned:
        _warned = True
        warnings.warn(message, DeadlockRiskWarning, stacklevel=3)
    return message


_backend_checked = False


def check_backend() -> None:
    """At the first audit of the process: warn, on the started backend, if the import-time check could not tell."""
    global _backend_checked
    if not _backend_checked:
        _backend_checked = True
        warn_if_affected(jax.default_backend())


# --- compiled programs and memory mappings ---------------------------------------------------------------------


class ProgramCounters(NamedTuple):
    """Compiled programs and memory mappings of this process (mapping fields are None off Linux)."""

    compiled: int  # programs loaded since import (compiled or read from the persistent cache)
    live: int  # programs loaded since the last release
    releases: int  # times every compiled program was released
    mappings: int | None  # memory mappings now
    peak_mappings: int | None  # largest mapping count sampled so far
    mapping_limit: int | None  # vm.max_map_count


_lock = threading.Lock()
_state = {"compiled": 0, "live": 0, "releases": 0, "peak": 0, "said_near_limit": False}


def _on_event(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT:
        with _lock:
            _state["compiled"] += 1
            _state["live"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def memory_mappings() -> int | None:
    """The number of memory mappings of this process (lines of ``/proc/self/maps``; None where there is none)."""
    try:
        with open("/proc/self/maps", "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    except OSError:
        return None


def mapping_limit() -> int | None:
    """The kernel's per-process mapping limit, ``vm.max_map_count`` (None where it cannot be read)."""
    try:
        with open("/proc/sys/vm/max_map_count") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def sample_mappings() -> int | None:
    """Count the mappings now, keep the peak, and say once (one line on stderr) when the count nears the limit."""
    count, limit = memory_mappings(), mapping_limit()
    if count is None:
        return None
    with _lock:
        _state["peak"] = max(_state["peak"], count)
        say = limit is not None and count >= NEAR_LIMIT * limit and not _state["said_near_limit"]
        if say:
            _state["said_near_limit"] = True
    if say:
        print(
            f"qmis_jax: {count} of the {limit} memory mappings a process may hold are in use (compiled programs "
            "hold them); the run may fail soon: raise the limit (sysctl -w vm.max_map_count=262144) or run fewer "
            "sizes per process; a study continues from its finished work with --resume",
            file=sys.stderr,
            flush=True,
        )
    return count


def counters() -> ProgramCounters:
    """The current :class:`ProgramCounters` (samples the mapping count first)."""
    count = sample_mappings()
    with _lock:
        return ProgramCounters(
            compiled=_state["compiled"],
            live=_state["live"],
            releases=_state["releases"],
            mappings=count,
            peak_mappings=_state["peak"] if count is not None else None,
            mapping_limit=mapping_limit(),
        )


def release_compiled_programs() -> None:
    """Release every compiled program and JAX's tracing caches (``jax.clear_caches``): the memory mappings their
    code holds go back to the system. Programs used again are compiled again (or read from the persistent cache)."""
    sample_mappings()  # the peak is just before a release
    jax.clear_caches()
    gc.collect()
    with _lock:
        _state["live"] = 0
        _state["releases"] += 1


def release_threshold() -> int | None:
    """Mapping count above which :func:`release_if_crowded` releases: ``QMIS_JAX_RELEASE_MAPPINGS`` if set, else
    half of ``vm.max_map_count`` (None where mappings cannot be counted)."""
    setting = os.environ.get(RELEASE_ENV, "").strip()
    if setting:
        try:
            value = int(setting)
        except ValueError:
            raise ValueError(f"{RELEASE_ENV} must be a positive integer (a mapping count), got {setting!r}") from None
        if value <= 0:
            raise ValueError(f"{RELEASE_ENV} must be a positive integer (a mapping count), got {value}")
        return value
    limit = mapping_limit()
    return None if limit is None else limit // 2


def release_if_crowded() -> bool:
    """Release every compiled program when the mapping count has passed :func:`release_threshold`; returns whether
    it released. Cheap enough to call between any two stages (one read of ``/proc/self/maps``)."""
    threshold = release_threshold()
    count = sample_mappings()
    if threshold is None or count is None or count < threshold:
        return False
    release_compiled_programs()
    return True


def diagnostics(programs_before: int = 0) -> dict[str, int | None]:
    """Compiled programs and memory mappings, for a report's ``diagnostics`` (mapping counts are None off Linux).

    ``compiled_programs`` counts the programs loaded (compiled, or read from the persistent cache) since the
    counter stood at ``programs_before``; ``live_compiled_programs`` those loaded since the process last released
    them; ``peak_memory_mappings`` is the process's largest sampled mapping count, against ``memory_mapping_limit``.
    """
    now = counters()
    return {
        "compiled_programs": now.compiled - programs_before,
        "live_compiled_programs": now.live,
        "program_releases": now.releases,
        "peak_memory_mappings": now.peak_mappings,
        "memory_mapping_limit": now.mapping_limit,
    }
