"""Test-session settings.

- One persistent compilation cache shared by this process and the subprocesses that the command-line, resume,
  device and notebook tests start (they compile the same programs again otherwise).
- Implicit rank promotion raises: a broadcast between arrays of different ranks is written out, in the package and
  in the tests' own reference computations.
- One ``x64`` fixture: 64-bit floats for the test that asks for it (``pytestmark =
  pytest.mark.usefixtures("x64")`` for a whole module).
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="qmis-jax-test-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")  # this process only; the CLI subprocesses keep the default


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield
