"""Where an audit keeps its finished units of work: the :class:`Store` protocol and its two implementations.

An audit computes its work in named units (a chunk of replicates, one attack design) and asks its store for each
(``store.get_or_compute(name, compute)``). :class:`MemoryStore` (the default) just computes; :class:`ResultStore`
saves every finished unit to a directory and reuses it on resume, so a long study survives a crash.

A study's output directory holds ``manifest.json`` (configuration, its hash, the package version and the list of
finished units) and one ``units/<name>.npz`` per finished unit (arrays only, loaded with ``allow_pickle=False``).
Every file is written to a temporary name in the same directory, flushed, fsynced and renamed over its target, so
a process killed at any moment leaves either the old file or the new one, never a torn one. A unit is listed in the
manifest only after its file is in place, so the manifest never names a unit that is not readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from qmis_jax._version import __version__

MANIFEST = "manifest.json"


@runtime_checkable
class Store(Protocol):
    """What an audit needs of a store: named units of arrays (and JSON results), computed once.

    ``get_or_compute(name, compute)`` returns unit ``name``: the saved arrays if it is finished, else the result
    of ``compute()`` (a mapping of array-likes), saved first. ``prefixed(prefix)`` is a view whose unit names start
    with ``prefix`` (several audits in one study).
    """

    def get_or_compute(self, name: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]: ...

    def get_or_compute_json(self, name: str, compute: Callable[[], Any]) -> Any: ...

    def prefixed(self, prefix: str) -> Store: ...


class StoreError(ValueError):
    """A result directory that cannot be used (foreign, corrupt, other configuration, unwritable)."""


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    _atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"), mode="w")


def _safe_name(name: str) -> str:
    if not name or any(c not in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.=" for c in name):
        raise ValueError(f"unit name {name!r} must be non-empty and use only letters, digits and _-.=")
    return name


class ResultStore:
    """Finished units of a study, on disk, keyed by name; see the module docstring.

    Args:
      directory: the study's output directory (created if missing).
      config: JSON-serialisable configuration of the study; its hash guards ``resume``.
      resume: if True, an existing directory of the same configuration is continued (finished units are reused);
        if False, a directory that already holds a manifest is refused.

    Raises:
      StoreError: the directory cannot be created or written, holds a manifest of another configuration (or is
        not a qmis_jax result directory), or holds a manifest while ``resume`` is False.
    """

    def __init__(self, directory: str, config: Mapping[str, Any], *, resume: bool = False):
        self.directory = os.path.abspath(directory)
        self.config = json.loads(json.dumps(dict(config), default=str))
        self.hash = config_hash(self.config)
        self.units_dir = os.path.join(self.directory, "units")
        try:
            os.makedirs(self.units_dir, exist_ok=True)
        except OSError as err:
            raise StoreError(f"--out {directory!r} cannot be created: {err.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise StoreError(f"--out {directory!r} is not writable")
        path = os.path.join(self.directory, MANIFEST)
        if os.path.exists(path):
            manifest = self._read_manifest(path)
            if manifest.get("config_hash") != self.hash:
                raise StoreError(
                    f"--out {directory!r} holds results of another configuration (hash "
                    f"{manifest.get('config_hash')!r}, this one {self.hash!r}); use a new directory"
                )
            if not resume:
                raise StoreError(f"--out {directory!r} already holds results; pass --resume to continue them")
            self.done: dict[str, str] = dict(manifest.get("done", {}))
        else:
            self.done = {}
            self._write_manifest()

    @staticmethod
    def _read_manifest(path: str) -> dict:
        try:
            with open(path) as fh:
                manifest = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise StoreError(f"{path!r} is not a readable qmis_jax manifest ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != "qmis_jax-results":
            raise StoreError(f"{path!r} is not a qmis_jax result manifest")
        return manifest

    def _write_manifest(self) -> None:
        write_json(
            os.path.join(self.directory, MANIFEST),
            {
                "kind": "qmis_jax-results",
                "version": __version__,
                "config_hash": self.hash,
                "config": self.config,
                "done": self.done,
            },
        )

    def has(self, name: str) -> bool:
        """Whether unit ``name`` is finished (listed and its file present)."""
        return name in self.done and os.path.exists(os.path.join(self.units_dir, self.done[name]))

    def save(self, name: str, arrays: Mapping[str, Any]) -> None:
        """Save a unit's arrays atomically, then record it in the manifest."""
        fname = _safe_name(name) + ".npz"
        data = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in data.items():
            if v.dtype == object:
                raise TypeError(f"unit {name!r}: array {k!r} has dtype object, which is not stored (no pickle)")
        _atomic_write(os.path.join(self.units_dir, fname), lambda fh: np.savez(fh, **data))
        self.done[name] = fname
        self._write_manifest()

    def load(self, name: str) -> dict[str, np.ndarray]:
        """Load a finished unit (no pickle). A truncated or corrupt file raises StoreError naming it."""
        path = os.path.join(self.units_dir, self.done[name])
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise StoreError(f"result file {path!r} is corrupt ({err}); delete it to recompute that unit") from None

    def get_or_compute(self, name: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Return unit ``name``: loaded if finished, else computed, saved, and returned as saved."""
        if self.has(name):
            return self.load(name)
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        self.save(name, arrays)
        return arrays

    def get_or_compute_json(self, name: str, compute: Callable[[], Any]) -> Any:
        """Like :meth:`get_or_compute` for a JSON-serialisable result (a finished sweep point's report)."""
        fname = _safe_name(name) + ".json"
        path = os.path.join(self.units_dir, fname)
        if name in self.done and os.path.exists(path):
            try:
                with open(path) as fh:
                    return json.load(fh)
            except (OSError, json.JSONDecodeError) as err:
                raise StoreError(f"result file {path!r} is corrupt ({err}); delete it to recompute") from None
        result = compute()
        write_json(path, result)
        self.done[name] = fname
        self._write_manifest()
        return result

    def prefixed(self, prefix: str) -> PrefixedStore:
        """A view of this store whose unit names start with ``prefix``."""
        return PrefixedStore(self, prefix)


class PrefixedStore:
    """A view of a store that prefixes unit names (one study, several audits)."""

    def __init__(self, store, prefix: str):
        self.store, self.prefix = store, prefix

    def get_or_compute(self, name: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
        return self.store.get_or_compute(self.prefix + name, compute)

    def get_or_compute_json(self, name: str, compute: Callable[[], Any]) -> Any:
        return self.store.get_or_compute_json(self.prefix + name, compute)

    def prefixed(self, prefix: str) -> PrefixedStore:
        return PrefixedStore(self.store, self.prefix + prefix)


class MemoryStore:
    """The store that keeps nothing: every unit is computed when asked for (the API default)."""

    def get_or_compute(self, name: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in compute().items()}

    def get_or_compute_json(self, name: str, compute: Callable[[], Any]) -> Any:
        return compute()

    def prefixed(self, prefix: str) -> MemoryStore:
        return self
