"""The population indicator's events and their precision (theory.md sections 3, 5, 6).

The population release is chosen on one fresh sample (``select``); its events are those of :mod:`.events`; their
gaps and spreads are estimated on an independent fresh sample accumulated chunk by chunk (memory stays bounded)
until the predicted flip probability is precise (:func:`required_size`): its relative standard error, about
``h(x) sqrt(n) se(c)`` for one event with ``x = sqrt(n) c``, ``h`` the inverse Mills ratio and
``se(c) ~ sqrt((1 + c^2 / 2) / m)``, at most :data:`TARGET_RELATIVE_SE` wherever ``x <= REGIME_EDGE`` (about
``1400 n`` points at ``x = 3.5``).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from qmis_jax.quantizers import quantize_tree
from qmis_jax.quantizers.release import release_info
from qmis_jax.quantizers.tree import _flatten

from .events import (
    EVENT_KINDS,
    KIND,
    descend_from,
    descent_paths_from,
    path_comparisons,
    replay_path,
    replay_paths,
    start_candidates,
)
from .margins import competitors, loss_differences, rtn_differences, rtn_margins
from .ptq import _check_sweeps, descent_path, is_sparse_ternary
from .sandwich import hessian_diag

Array = jax.Array
PyTree = Any

TARGET_RELATIVE_SE = 0.10
REGIME_EDGE = 3.5
START_CUTOFF = 6.0  # sqrt(n) c beyond which p_k = Phi(-sqrt(n) c) < 1e-9: such a start cannot matter to the flip
MAX_STARTS = 64  # starts descended at most; crossings beyond that count as unresolved events (conservative)
START_SAMPLE = 10  # the starts are descended on the first max(20000, START_SAMPLE n) points of the selection sample
ROW_BUDGET = 1 << 24  # elements of a (K, m) block of per-example rows computed at once
FULL_COVARIANCE_MAX_P = 1024  # above this the sandwich is its diagonal (sandwich_diagonal's estimator)


class PopulationEvents(NamedTuple):
    """The population release and its events, estimated (host arrays, float64 statistics).

    Attributes:
      release: the population release (pytree). n_moves: its descent's accepted moves.
      delta, sigma, valid, kind, coord: ``(K,)`` events as in :class:`~qmis_jax.indicator.events.EventSet`.
      rows: ``(K, m_c)`` per-example rows of every event on the first chunk (correlations, Cramer rates).
      sample_size: points of the gap sample the statistics used.
      error_ratio: ``(K,)`` the variance of each gap's estimation error per point, as a fraction of ``sigma^2``
        (1 for a plain mean; less with the control variate; 0 for a margin at a known ``theta*``).
      settled: the population descent stopped because a sweep moved nothing.
      undetermined: ``(K,)`` path decisions whose sign on the gap sample differs from the one the selection
        sample took (the population path is not determined at this precision).
      ok: every statistic finite and ``H`` non-singular.
    """

    release: PyTree
    n_moves: int
    delta: np.ndarray
    sigma: np.ndarray
    valid: np.ndarray
    kind: np.ndarray
    coord: np.ndarray
    rows: np.ndarray
    sample_size: int
    error_ratio: np.ndarray
    settled: bool
    undetermined: np.ndarray
    ok: bool


def _normal_sf(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(np.asarray(x, np.float64) / math.sqrt(2.0))


def required_size(n: int, c: np.ndarray, ratio: np.ndarray | float = 1.0) -> int:
    """Gap-sample size for a relative standard error at most :data:`TARGET_RELATIVE_SE` of the predicted flip,
    from the events' ``c_k``, when ``sqrt(n) min_k c_k <= REGIME_EDGE`` (no requirement beyond).

    Sizing only, with the events taken as independent: ``F = 1 - prod_k (1 - p_k)``, ``p_k = Phi(-x_k)``,
    ``x_k = sqrt(n) c_k``; ``F`` moves with ``c_k`` by ``sqrt(n) phi(x_k) prod_{j != k} (1 - p_j)`` and
    ``se(c_k) = sqrt((ratio_k + c_k^2 / 2) / m)`` (``ratio_k`` the gap's error variance per point over
    ``sigma_k^2``: 1 for a plain mean), so the relative standard error is at most
    ``sum_k sqrt(n) phi(x_k) prod_{j != k} (1 - p_j) sqrt(ratio_k + c_k^2 / 2) / (F sqrt(m))``. With one event
    and a plain mean: ``m = (h(x) sqrt(n) / 0.1)^2 (1 + c^2 / 2)``, ``h`` the inverse Mills ratio, about
    ``1400 n`` at ``x = 3.5``.
    """
    c = np.asarray(c, np.float64)
    ratio = np.broadcast_to(np.asarray(ratio, np.float64), c.shape)
    finite = np.isfinite(c)
    c, ratio = np.maximum(c[finite], 0.0), ratio[finite]
    if c.size == 0 or math.sqrt(n) * float(np.min(c)) > REGIME_EDGE:
        return 0
    x = math.sqrt(n) * c
    p = _normal_sf(x)
    log_keep = np.sum(np.log1p(-np.minimum(p, 1 - 1e-16)))
    flip = -math.expm1(log_keep)
    others = np.exp(log_keep - np.log1p(-np.minimum(p, 1 - 1e-16)))
    dens = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    numerator = float(np.sum(math.sqrt(n) * dens * others * np.sqrt(ratio + 0.5 * c * c)))
    return int(math.ceil((numerator / (TARGET_RELATIVE_SE * flip)) ** 2))


class _Moments:
    """Running means of ``D``, ``D^2`` and (optionally) ``g D`` of ``(K,)`` statistics over chunks, in float64."""

    def __init__(self):
        self.count = 0
        self.sums = None

    def add(self, count: int, *means):
        means = [np.asarray(a, np.float64) * count for a in means]
        self.sums = means if self.sums is None else [a + b for a, b in zip(self.sums, means)]
        self.count += count

    def stats(self):
        mean, mean_sq = self.sums[0] / self.count, self.sums[1] / self.count
        return mean, np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))

    def controlled(self, g_mean: np.ndarray, v: np.ndarray):
        """``(delta, sigma, ratio)`` with the control variate ``g`` (``E g = 0`` known, ``v = E g g^T``): the gap
        ``mean D - beta^T mean g``, ``beta = v^-1 Cov(g, D)``, and the fraction of ``Var D`` its error keeps."""
        mean, sd = self.stats()
        shape = mean.shape
        cross = (self.sums[2] / self.count).reshape(-1, g_mean.shape[0]) - np.outer(mean.reshape(-1), g_mean)
        try:
            beta = np.linalg.solve(v, cross.T)  # (p, K)
        except np.linalg.LinAlgError:
            return mean, sd, np.ones(shape)
        delta = mean.reshape(-1) - beta.T @ g_mean
        explained = np.sum(cross.T * beta, axis=0)
        var = (sd * sd).reshape(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(var > 0, np.clip((var - explained) / var, 0.0, 1.0), 1.0)
        return delta.reshape(shape), sd, ratio.reshape(shape)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("full",))
def _cov_sums(loss, params, x, y, *, full):
    """Sums over a chunk of the per-example Hessians and gradient outer products (or their diagonals)."""
    theta, _, f = _flat(loss, params)
    theta = theta.astype(jnp.result_type(theta, jnp.float32))

    grads = jax.vmap(jax.grad(f), in_axes=(None, 0, 0))(theta, x, y)
    if full:
        hess = jax.hessian(lambda th: jnp.sum(jax.vmap(f, in_axes=(None, 0, 0))(th, x, y)))(theta)
        return 0.5 * (hess + hess.T), grads.T @ grads
    return None, jnp.sum(grads * grads, axis=0)


@functools.partial(jax.jit, static_argnums=(0,))
def _grads(loss, params, x, y):
    """``(m, p)`` per-example gradients at ``params`` (the control variate of the gap estimates)."""
    theta, _, f = _flat(loss, params)
    theta = theta.astype(jnp.result_type(theta, jnp.float32))
    return jax.vmap(jax.grad(f), in_axes=(None, 0, 0))(theta, x, y)


@jax.jit
def _rows_moments(D, g):
    """Means of ``D``, ``D^2`` over examples and, with ``g``, of ``D g``."""
    m = D.shape[1]
    if g is None:
        return jnp.mean(D, axis=1), jnp.mean(D * D, axis=1)
    return jnp.mean(D, axis=1), jnp.mean(D * D, axis=1), D @ g / m


class _Problem(NamedTuple):
    """What the population pieces need of a problem and the options."""

    q: Any
    loss: Callable
    glm: dict
    skip: Any
    max_sweeps: int
    chunk_size: int | None
    differences: str


def _sub_chunks(x, y, k: int):
    """Split a chunk so that ``k`` rows of per-example values fit :data:`ROW_BUDGET`."""
    m = x.shape[0]
    step = max(256, ROW_BUDGET // max(k, 1))
    for a in range(0, m, step):
        yield x[a : a + step], y[a : a + step]


def leaf_labels(params: PyTree, skip) -> list[str]:
    """The leaf name of every coordinate in ``ravel_pytree`` order, with its index: ``"w[3]"``."""
    out = []
    for name, leaf, _ in _flatten(params, skip)[0]:
        size = int(np.size(leaf))
        out += [f"{name}[{i}]" if size > 1 else name for i in range(size)]
    return out


def population_events(
    pr: _Problem,
    theta_star: PyTree,
    chunks: Callable[[int], tuple[Array, Array]],
    select: tuple[Array, Array] | None,
    *,
    ptq: str,
    n: int,
    key: Array | None,
    max_size: int,
    first_size: int,
    exact_star: bool = False,
) -> PopulationEvents:
    """The population release's events and their statistics from fresh chunks ``chunks(0), chunks(1), ...``.

    Loss PTQ: the release is the descent on ``select`` (or on chunk 0) from round-to-nearest of ``theta*``; its
    events are the release's competitors, the path's other comparisons, the scale code's events and the start
    events that lead elsewhere (every threshold crossing with ``sqrt(n) c`` below ``max(START_CUTOFF, sqrt(n)
    c_min)`` is descended on part of ``select``, :func:`_resolve_starts`). RTN: the thresholds and scale code
    events. Chunks are drawn until the
    predicted flip is precise (:func:`required_size`) or ``max_size`` points are used.

    ``exact_star``: ``theta*`` is the population optimum exactly (a closed form), so the per-example gradient at
    ``theta*`` has mean 0 and serves as a control variate: the comparisons' gaps are estimated as
    ``mean D - beta^T mean g`` (``beta`` the regression of ``D`` on ``g``), which removes their first-order noise,
    and the margins (``theta*`` known) err only through their spread.
    """
    loss = ptq == "loss"
    x0, y0 = chunks(0)
    sel = select if select is not None else (x0, y0)
    rel = _population_release(pr, theta_star, sel, loss=loss, key=key)
    p = int(ravel_pytree(theta_star)[0].shape[0])
    control = exact_star and p <= FULL_COVARIANCE_MAX_P
    sample = _gap_sample(pr, theta_star, rel, chunks, (x0, y0), n=n, control=control, exact_star=exact_star,
                         max_size=max_size, first_size=first_size)  # fmt: skip
    m_el, s_el, v_el, m_sc, s_sc, v_sc, cov_ok = sample.margins
    table = _EventTable(0.0 if exact_star else 1.0)  # theta* known: a margin errs only through its spread
    sc_coord = scale_coords(pr.q, theta_star, pr.skip)
    el_coord = np.arange(2 * p) // 2
    if loss:
        independent = select is not None  # decided on select, estimated on another sample: a sign may differ
        d_rel, s_rel, r_rel = sample.gaps(sample.rel)
        v_rel = np.asarray(rel.moves.valid)
        table.add("release", np.asarray(rel.moves.index), d_rel, s_rel, v_rel, r_rel,
                  undetermined=v_rel & (d_rel <= 0) & independent)  # fmt: skip
        table.add("scale", sc_coord, m_sc, s_sc, v_sc)
        d_p, s_p, r_p = sample.gaps(sample.path)
        d_p = (rel.sign * d_p).reshape(-1)
        vp = (rel.v_path & ~_repeated_comparisons(rel.path, rel.moves, rel.v_path)).reshape(-1)
        coord_p = np.broadcast_to(np.arange(p)[None, :, None], rel.v_path.shape).reshape(-1)
        table.add(
            "path", coord_p, d_p, s_p.reshape(-1), vp, r_p.reshape(-1), undetermined=vp & (d_p <= 0) & independent
        )
        starts = _resolve_starts(pr, theta_star, rel.path, sel, n, m_el, s_el, v_el, *table.known())
        for name in ("start", "start_unresolved"):
            table.add(name, el_coord, m_el, s_el, starts.valid & (starts.kinds == KIND[name]))
    else:
        table.add("threshold", el_coord, m_el, s_el, v_el)
        table.add("scale", sc_coord, m_sc, s_sc, v_sc)
    kind, coord, delta, sigma, valid, ratio, undetermined = table.arrays()
    # keep only the events that exist: the rows below are computed for them alone
    keep = valid
    rows, el_rows = _rows(pr, theta_star, rel.release, rel.moves, rel.path, x0, y0, keep, ptq, p)
    kind, coord, delta, sigma = kind[keep], coord[keep], delta[keep], sigma[keep]
    ratio, undetermined = ratio[keep], undetermined[keep]
    if loss:
        m_c = rows.shape[1]
        r_coord, r_c, r_rows = _return_events(pr, theta_star, rel, starts, m_el, s_el, el_rows, x0[:m_c], y0[:m_c],
                                              rows)  # fmt: skip
        k_r = r_c.size
        kind = np.concatenate([kind, np.full(k_r, KIND["start_return"], np.int32)])
        coord, delta = np.concatenate([coord, r_coord]), np.concatenate([delta, r_c])
        sigma, ratio = np.concatenate([sigma, np.ones(k_r)]), np.concatenate([ratio, np.ones(k_r)])
        undetermined = np.concatenate([undetermined, np.zeros(k_r, bool)])
        rows = np.concatenate([rows, r_rows])
    finite = bool(np.all(np.isfinite(delta)) & np.all(np.isfinite(sigma)))
    return PopulationEvents(
        release=rel.release,
        n_moves=rel.n_moves,
        delta=delta,
        sigma=sigma,
        valid=np.ones(delta.shape, bool),
        kind=kind,
        coord=coord,
        rows=rows,
        sample_size=sample.count,
        error_ratio=ratio,
        settled=rel.settled,
        undetermined=undetermined,
        ok=bool(cov_ok) and finite,
    )


class _Release(NamedTuple):
    """The population release and, for loss PTQ, its recorded descent (cut to the sweeps run), its competitors
    and its path comparisons (``v_path``, ``sign``: :func:`~qmis_jax.indicator.events.path_comparisons`)."""

    release: PyTree
    settled: bool
    n_moves: int
    path: Any = None
    moves: Any = None
    v_path: np.ndarray | None = None
    sign: np.ndarray | None = None
    used: int = 1


def _population_release(pr: _Problem, theta_star, sel, *, loss: bool, key) -> _Release:
    """Loss PTQ: the descent on ``sel`` from round-to-nearest of ``theta*``, recorded; RTN: ``Q(theta*)``."""
    if not loss:
        return _Release(quantize_tree(pr.q, theta_star, key=key, skip=pr.skip), True, 0)
    theta, unravel = ravel_pytree(theta_star)
    path = descent_path(pr.q, pr.loss, theta_star, *sel, key=key, skip=pr.skip, max_sweeps=pr.max_sweeps, **pr.glm)
    used = max(int(path.sweeps), 1)
    path = path._replace(records=_cut(path.records, used))
    release = unravel(path.release.astype(theta.dtype))
    v_path, sign = (np.asarray(a) for a in path_comparisons(path.records, path.sweeps))
    moves = competitors(pr.q, release, theta_star, skip=pr.skip)
    return _Release(release, bool(path.settled), int(path.moves), path, moves, v_path, sign, used)


class _GapSample(NamedTuple):
    """The gap sample's accumulated statistics: the release's and the path's moments, ``E g``, ``E g g^T`` (the
    control variate's), the sandwich ``cov``, the points used and the margins at ``cov`` (:func:`_margins`)."""

    rel: _Moments
    path: _Moments
    g_mean: np.ndarray
    v_mean: np.ndarray
    cov: np.ndarray
    count: int
    control: bool
    margins: tuple = ()

    def gaps(self, moments: _Moments):
        """``(delta, sigma, error ratio)`` of accumulated moments, with the control variate where it applies."""
        if self.control:
            return moments.controlled(self.g_mean, self.v_mean)
        mean, sd = moments.stats()
        return mean, sd, np.ones(mean.shape)


def _gap_sample(pr, theta_star, rel: _Release, chunks, first, *, n, control, exact_star, max_size, first_size):
    """Accumulate the gap sample chunk by chunk (``first`` is chunk 0) until the predicted flip is precise
    (:func:`required_size`) or ``max_size`` points are used: the moments of the release's competitors and of the
    path's comparisons (with their cross moments with ``g`` for the control variate) and the sandwich's sums."""
    loss, glm, skip = pr.loss, pr.glm, pr.skip
    theta = ravel_pytree(theta_star)[0]
    p = int(theta.shape[0])
    dtype = jnp.result_type(theta, jnp.float32)
    full = p <= FULL_COVARIANCE_MAX_P
    glm_static = {"design": glm["design"], "margin_loss": glm["margin_loss"]}
    moments_rel, moments_path = _Moments(), _Moments()
    hess_sum, v_sum, g_sum, count = None, None, np.zeros(p), 0
    c = 0
    while True:
        x, y = first if c == 0 else chunks(c)
        m = int(x.shape[0])
        if rel.path is not None:
            for xs, ys in _sub_chunks(x, y, 2 * p + (p if control else 0)):
                D = loss_differences(loss, rel.release, rel.moves, xs, ys, **glm, chunk_size=pr.chunk_size,
                                     method=pr.differences)  # fmt: skip
                g = _grads(loss, theta_star, xs, ys) if control else None
                moments_rel.add(int(xs.shape[0]), *_rows_moments(D, g))
            for xs, ys in _sub_chunks(x, y, 3 * p * rel.used * (p + 2 if control else 1)):
                w = jnp.full((xs.shape[0],), 1.0 / xs.shape[0], dtype)
                g = _grads(loss, theta_star, xs, ys) if control else None
                out = replay_path(pr.q, loss, theta_star, rel.path.start, rel.path.records, rel.path.sweeps, xs, ys,
                                  w, glm["penalty"], g, skip=skip, rows=False, **glm_static)  # fmt: skip
                moments_path.add(int(xs.shape[0]), *out)
        if control:
            for xs, ys in _sub_chunks(x, y, p):
                g_sum += np.asarray(jnp.sum(_grads(loss, theta_star, xs, ys), axis=0), np.float64)
        h, v = _cov_sums(loss, theta_star, x, y, full=full)
        if not full:
            h = hessian_diag(loss, theta_star, x, y) * m
        h, v = np.asarray(h, np.float64), np.asarray(v, np.float64)
        hess_sum = h if hess_sum is None else hess_sum + h
        v_sum = v if v_sum is None else v_sum + v
        count += m
        cov = _sandwich(hess_sum / count, v_sum / count, float(jnp.finfo(dtype).eps))
        margins = _margins(pr, theta_star, cov, p)
        sample = _GapSample(moments_rel, moments_path, g_sum / count, v_sum / count, cov, count, control, margins)
        c += 1
        if count >= max_size or count >= max(first_size, required_size(n, *_current_c(sample, rel, exact_star))):
            return sample


class _EventTable:
    """The events as they are found, kind by kind; :meth:`arrays` stacks them."""

    def __init__(self, margin_ratio: float):
        self.margin_ratio = margin_ratio
        self.parts = []

    def add(self, kind, coord, d, s, v, r=None, *, undetermined=None):
        shape = np.shape(d)
        r = self.margin_ratio if r is None else r
        u = np.zeros(shape, bool) if undetermined is None else undetermined
        self.parts.append((np.full(shape, KIND[kind], np.int32), np.asarray(coord, np.int32),
                           np.asarray(d, np.float64), np.asarray(s, np.float64), np.asarray(v, bool),
                           np.broadcast_to(np.asarray(r, np.float64), shape), np.asarray(u, bool)))  # fmt: skip

    def known(self):
        """``(delta, sigma, valid)`` of the events added so far."""
        return tuple(np.concatenate([part[i] for part in self.parts]) for i in (2, 3, 4))

    def arrays(self):
        """``(kind, coord, delta, sigma, valid, error ratio, undetermined)``, each ``(K,)``."""
        return tuple(np.concatenate([part[i] for part in self.parts]) for i in range(7))


def _point_key(theta: np.ndarray) -> bytes:
    return np.ascontiguousarray(theta).tobytes()


def _moved(theta: np.ndarray, j, t, i, u) -> np.ndarray:
    out = theta.copy()
    out[int(j)] = t
    out[int(i)] = u
    return out


def _release_pairs(path, moves) -> set:
    """The point pairs ``{theta_0, move}`` of the release's competitors."""
    release = np.asarray(path.release)
    index, step, valid = (np.asarray(a) for a in (moves.index, moves.step, moves.valid))
    index2 = np.asarray(moves.index2) if moves.index2 is not None else index
    step2 = np.asarray(moves.step2) if moves.step2 is not None else np.zeros_like(step)
    key0 = _point_key(release)
    pairs = set()
    for k in np.flatnonzero(valid):
        other = release.copy()
        other[index[k]] += step[k]
        other[index2[k]] += step2[k]
        pairs.add(frozenset((key0, _point_key(other))))
    return pairs


def _slot_pairs(start, records, v_path: np.ndarray) -> np.ndarray:
    """``(S, p, 3)`` object array: the two codebook points each comparison of a recorded descent compares (as a
    frozenset of point keys), None where ``v_path`` is False."""
    rec = jax.tree.map(np.asarray, records)
    d_a = np.where(rec.a.valid & np.isfinite(rec.a.d), rec.a.d, np.inf)
    d_b = np.where(rec.b.valid & np.isfinite(rec.b.d), rec.b.d, np.inf)
    out = np.full(v_path.shape, None, object)
    theta = np.asarray(start).copy()
    for s in range(v_path.shape[0]):
        for j in range(v_path.shape[1]):
            a = _moved(theta, rec.a.j[s, j], rec.a.t[s, j], rec.a.i[s, j], rec.a.u[s, j])
            b = _moved(theta, rec.b.j[s, j], rec.b.t[s, j], rec.b.i[s, j], rec.b.u[s, j])
            cur = _point_key(theta)
            pairs = (frozenset((cur, _point_key(a))), frozenset((cur, _point_key(b))),
                     frozenset((_point_key(a), _point_key(b))))  # fmt: skip
            for c, pair in enumerate(pairs):
                if v_path[s, j, c]:
                    out[s, j, c] = pair
            if min(d_a[s, j], d_b[s, j]) < 0:
                theta = b if d_b[s, j] < d_a[s, j] else a
    return out


def _repeated_comparisons(path, moves, v_path: np.ndarray) -> np.ndarray:
    """``(S, p, 3)``: path comparisons between the same two codebook points as an earlier event (a release
    competitor, or an earlier path comparison): identical comparisons count once (theory.md section 3(a))."""
    seen = _release_pairs(path, moves)
    pairs = _slot_pairs(path.start, path.records, v_path)
    repeated = np.zeros(v_path.shape, bool)
    for idx in zip(*np.nonzero(v_path)):
        repeated[idx] = pairs[idx] in seen
        seen.add(pairs[idx])
    return repeated


def _flat(loss, params):
    theta, unravel = ravel_pytree(params)

    def f(th, xi, yi):
        return loss(unravel(th), xi, yi)

    return theta, unravel, f


def _sandwich(h, v, eps: float):
    """``H^-1 V H^-1`` (full) or its diagonal ``V_jj / H_jj^2``, float64 on the host; NaN when ``H`` is singular:
    its smallest absolute eigenvalue below ``p eps`` times its largest (``numpy.linalg.matrix_rank``'s tolerance,
    ``eps`` that of the statistics' float type), as :func:`~qmis_jax.indicator.sandwich_covariance_flagged`."""
    if h.ndim == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(h != 0, v / (h * h), np.nan)
    eig = np.abs(np.linalg.eigvalsh(h)) if np.all(np.isfinite(h)) else np.zeros(1)
    if eig.size == 0 or eig.min() <= eig.max() * max(h.shape[0], 1) * eps:
        return np.full_like(h, np.nan)
    try:
        a = np.linalg.solve(h, v)
        cov = np.linalg.solve(h, a.T).T
    except np.linalg.LinAlgError:
        return np.full_like(h, np.nan)
    return 0.5 * (cov + cov.T)


def _margins(pr: _Problem, theta_star, cov, p: int):
    """Element thresholds and scale code events of ``theta*``: ``(m_el, s_el, v_el, m_sc, s_sc, v_sc, ok)``."""
    ok = bool(np.all(np.isfinite(cov)))
    cov_j = jnp.asarray(np.nan_to_num(cov), jnp.result_type(ravel_pytree(theta_star)[0], jnp.float32))
    m, s, v = (np.asarray(a) for a in rtn_margins(pr.q, theta_star, cov_j, skip=pr.skip, chunk_size=pr.chunk_size))
    m, s = m.astype(np.float64), s.astype(np.float64)
    return m[: 2 * p], s[: 2 * p], v[: 2 * p], m[2 * p :], s[2 * p :], v[2 * p :], ok


def _c(delta, sigma, valid):
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(sigma > 0, delta / np.where(sigma > 0, sigma, 1.0), np.where(delta > 0, np.inf, 0.0))
    return np.where(valid, c, np.inf)


def _current_c(sample: _GapSample, rel: _Release, exact_star: bool):
    """``(c, error ratios)`` of the events known so far and of every threshold crossing (they size the sample,
    conservatively)."""
    m_el, s_el, v_el, m_sc, s_sc, v_sc, _ = sample.margins
    margin = 0.0 if exact_star else 1.0
    cs = [_c(m_el, s_el, v_el), _c(m_sc, s_sc, v_sc)]
    ratios = [np.full(m_el.shape, margin), np.full(m_sc.shape, margin)]
    if rel.moves is not None:
        for moments, v in ((sample.rel, np.asarray(rel.moves.valid)), (sample.path, rel.v_path)):
            d, s, r = sample.gaps(moments)
            cs.append(_c(np.abs(d), s, v).reshape(-1))
            ratios.append(np.broadcast_to(r, np.shape(d)).reshape(-1))
    return np.concatenate(cs), np.concatenate(ratios)


class _Starts(NamedTuple):
    """The threshold crossings of a loss-PTQ release (:func:`_resolve_starts`), each ``(2p,)`` where per crossing.

    Attributes:
      kinds: event kind (``start`` where descended, else ``start_unresolved``).
      valid: the crossing is an event.
      returning: indices of the descended crossings that come back to ``theta_0`` (:func:`_return_events`).
      points: ``(2p, p)`` every crossing's start.
      sample: the points the crossings were descended on.
      cutoff: ``max(START_CUTOFF / sqrt(n), c_min)``: an event with ``c`` at or beyond it can lower neither ``r``
        nor the predicted flip (by more than ``Phi(-START_CUTOFF)``).
    """

    kinds: np.ndarray
    valid: np.ndarray
    returning: np.ndarray
    points: np.ndarray
    sample: tuple[Array, Array]
    cutoff: float


def _resolve_starts(pr, theta_star, path, sel, n, m_el, s_el, v_el, delta, sigma, valid) -> _Starts:
    """The start events (:class:`_Starts`): every crossing that can matter (``c`` below the cutoff) is descended
    on the first ``max(20000, START_SAMPLE n)`` points of ``sel``, the ``MAX_STARTS`` nearest their thresholds at
    most; it counts when it ends elsewhere. Crossings beyond the cap, and sparse ternary's (support swaps), count
    as unresolved."""
    others = _c(delta, sigma, valid)
    c_other = float(np.min(others)) if others.size else math.inf
    cutoff = max(START_CUTOFF / math.sqrt(n), c_other)
    starts, exists = (np.asarray(a) for a in start_candidates(pr.q, path.start, theta_star, pr.skip))
    c_el = _c(m_el, s_el, v_el)
    k = c_el.shape[0]
    kinds = np.full(k, KIND["start_unresolved"], np.int32)
    counted = v_el & (c_el < cutoff)
    m_s = max(20_000, START_SAMPLE * n)
    sub = (sel[0][:m_s], sel[1][:m_s])
    returning = np.zeros(0, np.int64)
    if is_sparse_ternary(pr.q):
        return _Starts(kinds, counted, returning, starts, sub, cutoff)
    candidates = np.flatnonzero(counted & exists)
    candidates = candidates[np.argsort(c_el[candidates], kind="stable")]
    run, rest = candidates[:MAX_STARTS], candidates[MAX_STARTS:]
    result = counted.copy()
    if run.size:
        idx = _padded(run)
        ends, settled = descend_from(pr.q, pr.loss, theta_star, jnp.asarray(starts[idx]), *sub, None,
                                     pr.glm["penalty"], skip=pr.skip, max_sweeps=pr.max_sweeps,
                                     design=pr.glm["design"], margin_loss=pr.glm["margin_loss"])  # fmt: skip
        ends, settled = np.asarray(ends)[: run.size], np.asarray(settled)[: run.size]
        elsewhere = np.any(ends != np.asarray(path.release)[None, :], axis=1) | ~settled
        kinds[run] = KIND["start"]
        result[run] = elsewhere
        returning = run[~elsewhere]
    result[rest] = True
    return _Starts(kinds, result, returning, starts, sub, cutoff)


def _padded(index: np.ndarray) -> np.ndarray:
    """``index`` padded with its first entry to a power of two: a few program shapes whatever its size."""
    size = 1 << int(math.ceil(math.log2(index.size)))
    return np.concatenate([index, np.full(size - index.size, index[0])])


RETURN_TOP = 8  # start_return events kept per returning crossing (the smallest rates; the minimum always)
RETURN_SAMPLE = 20_000  # points of the start sample the returning descents are replayed on


def _intersection(a: float, b: np.ndarray, rho: np.ndarray):
    """The tangent half-space of ``{Y_1 >= a, Y_2 >= b}`` (unit-variance Gaussians, correlation ``rho``) at its most
    likely point: ``(c, u_1, u_2)`` with ``P ~ Phi(-sqrt(n) c)``, rate ``c^2 / 2``, and the half-space
    ``u_1 Y_1 + u_2 Y_2 >= c`` (``Var = 1``). Where one constraint holds at the other's optimum, that one alone."""
    b = np.maximum(b, 0.0)
    rho = np.clip(rho, -0.999999, 0.999999)
    det = 1.0 - rho * rho
    both = (a * rho < b) & (b * rho < a)
    c_both = np.sqrt(np.maximum(a * a - 2 * rho * a * b + b * b, 0.0) / det)
    with np.errstate(divide="ignore", invalid="ignore"):
        u1 = np.where(c_both > 0, (a - rho * b) / (det * c_both), 1.0)
        u2 = np.where(c_both > 0, (b - rho * a) / (det * c_both), 0.0)
    start_alone = ~both & (a * rho >= b)
    c = np.where(both, c_both, np.where(start_alone, a, b))
    u1 = np.where(both, u1, np.where(start_alone, 1.0, 0.0))
    u2 = np.where(both, u2, np.where(start_alone, 0.0, 1.0))
    return c, u1, u2


def _cut(records, sweeps: int):
    """A recorded descent's first ``sweeps`` sweeps."""
    return jax.tree.map(lambda a: a[:sweeps], records)


def _standard(rows: np.ndarray) -> np.ndarray:
    sd = rows.std(axis=-1, keepdims=True)
    return (rows - rows.mean(axis=-1, keepdims=True)) / np.where(sd > 0, sd, 1.0)


class _Rows(NamedTuple):
    """Per-example rows ``(K, m)`` with their means and spreads ``(K,)``."""

    rows: np.ndarray
    mean: np.ndarray
    sd: np.ndarray


def _with_moments(rows: np.ndarray) -> _Rows:
    return _Rows(rows, rows.mean(axis=1), rows.std(axis=1))


def _same_events(raw: np.ndarray, known: _Rows, tol: float = 1e-4) -> np.ndarray:
    """``(L,)``: rows of ``raw`` that are the same per-example function as a row of ``known`` on the same points
    (equal means and spreads and correlation 1, to float32 rounding): the same event, whatever points it compares
    (a separable loss compares coordinate ``k`` identically from every point). Correlations are computed only for
    the pairs whose means and spreads already agree."""
    same = np.zeros(raw.shape[0], bool)
    if known.rows.shape[0] == 0 or raw.shape[0] == 0:
        return same
    mine = _with_moments(raw)
    scale = np.maximum(mine.sd[:, None], known.sd[None, :])
    close = np.abs(mine.mean[:, None] - known.mean[None, :]) <= tol * scale
    close &= np.abs(mine.sd[:, None] - known.sd[None, :]) <= tol * scale
    a, b = np.nonzero(close)
    if a.size:
        corr = np.einsum("km,km->k", _standard(raw[a]), _standard(known.rows[b])) / raw.shape[1]
        np.logical_or.at(same, a, corr >= 1 - tol)
    return same


def _return_events(pr, theta_star, rel: _Release, starts: _Starts, m_el, s_el, el_rows, x_rows, y_rows, known):
    """``start_return`` events of the crossings whose descent comes back to ``theta_0`` (theory.md section 3(a)).

    The release then changes only if the crossing happens and a comparison of the new path turns; a comparison
    some other event already holds (the same two codebook points) is covered by that event, the others pair with
    the crossing. Each pair (``c_start``, ``c_cmp`` and their correlation from per-example rows) is entered as the
    half-space tangent to the intersection at its most likely point (:func:`_intersection`): its ``c`` gives the
    rate, its row ``c + u_1 z_start + u_2 z_cmp`` the correlations with the other events. Every returning descent
    is replayed at once (one program) on the first :data:`RETURN_SAMPLE` points of the sample it was descended on,
    which gives the comparisons' gaps; a pair's ``c`` is at least its comparison's, so a comparison at or beyond
    ``starts.cutoff`` is dropped (it can lower neither ``r`` nor the flip). Rows come from ``(x_rows, y_rows)``,
    where the crossings' own rows ``el_rows`` were computed (:func:`_rows`); a comparison whose row is that of an
    event already held (``known``, rows on the same points) is that event (:func:`_same_events`) and covers its
    intersection too.

    Returns:
      ``(coord, c, rows)``: ``(K_r,)``, ``(K_r,)`` (``delta = c``, ``sigma = 1``) and ``(K_r, m_rows)``.
    """
    m_r = int(x_rows.shape[0])
    empty = np.zeros(0, np.int32), np.zeros(0), np.zeros((0, m_r))
    returning = starts.returning
    if returning.size == 0:
        return empty
    seen = _release_pairs(rel.path, rel.moves)
    main = _slot_pairs(rel.path.start, rel.path.records, rel.v_path)
    seen.update(pair for pair in main[rel.v_path])
    dtype = jnp.result_type(ravel_pytree(theta_star)[0], jnp.float32)
    glm_static = {"design": pr.glm["design"], "margin_loss": pr.glm["margin_loss"]}
    sub = tuple(a[:RETURN_SAMPLE] for a in starts.sample)  # one size whatever n: one program per quantizer
    points = jnp.asarray(starts.points[_padded(returning)])
    paths = descent_paths_from(pr.q, pr.loss, theta_star, points, *sub, pr.glm["penalty"], skip=pr.skip,
                               max_sweeps=pr.max_sweeps, **glm_static)  # fmt: skip
    longest = int(np.max(np.asarray(paths.sweeps)))
    used = min(1 << max(longest - 1, 0).bit_length(), int(paths.records.a.d.shape[1]))  # few program shapes
    records = jax.tree.map(lambda a: a[:, :used], paths.records)
    w = jnp.full((sub[0].shape[0],), 1.0 / sub[0].shape[0], dtype)
    s1, s2, v, sign = (np.asarray(a) for a in replay_paths(
        pr.q, pr.loss, theta_star, paths.start, records, paths.sweeps, *sub, w, pr.glm["penalty"], skip=pr.skip,
        **glm_static))  # fmt: skip
    records, begin, sweeps = jax.tree.map(np.asarray, (records, paths.start, paths.sweeps))  # sliced on the host
    s1, s2 = s1.astype(np.float64), s2.astype(np.float64)
    w_r = jnp.full((m_r,), 1.0 / m_r, dtype)
    known = _with_moments(np.asarray(known, np.float64))
    coords, cs, rows = [], [], []
    for i, j in enumerate(returning):  # host bookkeeping of each crossing's comparisons; the replays ran above
        d = sign[i] * s1[i]
        sd = np.sqrt(np.maximum(s2[i] - s1[i] * s1[i], 0.0))
        b = np.where(sd > 0, d / np.where(sd > 0, sd, 1.0), np.where(d > 0, np.inf, 0.0))
        near = v[i] & (b < starts.cutoff)
        if not near.any():
            continue
        rec = jax.tree.map(operator.itemgetter(i), records)
        pairs = _slot_pairs(begin[i], rec, near)
        new = near & np.vectorize(lambda pair: pair is not None and pair not in seen, otypes=[bool])(pairs)
        if not new.any():
            continue
        (r_path,) = replay_path(pr.q, pr.loss, theta_star, begin[i], rec, sweeps[i], x_rows, y_rows,
                                w_r, pr.glm["penalty"], skip=pr.skip, rows=True, **glm_static)  # fmt: skip
        raw = (np.asarray(r_path, np.float64) * sign[i][..., None])[new]
        fresh = ~_same_events(raw, known)
        if not fresh.any():
            continue
        z_cmp = _standard(raw[fresh])
        z_start = _standard(np.asarray(el_rows[j], np.float64))
        c, u1, u2 = _intersection(float(m_el[j] / s_el[j]), b[new][fresh], z_cmp @ z_start / m_r)
        keep = np.argsort(c, kind="stable")[:RETURN_TOP]
        coords.append(np.full(keep.size, j // 2, np.int32))
        cs.append(c[keep])
        rows.append(c[keep, None] + u1[keep, None] * z_start[None, :] + u2[keep, None] * z_cmp[keep])
    if not cs:
        return empty
    return np.concatenate(coords), np.concatenate(cs), np.concatenate(rows)


def _rows(pr, theta_star, release, moves, path, x0, y0, keep, ptq, p):
    """Per-example rows ``(K_kept, m_c)`` of the kept events on the first chunk (as many points as fit the
    budget): loss differences for comparisons, linearised contributions for margins; and the ``(2p, m_c)`` rows
    of every threshold crossing (kept or not) on the same points."""
    m_c = int(min(x0.shape[0], max(2048, ROW_BUDGET // max(int(keep.shape[0]), 1))))
    xc, yc = x0[:m_c], y0[:m_c]
    parts = []
    if ptq == "loss":
        D = loss_differences(pr.loss, release, moves, xc, yc, **pr.glm, chunk_size=pr.chunk_size,
                             method=pr.differences)  # fmt: skip
        parts.append(np.asarray(D))
    margin_rows, _ = rtn_differences(pr.q, pr.loss, theta_star, xc, yc, skip=pr.skip, chunk_size=pr.chunk_size)
    margin_rows = np.asarray(margin_rows)
    el_rows, sc_rows = margin_rows[: 2 * p], margin_rows[2 * p :]
    if ptq == "loss":
        parts.append(sc_rows)
        dtype = jnp.result_type(ravel_pytree(theta_star)[0], jnp.float32)
        w = jnp.full((m_c,), 1.0 / m_c, dtype)
        (rows,) = replay_path(pr.q, pr.loss, theta_star, path.start, path.records, path.sweeps, xc, yc, w,
                              pr.glm["penalty"], skip=pr.skip, design=pr.glm["design"],
                              margin_loss=pr.glm["margin_loss"], rows=True)  # fmt: skip
        _, sign = path_comparisons(path.records, path.sweeps)
        rows = np.asarray(rows) * np.asarray(sign)[..., None]
        parts.append(rows.reshape(-1, m_c))
        parts += [el_rows, el_rows]  # start, then start_unresolved
    else:
        parts += [el_rows, sc_rows]
    allrows = np.concatenate(parts)
    return allrows[keep], el_rows


def scale_coords(q, params: PyTree, skip) -> np.ndarray:
    """For each scale event (the order of :func:`~qmis_jax.quantizers.tree_scale_margins`), the first coordinate
    of its leaf in ``ravel_pytree`` order, so reports can name the leaf."""
    out, offset = [], 0
    for _, leaf, skipped in _flatten(params, skip)[0]:
        size = int(np.size(leaf))
        if not skipped and q.discrete_scale:
            k = int(np.prod(jax.eval_shape(q.scale_margins, leaf).shape))
            out.append(np.full(k, offset, np.int32))
        offset += size
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def standard_errors(n: int, ev: PopulationEvents, r: float, continuous: bool, key=None, top: int = 64):
    """``(se of r, se of the predicted flip)`` from the gap sample's size ``m`` (delta method).

    ``se(c_k) = sqrt((ratio_k + c_k^2 / 2) / m)`` (a standardised gap, ``ratio_k`` its error variance per point
    over ``sigma_k^2``, and its spread); ``r = c_min^2 / 2`` gives
    ``se(r) = c_min se(c_min)``. The predicted flip ``P = P(any k: Y_k < t_k)`` (``Y ~ N(0, rho)``, ``t_k =
    -sqrt(n) c_k``, theory.md section 5) moves with ``c_k`` by ``sqrt(n) phi(t_k) P(no other event | Y_k = t_k)``;
    that conditional probability is estimated by Monte Carlo for the ``top`` events of largest ``p_k`` (the others
    by 1), and the standard error is the sum of ``|dP / dc_k| se(c_k)``: the errors of the ``c_k``, all from one
    sample, are taken as moving together (conservative).
    """
    if continuous:
        return 0.0, 0.0
    m = max(int(ev.sample_size), 1)
    c = _c(ev.delta, ev.sigma, ev.valid)
    finite = np.isfinite(c)
    c = np.where(finite, np.maximum(c, 0.0), np.inf)
    cz = np.where(finite, c, 0.0)
    se_c = np.sqrt((ev.error_ratio + 0.5 * cz**2) / m)
    x = math.sqrt(n) * cz
    slope = np.where(finite, math.sqrt(n) * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi), 0.0)
    alone = _alone_probability(ev.rows, x, finite, top, key)
    flip_se = float(min(1.0, np.sum(slope * alone * se_c)))
    if r <= 0 or not np.any(finite):
        return 0.0, flip_se
    k = int(np.argmin(c))
    return float(c[k] * se_c[k]), flip_se


FULL_ALONE_MAX = 2048  # events up to which P(no other event | Y_k = t_k) is computed against every other event


def _alone_probability(rows: np.ndarray, x: np.ndarray, live: np.ndarray, top: int, key, samples: int = 2048):
    """``P(no other event | Y_k = -x_k)`` under the Gaussian copula of the rows (theory.md section 5).

    Against every other event when there are at most :data:`FULL_ALONE_MAX`; beyond, for the ``top`` events of
    smallest ``x`` against each other, and 1 (an upper bound) for the rest.
    """
    out = np.ones(x.shape)
    idx = np.flatnonzero(live)
    if idx.size == 0:
        return out
    if idx.size > FULL_ALONE_MAX:
        idx = idx[np.argsort(x[idx], kind="stable")[:top]]
    key = jax.random.key(0) if key is None else key
    out[idx] = np.asarray(_alone(jnp.asarray(rows[idx], jnp.float32), jnp.asarray(-x[idx], jnp.float32), key, samples))
    return out


@functools.partial(jax.jit, static_argnums=(3,))
def _alone(rows, t, key, samples):
    r = rows - jnp.mean(rows, axis=1, keepdims=True)
    sd = jnp.sqrt(jnp.mean(r * r, axis=1))
    ok = sd > 0
    z = r / jnp.where(ok, sd, 1.0)[:, None]
    eye = jnp.eye(rows.shape[0], dtype=rows.dtype)
    rho = jnp.clip(z @ z.T / rows.shape[1], -1.0, 1.0)
    rho = jnp.where(ok[:, None] & ok[None, :], rho, eye)
    rho = jnp.where(eye > 0, 1.0, rho)
    lam, vec = jnp.linalg.eigh(rho)
    root = vec * jnp.sqrt(jnp.maximum(lam, 0.0))[None, :]
    draws = jax.random.normal(key, (samples, rows.shape[0]), rows.dtype) @ root.T

    def one(k):
        y = draws + rho[:, k][None, :] * (t[k] - draws[:, k])[:, None]
        hit = (y < t[None, :]) & (jnp.arange(t.shape[0]) != k)[None, :]
        return jnp.mean(~jnp.any(hit, axis=1))

    return jax.lax.map(one, jnp.arange(t.shape[0]), batch_size=16)


def zero_reason(q, theta_star, opts, ev: PopulationEvents, continuous: bool, rates: np.ndarray) -> str | None:
    """Why ``r = 0`` (theory.md sections 4, 8, 9): the continuous part, the descent that did not settle, the path
    decision not determined, or the event (and its leaf) with a gap ``<= 0``. None when ``r > 0``."""
    if continuous:
        parts = release_info(q, theta_star, skip=opts.skip, ptq=opts.ptq)["continuous_parts"]
        what = ", ".join(parts) if parts else "stochastic round-to-nearest"
        return f"continuous release: {what} (theory.md section 9)"
    labels = leaf_labels(theta_star, opts.skip)

    def name(k):
        kind = _kind_name(ev.kind[k])
        j = int(ev.coord[k])
        where = labels[j].split("[")[0] if kind == "scale" else labels[j]
        return f"{kind} event of {where}"

    if not ev.settled:
        return f"the population descent did not settle within max_sweeps = {_check_sweeps(opts.max_sweeps)} sweeps"
    if np.any(ev.undetermined):
        k = int(np.flatnonzero(ev.undetermined)[0])
        return f"population path not determined at this precision ({name(k)} changes sign on the independent sample)"
    zero = np.flatnonzero(ev.valid & ~(rates > 0))
    if zero.size:
        k = int(zero[0])
        j = int(ev.coord[k])
        at_zero = float(ravel_pytree(theta_star)[0][j]) == 0.0
        note = ""
        if at_zero:
            note = f" ({labels[j]} = 0 in the population: its release is a coin flip at every n, theory.md section 8)"
        return f"{name(k)} has a gap <= 0: a tie or a coordinate on its threshold{note}"
    return None


def _kind_name(code) -> str:
    return EVENT_KINDS[int(code)]
