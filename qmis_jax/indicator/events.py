"""The events of a quantized release: every decision whose sign can change what is published (theory.md 3, 8, 9).

``r = min_k c_k^2 / 2`` is a minimum over events, so a missing event makes ``r`` too large (the indicator
overclaims security); an extra event can only lower it. The events of a release, by kind:

- ``"release"``: the single-coordinate moves of the release ``theta_0`` (its competitors, section 3(a)), the
  comparisons of the descent's last sweep;
- ``"path"``: every other comparison the loss-PTQ descent made on its way to ``theta_0`` (section 3(a)): each trial
  ``L(move) - L(current)``, accepted or rejected, and the lower-vs-upper comparison where both moves improve. Each is
  a comparison of two fixed codebook points ``a, b`` with per-example loss difference ``D(z) = l(a, z) - l(b, z)``,
  signed so that the decision taken holds while the sample mean stays positive. Identical comparisons (the same
  current point and move, in two sweeps) count once;
- ``"start"``: a round-to-nearest threshold crossing (section 3(b)) whose new start cell, descended with the same
  code, ends elsewhere than ``theta_0``; margin ``m`` and spread ``s`` by the delta method;
- ``"start_unresolved"``: a threshold crossing whose descent was not run (beyond the number of starts descended):
  counted as an event, which can only lower ``r``;
- ``"threshold"``: the round-to-nearest thresholds of an RTN release (section 3(b));
- ``"scale"``: the scale code's events of a discrete scale format (section 9);
- ``"start_return"``: a threshold crossing whose new start, descended, comes back to ``theta_0`` along a path with
  comparisons no other event holds: the release changes only if the crossing happens and one of those comparisons
  turns too. Each such pair is an intersection of two Gaussian events, entered as the half-space tangent to it at
  its most likely point (rate ``min y^T R^-1 y / 2`` over ``y_1 >= c_start, y_2 >= c_cmp``; the population
  indicator's, :mod:`._population`).

Each event also has a per-example influence row (loss differences for comparisons, the linearised contributions
``m - grad g^T H^-1 grad l(theta, z)`` for margins), so the joint flip probability of section 5 sees their
correlations.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .margins import competitors, gap_stats, loss_differences, rtn_margins, scale_differences
from .ptq import (
    StepRecord,
    _check_sweeps,
    _descent,
    _descent_path,
    _greedy_sweeps,
    adjacent_levels,
    is_sparse_ternary,
    pair_difference,
)
from .sandwich import _sandwich_params, normalized_weights

Array = jax.Array
PyTree = Any

__all__ = [
    "EVENT_KINDS",
    "count_events",
    "path_comparisons",
    "replay_path",
    "replay_paths",
    "descend_from",
    "descent_paths_from",
]

EVENT_KINDS = ("release", "path", "start", "start_unresolved", "threshold", "scale", "start_return")
KIND = {name: i for i, name in enumerate(EVENT_KINDS)}


def count_events(kind, valid) -> dict[str, int]:
    """``{kind name: number of valid events}`` for the kinds present (host-side, for reports)."""
    kind, valid = np.asarray(kind), np.asarray(valid, bool)
    return {name: int(np.sum(valid & (kind == i))) for i, name in enumerate(EVENT_KINDS) if np.any(valid & (kind == i))}


def _decisions(records: StepRecord) -> tuple[Array, Array, Array, Array]:
    """Per slot ``(d_a, d_b, b_wins, accept)`` of the descent's rule (invalid moves at ``+inf``)."""
    a, b = records.a, records.b
    inf = jnp.asarray(jnp.inf, a.d.dtype)
    d_a = jnp.where(a.valid & jnp.isfinite(a.d), a.d, inf)
    d_b = jnp.where(b.valid & jnp.isfinite(b.d), b.d, inf)
    return d_a, d_b, d_b < d_a, jnp.minimum(d_a, d_b) < 0


def path_comparisons(records: StepRecord, sweeps: Array) -> tuple[Array, Array]:
    """The comparisons of a recorded descent that are ``"path"`` events (theory.md section 3(a)).

    Slot ``(s, j)`` (sweep ``s``, coordinate ``j``) has up to three comparisons: trial ``a`` (``l(a) - l(cur)``),
    trial ``b`` and, where both improve, ``a`` against ``b`` (``l(a) - l(b)``). The last sweep's trials are the
    release's own competitors (kind ``"release"``) and are left out here; a slot whose current point and moves
    recur in a later sweep (no move accepted in between) is that later comparison and is left out too.

    Args:
      records: :class:`~qmis_jax.indicator.ptq.StepRecord` of ``(S, p)`` arrays. sweeps: the sweeps run.

    Returns:
      ``(valid, sign)``, each ``(S, p, 3)``: the event exists; ``sign`` (+-1) turns ``(D_a, D_b, D_a - D_b)``
      into the event's row, whose mean is positive while the decision taken holds.
    """
    d_a, d_b, b_wins, accept = _decisions(records)
    s_count, p = d_a.shape
    accepted = accept.reshape(-1).astype(jnp.int32)
    before = (jnp.cumsum(accepted) - accepted).reshape(s_count, p)  # moves accepted before each slot
    ran = records.a.valid | records.b.valid
    later_same = jnp.concatenate([ran[1:] & (before[1:] == before[:-1]), jnp.zeros((1, p), bool)])
    earlier = jnp.arange(s_count)[:, None] < sweeps - 1
    keep = earlier & ~later_same
    valid = jnp.stack(
        [
            keep & records.a.valid,
            keep & records.b.valid,
            keep & records.a.valid & records.b.valid & (d_a < 0) & (d_b < 0),
        ],
        axis=-1,
    )
    one = jnp.ones_like(d_a)
    sign = jnp.stack(
        [jnp.where(d_a < 0, -one, one), jnp.where(d_b < 0, -one, one), jnp.where(b_wins, one, -one)], axis=-1
    )
    return valid, sign


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("skip", "design", "margin_loss", "rows"))
def replay_path(
    q, loss_fn, params, start, records: StepRecord, sweeps, x, y, w, penalty, g=None, *, skip, design, margin_loss,
    rows,
):  # fmt: skip
    """Replay a recorded descent's first ``sweeps - 1`` sweeps on data ``(x, y)``, its decisions forced.

    Every slot's three per-example differences ``(D_a, D_b, D_a - D_b)`` are reduced to weighted sums
    ``sum_i w_i D`` and ``sum_i w_i D^2`` (``w`` need not sum to 1: chunks of a large sample add up), or with
    ``rows`` returned whole. Pure JAX; ``vmap``-safe.

    With ``g`` ``(m, q)`` (per-example gradients, a control variate) the cross sums ``sum_i w_i D g_i`` ``(S, p,
    3, q)`` are returned too.

    Returns:
      ``(s1, s2)`` each ``(S, p, 3)`` (and the cross sums), or ``(S, p, 3, m)`` rows when ``rows``.
    """
    theta0, unravel = ravel_pytree(params)
    dtype = jnp.result_type(theta0, jnp.float32)
    diff2 = pair_difference(loss_fn, unravel, x, y, design=design, margin_loss=margin_loss, penalty=penalty)
    _, _, init, _ = _descent(q, loss_fn, params, x, y, None, None, penalty, skip=skip, design=design,
                             margin_loss=margin_loss, start=start)  # fmt: skip
    d_a, d_b, b_wins, accept = _decisions(records)
    s_count, p = d_a.shape
    w = jnp.asarray(w, dtype)
    start = jnp.asarray(start, dtype)

    def slot(s):
        def body(carry, j):
            theta, state = carry
            a = jax.tree.map(lambda f: f[s, j], records.a)
            b = jax.tree.map(lambda f: f[s, j], records.b)
            dv_a, pen_a, st_a = diff2(theta, state, a.j, a.t.astype(dtype), a.i, a.u.astype(dtype))
            dv_b, pen_b, st_b = diff2(theta, state, b.j, b.t.astype(dtype), b.i, b.u.astype(dtype))
            three = jnp.stack([dv_a + pen_a, dv_b + pen_b, (dv_a + pen_a) - (dv_b + pen_b)])
            theta_a = theta.at[a.j].set(a.t.astype(dtype)).at[a.i].set(a.u.astype(dtype))
            theta_b = theta.at[b.j].set(b.t.astype(dtype)).at[b.i].set(b.u.astype(dtype))
            wins, take = b_wins[s, j], accept[s, j]
            target = jnp.where(wins, theta_b, theta_a)
            moved = jax.tree.map(lambda u, v: jnp.where(wins, v, u), st_a, st_b)
            theta = jnp.where(take, target, theta)
            state = jax.tree.map(lambda new, old: jnp.where(take, new, old), moved, state)
            if rows:
                out = three
            elif g is None:
                out = (three @ w, (three * three) @ w)
            else:
                out = (three @ w, (three * three) @ w, three @ (w[:, None] * g))
            return (theta, state), out

        return body

    m = x.shape[0]
    shape = (s_count, p, 3, m) if rows else (s_count, p, 3)
    bufs = (jnp.zeros(shape, dtype),) if rows else (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    if g is not None and not rows:
        bufs = (*bufs, jnp.zeros((*shape, g.shape[1]), dtype))

    def sweep(carry):
        s, theta, state, bufs = carry
        (theta, state), out = jax.lax.scan(slot(s), (theta, state), jnp.arange(p, dtype=jnp.int32))
        if rows:
            out = (out,)
        bufs = tuple(buf.at[s].set(o) for buf, o in zip(bufs, out))
        return s + 1, theta, state, bufs

    def cond(carry):
        return carry[0] < sweeps - 1

    carry = (jnp.int32(0), start, init(start), bufs)
    return jax.lax.while_loop(cond, sweep, carry)[3]


def start_candidates(q, release_start: Array, params: PyTree, skip) -> tuple[Array, Array]:
    """The starts one round-to-nearest threshold away: ``(starts (2p, p), exists (2p,))``, row ``2j`` with
    coordinate ``j`` one level down, ``2j + 1`` one level up (the order of
    :func:`~qmis_jax.indicator.rtn_margins`' element events). Sparse ternary has none (its crossings swap the
    support: every one counts as an event, see :func:`start_events`)."""
    theta, unravel = ravel_pytree(params)
    start = jnp.asarray(release_start)
    p = start.shape[0]
    if is_sparse_ternary(q):
        return jnp.broadcast_to(start, (2 * p, p)), jnp.zeros((2 * p,), bool)
    _, lo, up, has_lo, has_up = adjacent_levels(q, unravel(start.astype(theta.dtype)), params, skip)
    eye = jnp.eye(p, dtype=bool)
    down = jnp.where(eye, lo[None, :].astype(start.dtype), start[None, :])
    upper = jnp.where(eye, up[None, :].astype(start.dtype), start[None, :])
    starts = jnp.stack([down, upper], axis=1).reshape(2 * p, p)
    exists = jnp.stack([has_lo, has_up], axis=1).reshape(-1)
    return starts, exists


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("skip", "max_sweeps", "design", "margin_loss"))
def descend_from(q, loss_fn, params, starts, x, y, weights, penalty, *, skip, max_sweeps, design, margin_loss):
    """The loss-PTQ descents (same code as :func:`~qmis_jax.indicator.ptq_loss`) of ``K`` starts ``(K, p)`` on one
    data set: ``(ends (K, p), settled (K,))``."""

    def one(start):
        theta0, _, init, sweep = _descent(q, loss_fn, params, x, y, None, weights, penalty, skip=skip, design=design,
                                          margin_loss=margin_loss, start=start)  # fmt: skip
        if sweep is None:
            return theta0, jnp.asarray(True)
        theta, _, settled = _greedy_sweeps(sweep, theta0, init(theta0), max_sweeps)
        return theta, settled

    return jax.vmap(one)(starts)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("skip", "max_sweeps", "design", "margin_loss"))
def descent_paths_from(q, loss_fn, params, starts, x, y, penalty, *, skip, max_sweeps, design, margin_loss):
    """:func:`descend_from` with every comparison recorded: the
    :class:`~qmis_jax.indicator.ptq.DescentPath` of each of ``K`` starts ``(K, p)`` on one data set (fields with a
    leading axis ``K``), in one program."""

    def one(start):
        return _descent_path(q, loss_fn, params, x, y, None, None, penalty, start, skip=skip, max_sweeps=max_sweeps,
                             design=design, margin_loss=margin_loss)  # fmt: skip

    return jax.vmap(one)(starts)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("skip", "design", "margin_loss"))
def replay_paths(q, loss_fn, params, starts, records: StepRecord, sweeps, x, y, w, penalty, *, skip, design,
                 margin_loss):  # fmt: skip
    """:func:`replay_path`'s sums ``(s1, s2)`` of ``K`` recorded descents on one data set, each ``(K, S, p, 3)``,
    and :func:`path_comparisons` of each, ``(valid, sign)`` of the same shape, in one program."""

    def one(start, rec, count):
        s1, s2 = replay_path(q, loss_fn, params, start, rec, count, x, y, w, penalty, skip=skip, design=design,
                             margin_loss=margin_loss, rows=False)  # fmt: skip
        return (s1, s2, *path_comparisons(rec, count))

    return jax.vmap(one)(starts, records, sweeps)


class EventSet(NamedTuple):
    """The events of one release as parallel rows (theory.md sections 3(a), 9).

    Attributes:
      delta: ``(K,)`` gaps (comparisons) or margins (thresholds, scale codes); NaN where not valid.
      sigma: ``(K,)`` their spreads (asymptotic scale, not divided by ``n``).
      valid: ``(K,)`` bool, the event exists.
      kind: ``(K,)`` int32 index into :data:`EVENT_KINDS`.
      coord: ``(K,)`` int32 coordinate (``ravel_pytree`` order) the event is about; -1 for scale events.
      D: ``(K_rows, m)`` per-example rows of the first ``K_rows`` events (for Cramer rates), or None.
      ok: bool, every statistic behind the events is finite (and ``H`` non-singular where it was needed).
      settled: bool, the descent stopped because a sweep moved nothing (False: it stopped at ``max_sweeps``,
        and the release is not known to be a local minimiser: ``r = 0``).
    """

    delta: Array
    sigma: Array
    valid: Array
    kind: Array
    coord: Array
    D: Array | None
    ok: Array
    settled: Array


def _full(shape, value, dtype):
    return jnp.full(shape, value, dtype)


def single_loss_events(q, problem, params, path, x, y, weights, opts, glm, *, start_descents: int) -> EventSet:
    """Every event of a loss-PTQ release chosen on ``(x, y)``, estimated on the same data (the single-model audit,
    theory.md section 6: on the data that chose it every decision holds, so the gaps are biased upward).

    Events: the release's competitors (rows ``D`` kept for Cramer rates), the scale code's events, the descent's
    other comparisons (:func:`path_comparisons`, stats by :func:`replay_path`), and the start events: the
    ``start_descents`` threshold crossings with the smallest ``m / s`` are descended (:func:`descend_from`), ``"start"``
    when they end elsewhere, ``"start_return"`` with the crossing's own margin when they come back (conservative: the
    intersection with the new path's comparisons has a larger rate); every other crossing counts as
    ``"start_unresolved"`` (an event that was not ruled out). Pure JAX, ``vmap``-safe.
    """
    skip, chunk_size = opts.skip, opts.chunk_size
    theta_hat, unravel = ravel_pytree(params)
    dtype = jnp.result_type(theta_hat, jnp.float32)
    n = x.shape[0]
    release = unravel(path.release.astype(theta_hat.dtype))
    # the release's own competitors, with their rows
    moves = competitors(q, release, params, skip=skip)
    D = loss_differences(problem.loss, release, moves, x, y, **glm, chunk_size=chunk_size, method=opts.differences)
    d_rel, s_rel = gap_stats(D, moves.valid, weights=weights)
    # the path's other comparisons
    w = normalized_weights(weights, n, dtype)
    s1, s2 = replay_path(q, problem.loss, params, path.start, path.records, path.sweeps, x, y, w, glm["penalty"],
                         skip=skip, design=glm["design"], margin_loss=glm["margin_loss"], rows=False)  # fmt: skip
    v_path, sign = path_comparisons(path.records, path.sweeps)
    d_path = jnp.where(v_path, sign * s1, jnp.nan).reshape(-1)
    s_path = jnp.where(v_path, jnp.sqrt(jnp.maximum(s2 - s1 * s1, 0.0)), jnp.nan).reshape(-1)
    p = theta_hat.shape[0]
    coord_path = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None, :, None], v_path.shape).reshape(-1)
    # thresholds and scale codes: margins by the delta method with the sandwich at the parameters
    # unchecked form: with fewer examples than parameters H is singular and the audit is flagged not ok
    cov, cov_ok = _sandwich_params(problem.loss, params, x, y, weights, pinv=False)
    m, s, v = rtn_margins(q, params, cov, skip=skip, chunk_size=chunk_size)
    m_el, s_el, v_el = m[: 2 * p], s[: 2 * p], v[: 2 * p]
    m_sc, s_sc, v_sc = m[2 * p :], s[2 * p :], v[2 * p :]
    start_kind, v_start = _resolve_starts(q, problem, params, path, x, y, weights, opts, glm, m_el, s_el, v_el,
                                          start_descents)  # fmt: skip
    D_rows = D
    if opts.method == "cramer" and m_sc.shape[0]:
        D_sc, _ = scale_differences(q, problem.loss, params, x, y, skip=skip, weights=weights, chunk_size=chunk_size)
        D_rows = jnp.concatenate([D, D_sc.astype(D.dtype)])
    k_rel, k_sc = d_rel.shape[0], m_sc.shape[0]
    delta = jnp.concatenate([d_rel, m_sc, d_path, m_el]).astype(dtype)
    sigma = jnp.concatenate([s_rel, s_sc, s_path, s_el]).astype(dtype)
    valid = jnp.concatenate([moves.valid, v_sc, v_path.reshape(-1), v_start])
    kind = jnp.concatenate([
        _full((k_rel,), KIND["release"], jnp.int32), _full((k_sc,), KIND["scale"], jnp.int32),
        _full(d_path.shape, KIND["path"], jnp.int32), start_kind,
    ])  # fmt: skip
    coord = jnp.concatenate([
        moves.index.astype(jnp.int32), _full((k_sc,), -1, jnp.int32), coord_path,
        jnp.repeat(jnp.arange(p, dtype=jnp.int32), 2),
    ])  # fmt: skip
    finite = jnp.all(jnp.where(valid, jnp.isfinite(delta) & jnp.isfinite(sigma), True))
    return EventSet(delta, sigma, valid, kind, coord, D_rows, cov_ok & finite, path.settled)


def _resolve_starts(q, problem, params, path, x, y, weights, opts, glm, m_el, s_el, v_el, budget: int):
    """``(kind (2p,), valid (2p,))`` of the start events: the ``budget`` crossings with the smallest ``m / s`` are
    descended on ``(x, y)``: ``"start"`` when they end elsewhere than ``path.release``, ``"start_return"`` (with the
    crossing's own margin, a lower rate than the intersection's) when they come back; the others count as
    ``"start_unresolved"``. Every crossing is an event."""
    k = m_el.shape[0]
    starts, exists = start_candidates(q, path.start, params, opts.skip)
    c = jnp.where(v_el & exists, m_el / jnp.where(s_el > 0, s_el, 1.0), jnp.inf)
    budget = min(budget, k)
    descended = jnp.zeros((k,), bool)
    leads = jnp.zeros((k,), bool)
    if budget > 0:
        order = jnp.argsort(c)[:budget]
        ends, settled = descend_from(q, problem.loss, params, starts[order], x, y, weights, glm["penalty"],
                                     skip=opts.skip, max_sweeps=_check_sweeps(opts.max_sweeps),
                                     design=glm["design"], margin_loss=glm["margin_loss"])  # fmt: skip
        elsewhere = jnp.any(ends != path.release[None, :].astype(ends.dtype), axis=1) | ~settled
        ran = jnp.isfinite(c[order])
        descended = descended.at[order].set(ran)
        leads = leads.at[order].set(ran & elsewhere)
    # a crossing that comes back changes the release only with a comparison of its new path: that intersection's
    # rate is at least the crossing's own, which it counts with here (conservative; the population indicator
    # computes the intersection, _population._return_events)
    kind = jnp.where(descended, jnp.where(leads, KIND["start"], KIND["start_return"]), KIND["start_unresolved"])
    return kind.astype(jnp.int32), v_el
