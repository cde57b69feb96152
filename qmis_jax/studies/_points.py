"""One point of a study, the way every study runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmis_jax import _runtime, _watchdog
from qmis_jax.store import Store


def study_point(store: Store, name: str, compute: Callable[[], Any]) -> Any:
    """The point ``name``: read from ``store`` when finished before, else computed and stored. Then every compiled
    program is released (a study's next point has other shapes: keeping them only holds memory mappings until the
    process runs out, see :mod:`qmis_jax._runtime`) and the stall watchdog hears of the progress."""
    result = store.get_or_compute_json(name, compute)
    _runtime.release_compiled_programs()
    _watchdog.beat(name)
    return result


def study_diagnostics(point: dict[str, Any]) -> dict[str, Any]:
    """A study's ``diagnostics``: those of its main ``point``, with the process's own compiled-program and
    memory-mapping figures over the whole run in place of the point's (a resumed run counts from its restart)."""
    return {**point, **_runtime.diagnostics()}
