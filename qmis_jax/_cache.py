"""A persistent cache of compiled XLA programs, so that a second run of a study skips most of its compilation.

An audit compiles a few programs per quantizer (tracing and XLA compilation dominate small studies); JAX can keep
the compiled executables on disk, keyed by the program, the compile options and the JAX version, so a changed
program never reuses a stale entry. The ``qmis`` command turns the cache on; library users call
:func:`enable_compilation_cache` themselves (or set JAX's own ``JAX_COMPILATION_CACHE_DIR``).
"""

from __future__ import annotations

import os

import jax

ENV = "QMIS_JAX_CACHE"
OFF = ("0", "off", "no", "false", "none")


def default_directory() -> str:
    """``$XDG_CACHE_HOME/qmis_jax/xla`` (``~/.cache/qmis_jax/xla`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qmis_jax", "xla")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Keep compiled programs in ``directory`` across runs; returns the directory in use, or None when off.

    Resolution: an explicit ``directory``; else a directory JAX already uses (``JAX_COMPILATION_CACHE_DIR``);
    else ``$QMIS_JAX_CACHE``; else :func:`default_directory`. ``QMIS_JAX_CACHE=off`` turns the cache off. A
    directory that cannot be created leaves the cache off (the run is only slower).
    """
    setting = os.environ.get(ENV, "")
    if directory is None and setting.lower() in OFF and setting:
        return None
    current = jax.config.jax_compilation_cache_dir
    if directory is None and current:
        return current
    directory = directory or setting or default_directory()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return directory
