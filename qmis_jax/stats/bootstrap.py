"""Paired bootstrap comparisons of quantizers evaluated on the same replicates (theory.md section 6).

Every quantizer of a study is applied to the same trained replicates, so per-replicate security values of two
quantizers are paired; their difference has far less noise than either value, and the comparison must resample
replicates jointly (one resampled replicate index carries both values). Resampling is vectorised: bootstrap draws
are drawn as index matrices, a block of draws at a time under ``lax.map``, never in a Python loop.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PairedDiff", "paired_bootstrap", "rank_quantizers"]

_STATS = ("mean", "median")


class PairedDiff(NamedTuple):
    """A paired difference ``stat(a - b)`` with its percentile bootstrap interval.

    Attributes:
      estimate: ``stat(a - b)`` on the original replicates.
      lo: lower end of the interval.
      hi: upper end of the interval.
    """

    estimate: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly ``{"estimate", "lo", "hi"}``."""
        return {"estimate": float(self.estimate), "lo": float(self.lo), "hi": float(self.hi)}


def _stat_fn(stat: str):
    return jnp.mean if stat == "mean" else jnp.median


@functools.partial(jax.jit, static_argnames=("n_boot", "stat", "block"))
def _boot_stats(key, diffs, n_boot: int, stat: str, block: int):
    """Bootstrap draws of ``stat`` for each row of ``diffs`` (P, R); all rows share the resampled indices.

    Draws are made ``block`` at a time (one ``(block, R)`` index matrix per block key), rows are mapped over, so
    memory stays ``O(block * R)`` whatever the number of rows. The indices depend only on ``key``, ``n_boot`` and
    ``R``, not on the number of rows.
    """
    f = _stat_fn(stat)
    p, r = diffs.shape
    n_blocks = -(-n_boot // block)

    def one_block(k):
        # uniform indices from 32-bit words; the modulo bias is below r / 2**32 (negligible), and this compiles
        # faster on CPU than jax.random.randint
        bits = jax.random.bits(k, (block, r), dtype=jnp.uint32)
        idx = (bits % jnp.uint32(r)).astype(jnp.int32)
        return jax.lax.map(lambda row: f(row[idx], axis=1), diffs)  # (P, block)

    out = jax.lax.map(one_block, jax.random.split(key, n_blocks))  # (n_blocks, P, block)
    return jnp.transpose(out, (1, 0, 2)).reshape(p, n_blocks * block)[:, :n_boot]


def _check_common(n_boot, level, stat):
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 10:
        raise ValueError(f"n_boot must be an integer >= 10, got n_boot={n_boot!r}")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got level={level!r}")
    if stat not in _STATS:
        raise ValueError(f"stat must be one of {_STATS}, got stat={stat!r}")
    return int(n_boot), level


def _as_values(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be a 1-D array of >= 2 per-replicate values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _block_size(r: int, n_boot: int) -> int:
    # about 2**22 resampled values per block keeps memory flat for many replicates
    return max(1, min(n_boot, (1 << 22) // r))


def _intervals(key, diffs: np.ndarray, n_boot: int, level: float, stat: str) -> list[PairedDiff]:
    p, r = diffs.shape
    boots = np.asarray(_boot_stats(key, jnp.asarray(diffs), n_boot, stat, _block_size(r, n_boot)))
    est = np.mean(diffs, axis=1) if stat == "mean" else np.median(diffs, axis=1)
    alpha = 1.0 - level
    lo = np.quantile(boots, alpha / 2, axis=1)
    hi = np.quantile(boots, 1 - alpha / 2, axis=1)
    return [PairedDiff(float(e), float(a), float(b)) for e, a, b in zip(est, lo, hi)]


def paired_bootstrap(
    key: jax.Array, a, b, *, n_boot: int = 2000, level: float = 0.95, stat: str = "mean"
) -> PairedDiff:
    """Paired percentile bootstrap interval for ``stat(a - b)`` over replicates (theory.md section 6).

    With ``d_r = a_r - b_r`` for replicates ``r = 1..R``, each bootstrap draw resamples ``R`` replicate indices with
    replacement and recomputes ``stat(d)``; the interval is the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles
    of the ``n_boot`` draws (percentile bootstrap; its coverage tends to ``level`` as ``R`` grows, for the mean
    under a finite variance).

    Args:
      key: JAX PRNG key.
      a: ``(R,)`` per-replicate values of the first quantizer.
      b: ``(R,)`` per-replicate values of the second quantizer, same replicates in the same order.
      n_boot: number of bootstrap draws (>= 10).
      level: confidence level in (0, 1).
      stat: ``"mean"`` or ``"median"`` of the paired differences.

    Returns:
      :class:`PairedDiff` ``(estimate, lo, hi)``.

    >>> d = paired_bootstrap(jax.random.key(0), jnp.arange(10.0) + 1.0, jnp.arange(10.0))
    >>> d.estimate, d.lo, d.hi
    (1.0, 1.0, 1.0)
    """
    n_boot, level = _check_common(n_boot, level, stat)
    a = _as_values(a, "a")
    b = _as_values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (paired replicates), got {a.shape} and {b.shape}")
    return _intervals(key, (a - b)[None, :], n_boot, level, stat)[0]


def rank_quantizers(
    key: jax.Array,
    values: Mapping[str, Any],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    stat: str = "mean",
) -> tuple[list[str], dict[str, dict[str, PairedDiff]]]:
    """Rank quantizers by a per-replicate security value, with paired bootstrap intervals behind the order.

    Quantizers are sorted by ``stat`` of their values, most secure (largest) first, ties broken by name. For every
    pair the paired difference ``stat(v_a - v_b)`` gets a percentile bootstrap interval as in
    :func:`paired_bootstrap` (theory.md section 6); all pairs share the same resampled replicate indices, so the
    table is one joint bootstrap. An interval excluding 0 says the order of that pair is resolved at ``level``
    (pointwise, not simultaneously over pairs).

    Works for any per-replicate value where higher means more secure, for example the single-model indicator
    ``r_hat`` or ``n * r_hat``; ``1 - flipped`` with ``flipped`` the per-replicate indicator that the release
    differs from the population release (then ``stat="mean"`` compares flip rates); or ``1 - advantage`` for
    per-replicate attack advantages. Lower-is-better quantities must be negated or complemented first.

    Args:
      key: JAX PRNG key.
      values: mapping quantizer name -> ``(R,)`` per-replicate values, all on the same ``R`` replicates in the same
        order (at least two quantizers).
      n_boot: number of bootstrap draws (>= 10).
      level: confidence level in (0, 1).
      stat: ``"mean"`` or ``"median"``: used both for the order and for the paired differences.

    Returns:
      ``(ranking, table)``: ``ranking`` the names, most secure first; ``table[a][b]`` the :class:`PairedDiff` of
      ``stat(v_a - v_b)`` for every ordered pair ``a != b`` (``table[b][a]`` is its mirror image).

    >>> ranking, table = rank_quantizers(jax.random.key(0), {"x": [1.0, 2.0, 4.0], "y": [0.0, 1.5, 3.0]})
    >>> ranking, round(table["x"]["y"].estimate, 4)
    (['x', 'y'], 0.8333)
    """
    n_boot, level = _check_common(n_boot, level, stat)
    if not isinstance(values, Mapping) or len(values) < 2:
        raise ValueError(f"values must be a mapping of at least two quantizer names to arrays, got {values!r:.200}")
    arrays = {str(name): _as_values(v, f"values[{name!r}]") for name, v in values.items()}
    shapes = {name: v.shape for name, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"values must all have the same shape (paired replicates), got {shapes}")
    summary = {name: float(np.mean(v) if stat == "mean" else np.median(v)) for name, v in arrays.items()}
    ranking = sorted(arrays, key=lambda name: (-summary[name], name))

    pairs = [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]
    diffs = np.stack([arrays[x] - arrays[y] for x, y in pairs])
    results = _intervals(key, diffs, n_boot, level, stat)
    table: dict[str, dict[str, PairedDiff]] = {name: {} for name in ranking}
    for (x, y), res in zip(pairs, results):
        table[x][y] = res
        table[y][x] = PairedDiff(-res.estimate, -res.hi, -res.lo)
    return ranking, table
