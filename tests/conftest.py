"""Test-session settings: one persistent compilation cache shared by this process and the subprocesses that the
command-line, resume, device and notebook tests start (they compile the same programs again otherwise)."""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="qmis-jax-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
