"""Memory budgets and peak memory: parse sizes, estimate a replicate's working set, read the process peaks.

Private helpers shared by :func:`qmis_jax.audit` and the ``qmis`` command.
"""

from __future__ import annotations

import math
import re
import sys

MIB = 2**20
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """A memory size in bytes from ``"536870912"``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` (binary units).

    A bare number is a count of bytes; the suffixes ``K``, ``M``, ``G``, ``T`` (optionally followed by ``B`` or
    ``iB``, any case) are powers of 1024.

    Raises:
      ValueError: the text is not a size, or the size is not a positive whole number of bytes (at least 1).

    >>> parse_bytes("512M"), parse_bytes("2G"), parse_bytes("1024")
    (536870912, 2147483648, 1024)
    """
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"expected a size such as 512M, 2G or a number of bytes, got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"expected a positive size (at least 1 byte), got {text!r}")
    return int(value)


def replicate_bytes(
    *,
    n: int,
    p: int,
    dx: int,
    itemsize: int = 4,
    solver: str | None = None,
    fresh: bool = True,
    features: bool = False,
    line_search_steps: int = 16,
    qn_memory: int = 8,
) -> int:
    """A rough estimate of one replicate's working memory in bytes, the one model chunks are sized by.

    ``solver=None``: a replicate of an audit (training data, per-example gradients and loss differences of
    ``2 p + 2`` columns, a ``p x p`` curvature matrix, and the loss-PTQ events: the recorded descent, its replay,
    the start descents and the sandwich of their margins). A solver name: the training alone, as
    :mod:`qmis_jax.train` runs it: ``fresh`` data held per replicate (``2 n (dx + 1)``, else a shared pool),
    ``features`` the shared Khatri-Rao features of ``glm_newton`` (else ``2 n p`` per replicate), the line search's
    ``line_search_steps`` trial losses and L-BFGS's ``qn_memory`` curvature pairs.

    Args:
      n: training-set size. p: number of parameters (GLMs: design columns). dx: input width.
      itemsize: bytes per float. solver, fresh, features, line_search_steps, qn_memory: as above.

    >>> replicate_bytes(n=1000, p=129, dx=128)
    5733056
    >>> replicate_bytes(n=1000, p=129, dx=128, solver="glm_lbfgs")
    1668512
    """
    if solver is None:
        # + the loss-PTQ events: the recorded descent (16 sweeps x p steps), its replay, the 4 start descents'
        # per-example states and the sandwich behind their margins
        events = 32 * n + 300 * p + 3 * p * p
        return itemsize * ((2 * p + 2) * n * 3 + n * (dx + 1) * 4 + p * p + events)
    ls = line_search_steps
    data = 2 * n * (dx + 1) if fresh else 0
    if solver == "glm_newton":
        per = (ls + 12) * n + 4 * p * p + data + (0 if features else 2 * n * p) + (n * p if fresh else 0)
    elif solver == "glm_lbfgs":
        per = (ls + 10) * n + 4 * qn_memory * p + data + (n * p if fresh else 0)
    elif solver == "newton":
        per = 4 * p * p + 3 * n * p + (ls + 8) * n + data
    elif solver == "optax":
        per = 12 * p + 8 * n * max(dx, 16) + data
    else:
        per = 4 * p * p + 2 * n * (dx + 1) + data
    return int(per * itemsize)


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far, in bytes (None where the platform does not report it).

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
    """
    try:
        import resource
    except ImportError:  # not available on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def device_peak_bytes(devices=None) -> int | None:
    """Largest ``peak_bytes_in_use`` over ``devices`` (default: the local devices), None where none reports it
    (CPU devices do not)."""
    import jax

    peaks = []
    for device in jax.local_devices() if devices is None else devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some backends do not implement memory statistics
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def mib(value: int | None) -> float | None:
    """Bytes as MiB rounded to 0.001 (None stays None)."""
    return None if value is None else round(value / MIB, 3)


def check_budget(memory_budget: int | None, per_replicate: int, detail: str = "") -> None:
    """The one refusal of a budget that cannot hold a single replicate (``detail`` says what the estimate is of).

    >>> check_budget(1000, 2**20, " at n=50")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: memory_budget=1000 bytes (0.000954 MiB) cannot hold one replicate, which needs about 1 MiB at n=50; ...
    """
    if memory_budget is not None and per_replicate > memory_budget:
        raise ValueError(
            f"memory_budget={memory_budget} bytes ({memory_budget / MIB:.3g} MiB) cannot hold one replicate, "
            f"which needs about {per_replicate / MIB:.3g} MiB{detail}; raise memory_budget or lower n"
        )
