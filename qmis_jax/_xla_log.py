"""The ``qmis`` command's stderr without jaxlib's known-harmless compilation-cache lines.

jaxlib 0.9.2 logs three lines each time it loads a compiled CPU program from the persistent compilation cache:
``Assume version compatibility. PjRt-IFRT does not track XLA executable versions.`` (a warning), and two errors,
``Loading XLA:CPU AOT result. Target machine feature +prefer-no-gather is not supported on the host machine ...
This could lead to execution errors such as SIGILL`` (and the same for ``+prefer-no-scatter``). The two
"features" are code-generation preferences that the compiler records, not instructions a processor may lack, so
the warning is wrong for them. A study loads thousands of programs from the cache (it releases compiled programs
between its points, see :mod:`qmis_jax._runtime`), and those lines would bury its progress and its real messages.

:func:`filter_stderr` routes the process's file descriptor 2 through a small child process that drops exactly
those lines (a missing feature other than the two preferences is kept) and passes everything else on unchanged,
progress bars included. A child, not a thread: if the process crashes, the child still forwards what it wrote
last. ``QMIS_JAX_XLA_LOG=all`` keeps every line.
"""

from __future__ import annotations

import os
import subprocess
import sys

KEEP_ENV = "QMIS_JAX_XLA_LOG"

# The child: copies stdin to stdout, segment by segment (a segment ends at "\n" or "\r", so progress bars pass at
# once), dropping the harmless lines. It imports nothing heavy.
_FILTER = r"""
import os, re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the study, which still has things to say
harmless = re.compile(
    rb"^[IWEF]\d{4} [\d:.]+\s+\d+ (?:pjrt_executable\.cc:\d+\] Assume version compatibility\. PjRt-IFRT does not "
    rb"track XLA executable versions\.|cpu_aot_loader\.cc:\d+\] Loading XLA:CPU AOT result\. Target machine "
    rb"feature \+prefer-no-(?:gather|scatter) is not +supported on the host machine\.)"
)
glog_start = re.compile(rb"^[IWEF]\d{0,4}( [\d:.]*)?$|^[IWEF]\d{4} ")
out, pending = sys.stdout.buffer, b""
while True:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    pending += chunk
    parts = re.split(rb"(?<=[\r\n])", pending)
    pending = parts.pop()
    if pending and not glog_start.match(pending):  # a partial progress bar: show it now
        parts.append(pending)
        pending = b""
    text = b"".join(p for p in parts if not harmless.match(p))
    if text:
        out.write(text)
        out.flush()
if pending and not harmless.match(pending):
    out.write(pending)
    out.flush()
"""


class StderrFilter:
    """The running filter: :meth:`close` puts the original stderr back and waits for the child to finish."""

    def __init__(self, child: subprocess.Popen, saved_fd: int) -> None:
        self.child, self.saved_fd = child, saved_fd

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)  # the pipe's last write end closes: the child reads to its end and exits
        os.close(self.saved_fd)
        try:
            self.child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.child.kill()


def filter_stderr() -> StderrFilter | None:
    """Route file descriptor 2 through the filter child (see the module docstring); None when ``QMIS_JAX_XLA_LOG``
    is ``all`` or the child cannot start (stderr then stays as it was)."""
    if os.environ.get(KEEP_ENV, "").strip().lower() == "all":
        return None
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-c", _FILTER], stdin=read_end, stdout=saved, close_fds=True)
    except OSError:
        for fd in (read_end, write_end, saved):
            os.close(fd)
        return None
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    return StderrFilter(child, saved)
