"""A study never waits forever without a word: a watchdog thread that ends a run which makes no progress.

A run beats the watchdog whenever it makes progress (:func:`beat`: every chunk of every audit stage, every point
of a study). When no beat comes for ``timeout`` seconds, the watchdog writes every thread's Python stack to
``OUT/stall-<time>.txt``, prints one line saying where the run stopped and how to continue (``--resume``), and
ends the process with :data:`EXIT_STALLED`: a thread stuck inside a compiled program cannot be interrupted, so the
process is ended from the watchdog's own thread. It also samples the memory-mapping count (see
:mod:`qmis_jax._runtime`) once a second, so a report's peak is the process's peak.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
import traceback

from qmis_jax import _runtime

EXIT_STALLED = 3
TIMEOUT_ENV = "QMIS_JAX_STALL_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds without progress; the default study's longest step takes a few minutes

_active: Watchdog | None = None


def beat(where: str) -> None:
    """Record progress at ``where`` (a short description) with the active watchdog, if any."""
    dog = _active
    if dog is not None:
        dog.beat(where)


def parse_timeout(text: str, *, name: str) -> float:
    """``text`` as a finite number of seconds >= 0 (0: off); a ``ValueError`` naming ``name`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a number of seconds >= 0 (0 turns it off), got {text!r}")
    return value


def default_timeout() -> float:
    """``QMIS_JAX_STALL_TIMEOUT`` (seconds; 0 turns the watchdog off) or :data:`DEFAULT_TIMEOUT`."""
    setting = os.environ.get(TIMEOUT_ENV, "").strip()
    return parse_timeout(setting, name=TIMEOUT_ENV) if setting else DEFAULT_TIMEOUT


class Watchdog:
    """Context manager: while active, a run that goes ``timeout`` seconds without :func:`beat` is ended.

    Args:
      out: directory for the stack dump (created when needed).
      timeout: seconds without progress before the run is ended; 0 or None turns the watchdog off (the mapping
        count is still sampled).
      interval: seconds between checks.
      command: how to continue, named in the message (e.g. the study's command line with ``--resume``).
    """

    def __init__(self, out: str, *, timeout: float | None, interval: float = 1.0, command: str = "") -> None:
        self.out, self.timeout, self.interval, self.command = out, timeout or 0.0, interval, command
        self.where = "start"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qmis-watchdog", daemon=True)

    def beat(self, where: str) -> None:
        self.where, self._last = where, time.monotonic()

    def __enter__(self) -> Watchdog:
        global _active
        _active = self
        self._last = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self._stop.set()
        self._thread.join(timeout=5 * self.interval)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            _runtime.sample_mappings()
            if self.timeout and time.monotonic() - self._last > self.timeout:
                self._stalled()

    def dump_stacks(self) -> str:
        """Write every thread's Python stack to ``OUT/stall-<time>.txt``; returns the path."""
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, time.strftime("stall-%Y%m%d-%H%M%S.txt"))
        names = {t.ident: t.name for t in threading.enumerate()}
        with open(path, "w") as fh:
            fh.write(f"no progress for {self.timeout:g} s; last progress: {self.where}\n")
            fh.write(f"memory mappings: {_runtime.counters()}\n\n")
            for ident, frame in sys._current_frames().items():
                fh.write(f"--- thread {names.get(ident, '?')} ({ident}) ---\n")
                fh.writelines(traceback.format_stack(frame))
                fh.write("\n")
            fh.write("--- faulthandler ---\n")
            fh.flush()
            faulthandler.dump_traceback(fh, all_threads=True)
        return path

    def _stalled(self) -> None:
        try:
            path = self.dump_stacks()
        except OSError as err:
            path = f"(not written: {err})"
        how = f"; continue with: {self.command}" if self.command else "; continue it with --resume"
        sys.stdout.flush()
        print(
            f"qmis: no progress for {self.timeout:g} s (last: {self.where}); every thread's stack is in {path}; "
            f"finished work is saved{how}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_STALLED)
