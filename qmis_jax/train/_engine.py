"""The replicate engine: one replicate's training program, vmapped, chunked and sharded over local devices.

Replicate ``i`` depends only on ``(key, i)`` and its own weights, never on the chunking or on which other
replicates share its batch, so results are reproducible whatever ``chunk_size`` or device count (theory.md
section 6's population study trains thousands of them). A call's key is split once into named subkeys
(:func:`training_keys`), each with one use: replicate ``i``'s data set comes from ``fold_in(data, i)``, its
initialisation and minibatches from ``init`` and ``batch``, the GLM pilot from ``pilot``, so no replicate's data
key can equal a key used for anything else.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qmis_jax._loops import compacting_while
from qmis_jax._memory import check_budget, replicate_bytes
from qmis_jax.problems._base import Problem

from . import _options, _solvers
from ._options import FitOptions, fit_options
from ._result import FitResult
from ._validate import (
    check_data,
    check_fits_model,
    check_key,
    check_positive_int,
    check_problem,
    check_weights,
)

Array = jax.Array
PyTree = Any

DEFAULT_MEMORY_BUDGET = 2 * 2**30
FEATURES_MAX_BYTES = 2**30
CPU_CHUNK_CAP = 256


def _default_budget(devices) -> int:
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # some backends do not report memory
        stats = {}
    limit = stats.get("bytes_limit")
    return int(0.4 * limit * len(devices)) if limit else DEFAULT_MEMORY_BUDGET


def _replicate_bytes(opts: FitOptions, **sizes) -> int:
    """One replicate's training memory by the package's memory model, with these solvers' sizes."""
    return replicate_bytes(
        solver=opts.solver, line_search_steps=_solvers.LINE_SEARCH_STEPS, qn_memory=_solvers.QN_MEMORY, **sizes
    )


class TrainingKeys(NamedTuple):
    """The subkeys ``split(key, 4)`` of one training call, each used for one purpose only.

    ``data``: replicate ``i`` of :func:`fit_fresh` trains on ``problem.sample(fold_in(data, i), n)`` (and
    :func:`replicate_data` regenerates it); ``init``: the shared initialisation ``problem.init(init)`` (replicate
    ``i`` starts from ``problem.init(fold_in(init, i))`` when ``shared_init=False``); ``batch``: replicate ``i``'s
    minibatches are drawn with ``fold_in(batch, i)``; ``pilot``: the pilot sample of :func:`fit_fresh`'s
    ``"glm_lbfgs"`` solver. Since the data keys descend from ``data`` alone, a replicate's data are independent of
    every initialisation, minibatch and pilot key, whatever the replicate count (theory.md sections 7, 8).
    """

    data: Array
    init: Array
    batch: Array
    pilot: Array


def training_keys(key: Array) -> TrainingKeys:
    """The named subkeys ``data, init, batch, pilot = split(key, 4)`` of :func:`fit`, :func:`fit_fresh`,
    :func:`fit_data` and :func:`replicate_data` (:class:`TrainingKeys`).

    >>> import jax
    >>> keys = training_keys(jax.random.key(0))
    >>> keys._fields
    ('data', 'init', 'batch', 'pilot')
    """
    return TrainingKeys(*jax.random.split(key, 4))


PILOT_FACTOR = 4  # a fresh-data pilot sample holds PILOT_FACTOR * n points (at most PILOT_MAX, at least n)
PILOT_MAX = 65536
# Fresh-data replicates vmapped together inside a CPU chunk (their data stay in cache): few for the solvers that
# stop at a tolerance (a vmapped loop waits for its slowest member), more for fixed optimizer steps.
CPU_MICROBATCH = 4
CPU_MICROBATCH_FIXED_STEPS = 8


def _glm_solve(problem, solver, max_steps, theta0, design, y, w, features, precond, tol):
    """One replicate's GLM fit: L-BFGS preconditioned by the shared ``precond``, else (``glm_newton``, or no pilot
    as in :func:`fit_data`) damped Newton."""
    if solver == "glm_lbfgs" and precond is not None:
        return _solvers.glm_lbfgs(
            theta0, design, y, w, margin_loss=problem.margin_loss, precond=precond, tol=tol, max_steps=max_steps
        )
    return _solvers.glm_newton(
        theta0, design, y, w, margin_loss=problem.margin_loss, features=features, tol=tol, max_steps=max_steps
    )


@functools.lru_cache(maxsize=64)
def _pilot_program(problem, solver, fresh, n, max_steps, warm_start):
    """The jitted pilot of one configuration: ``(start, precond)`` shared by every replicate (None where unused).

    Shared pool: the fit of the whole pool with unit weights (``warm_start``: where replicates start) and, for
    ``glm_lbfgs``, the inverse of its Hessian (the preconditioner). Fresh data (``glm_lbfgs`` only): the same on a
    pilot sample of ``min(PILOT_FACTOR n, PILOT_MAX)`` points drawn from ``training_keys(key).pilot`` (the program
    takes that subkey), a key no replicate uses. The pilot depends only on the key and the configuration, never on
    a replicate or a chunk.
    """
    lbfgs = solver == "glm_lbfgs"
    newton_steps = max(max_steps, _options.DEFAULT_NEWTON_STEPS) if lbfgs else max_steps

    def fit_pilot(theta0, x, y, design, features, params0, tol):
        ones = jnp.ones_like(y)
        if solver == "newton":
            unravel = ravel_pytree(params0)[1]
            sol = _solvers.generic_newton(unravel(theta0), problem.batch_loss, x, y, ones, tol=tol, max_steps=max_steps)
            return sol.params, None
        theta0 = theta0.astype(design.dtype)
        sol = _solvers.glm_newton(
            theta0, design, y, ones, margin_loss=problem.margin_loss, features=features, tol=tol,
            max_steps=newton_steps,
        )  # fmt: skip
        precond = None
        if lbfgs:
            hess = _solvers.glm_parts(design, y, ones, problem.margin_loss, features).hessian(sol.params)
            precond = _solvers.inverse_hessian(hess)
        return sol.params, precond

    if fresh:

        def pilot_fresh(k_pilot, params0, tol):
            if not lbfgs:
                return None, None
            size = min(max(PILOT_FACTOR * n, 1), max(PILOT_MAX, n))
            x, y = problem.sample(k_pilot, size)
            theta0 = ravel_pytree(params0)[0]
            return fit_pilot(theta0, x, y, problem.design(x), None, params0, tol)

        return jax.jit(pilot_fresh)

    def pilot_pool(x, y, design, features, params0, tol):
        if solver not in ("glm_newton", "glm_lbfgs", "newton") or not (warm_start or lbfgs):
            return None, None
        start, precond = fit_pilot(ravel_pytree(params0)[0], x, y, design, features, params0, tol)
        return (start if warm_start else None), precond

    return jax.jit(pilot_pool)


class _Config(NamedTuple):
    """The static configuration of one replicate's training (hashable: a key of the program caches)."""

    problem: Problem
    solver: str
    max_steps: int
    optimizer: Any
    batch_size: int | None
    shared_init: bool


class _Shared(NamedTuple):
    """The inputs every replicate of a call shares, passed whole (a pytree) to the chunk programs.

    ``start`` and ``precond`` are the pilot's flat start and inverse Hessian (:func:`_pilot_program`), None where
    unused; ``params0`` is the shared initialisation (its structure also unravels every replicate's parameters).
    """

    params0: PyTree
    k_init: Array
    k_batch: Array
    tol: Array
    start: Array | None = None
    precond: Array | None = None


class _Data(NamedTuple):
    """One replicate's training data: ``(n, dx)`` inputs, ``(n,)`` targets and weights, and for GLMs the design
    and (``glm_newton`` on a shared pool) the Khatri-Rao features."""

    x: Array
    y: Array
    w: Array
    design: Array | None = None
    features: Array | None = None


def _config(problem, opts: FitOptions) -> _Config:
    return _Config(problem, opts.solver, opts.max_steps, opts.optimizer, opts.batch_size, opts.shared_init)


def _glm(cfg: _Config) -> bool:
    return cfg.solver in ("glm_newton", "glm_lbfgs")


def _own_data(cfg: _Config, x, y) -> _Data:
    """A replicate's own data set with unit weights (fresh or given data; no shared features)."""
    return _Data(x, y, jnp.ones_like(y), cfg.problem.design(x) if _glm(cfg) else None)


def _train_one(cfg: _Config, i, data: _Data, s: _Shared) -> _solvers.Solution:
    """Replicate ``i``'s fit (without a shared initialisation its start is ``init(fold_in(s.k_init, i))``; its
    minibatch key is ``fold_in(s.k_batch, i)``), parameters unravelled."""
    problem, solver, max_steps = cfg.problem, cfg.solver, cfg.max_steps
    x, y, w = data.x, data.y, data.w
    unravel = ravel_pytree(s.params0)[1]
    if solver == "closed_form":
        sol = _solvers.closed_form(problem.solve, problem.batch_loss, x, y, w, tol=s.tol)
        return sol._replace(params=unravel(sol.params))
    params0 = s.params0 if cfg.shared_init else problem.init(jax.random.fold_in(s.k_init, i))
    theta0 = ravel_pytree(params0)[0] if s.start is None else s.start
    if _glm(cfg):
        theta0 = theta0.astype(data.design.dtype)
        sol = _glm_solve(problem, solver, max_steps, theta0, data.design, y, w, data.features, s.precond, s.tol)
    elif solver == "newton":
        sol = _solvers.generic_newton(unravel(theta0), problem.batch_loss, x, y, w, tol=s.tol, max_steps=max_steps)
    else:
        sol = _solvers.optax_fixed_steps(
            jax.random.fold_in(s.k_batch, i),
            params0,
            problem.batch_loss,
            x,
            y,
            w,
            optimizer=cfg.optimizer,
            steps=max_steps,
            batch_size=cfg.batch_size,
            tol=s.tol,
        )
    return sol._replace(params=unravel(sol.params))


# One builder per design, each cached so chunks reuse one compilation. Work shared by every replicate (the pilot
# fit and preconditioner, :func:`_pilot_program`) is computed once per call and passed in (``_Shared``), so every
# replicate's result depends only on ``(key, i)`` and its own weights or data, whatever the chunking.


@functools.lru_cache(maxsize=64)
def _pool_program(cfg: _Config, ndev: int):
    """The jitted chunk ``(idx, w, pool, shared)`` of the shared-pool design: replicate ``i`` weights the pool
    (``_Data`` without weights) by its row of ``w``. On one device ``glm_lbfgs`` lets converged replicates leave
    the batch (``compacting_while``)."""
    if cfg.solver == "glm_lbfgs" and ndev == 1:
        return jax.jit(functools.partial(_pool_lbfgs, cfg))

    def chunk(idx, w, pool: _Data, s: _Shared):
        return jax.vmap(lambda i, wi: _train_one(cfg, i, pool._replace(w=wi), s))(idx, w)

    return jax.jit(chunk)


def _pool_lbfgs(cfg: _Config, idx, w, pool: _Data, s: _Shared):
    """_Shared-pool L-BFGS on one device: replicates that converge leave the batch (``compacting_while``)."""
    problem, design, y = cfg.problem, pool.design, pool.y
    unravel = ravel_pytree(s.params0)[1]
    kw = dict(tol=s.tol, max_steps=cfg.max_steps)

    def init(i, wi):
        p0 = s.params0 if cfg.shared_init else problem.init(jax.random.fold_in(s.k_init, i))
        theta0 = (ravel_pytree(p0)[0] if s.start is None else s.start).astype(design.dtype)
        return _solvers.glm_lbfgs_init(theta0, _solvers.glm_parts(design, y, wi, problem.margin_loss, None), **kw)

    def step(c):
        state, wi = c
        one = lambda st, wr: _solvers.glm_lbfgs_step(
            st, design, y, wr, margin_loss=problem.margin_loss, precond=s.precond, **kw
        )
        return jax.vmap(one)(state, wi), wi

    def refresh(state, wi):
        return _solvers.glm_lbfgs_refresh(state, _solvers.glm_parts(design, y, wi, problem.margin_loss, None), **kw)

    state = jax.vmap(init)(idx, w)
    for _ in range(2):  # as in glm_lbfgs: a second round where the exact gradient is still above tol
        state, _ = compacting_while(step, (state, w), lambda c: ~c[0].done)
        state = jax.vmap(refresh)(state, w)
    return _solvers.Solution(jax.vmap(unravel)(state.theta), state.gn, state.gn <= s.tol, state.step)


@functools.lru_cache(maxsize=64)
def _fresh_program(cfg: _Config, n: int, microbatch: int | None, ndev: int):
    """The jitted chunk ``(idx, k_data, shared)`` of the fresh-data design: replicate ``i`` trains on
    ``problem.sample(fold_in(k_data, i), n)`` (``k_data = training_keys(key).data``), generated inside the
    program. ``microbatch``: replicates are trained ``microbatch`` at a time with ``lax.map``, each generating its
    data inside the loop, so a replicate's data stay in cache while it trains (CPU), each of the ``ndev`` devices
    looping over its own share; None vmaps the whole chunk at once (accelerators)."""

    def chunk(idx, k_data, s: _Shared):
        def one(i):
            x, y = cfg.problem.sample(jax.random.fold_in(k_data, i.astype(jnp.uint32)), n)
            return _train_one(cfg, i, _own_data(cfg, x, y), s)

        if microbatch is None:
            return jax.vmap(one)(idx)
        rows = idx.reshape(ndev, -1)  # one row per device: the sharded axis stays a vmapped one
        out = jax.vmap(lambda row: jax.lax.map(one, row, batch_size=microbatch))(rows)
        return jax.tree.map(lambda a: a.reshape(idx.shape[0], *a.shape[2:]), out)

    return jax.jit(chunk)


@functools.lru_cache(maxsize=64)
def _data_program(cfg: _Config):
    """The jitted chunk ``(idx, x, y, shared)`` of given data sets: replicate ``i`` trains on its ``x[i]``,
    ``y[i]`` (no pilot: ``shared.start`` and ``shared.precond`` are None)."""

    def chunk(idx, x, y, s: _Shared):
        return jax.vmap(lambda i, xi, yi: _train_one(cfg, i, _own_data(cfg, xi, yi), s))(idx, x, y)

    return jax.jit(chunk)


def _plan(replicates: int, chunk_size, memory_budget, per_replicate: int, devices) -> int:
    """Replicates per compiled call: ``chunk_size``, else what the memory budget allows (at most ``CPU_CHUNK_CAP``
    per CPU device, where larger chunks gain nothing and lose cache locality), a multiple of the device count."""
    ndev = len(devices)
    if chunk_size is None:
        check_budget(memory_budget, per_replicate)
        budget = _default_budget(devices) if memory_budget is None else memory_budget
        chunk_size = max(1, budget // max(per_replicate, 1))
        if all(d.platform == "cpu" for d in devices):
            chunk_size = min(chunk_size, CPU_CHUNK_CAP * ndev)
    chunk = min(chunk_size, replicates)
    return -(-chunk // ndev) * ndev


def _init_params(problem, init_params, k_init):
    params0 = jax.jit(problem.init)(k_init) if init_params is None else init_params
    return jax.tree.map(jnp.asarray, params0)


def _start(key, problem, opts: FitOptions):
    """The subkeys of ``key`` (:func:`training_keys`) and the start every replicate shares (``init_params`` or
    ``problem.init(keys.init)``)."""
    keys = training_keys(key)
    return keys, _init_params(problem, opts.init_params, keys.init)


def _chunk(opts: FitOptions, replicates: int, per_replicate: int) -> int:
    """Replicates per compiled call for these options (:func:`_plan`)."""
    return _plan(replicates, opts.chunk_size, opts.memory_budget, per_replicate, opts.devices)


def _microbatch(opts: FitOptions) -> int | None:
    """Fresh-data replicates per ``lax.map`` step on CPU devices (None on accelerators: the chunk is vmapped)."""
    if not all(d.platform == "cpu" for d in opts.devices):
        return None
    return CPU_MICROBATCH_FIXED_STEPS if opts.solver == "optax" else CPU_MICROBATCH


def _pilot(problem, opts: FitOptions, fresh: bool, n: int, warm_start: bool, *args):
    """The shared ``(start, precond)`` of these options (:func:`_pilot_program`)."""
    return _pilot_program(problem, opts.solver, fresh, n, opts.max_steps, warm_start)(*args)


def _run(program, replicates, chunk, devices, per_rep, shared, offset: int = 0) -> FitResult:
    """Run ``program`` over replicate chunks; pad the last chunk with copies of its last replicate.

    Slicing and padding happen on host copies (NumPy), so no small eager programs are compiled per chunk shape.
    """
    mesh = Mesh(np.asarray(devices), ("replicates",))
    split, same = NamedSharding(mesh, P("replicates")), NamedSharding(mesh, P())
    shared = jax.device_put(shared, same)
    outs = []
    for start in range(0, replicates, chunk):
        idx = np.arange(start, min(start + chunk, replicates))
        idx = np.concatenate([idx, np.full(chunk - idx.size, idx[-1])]).astype(np.int32)
        args = [idx + np.int32(offset)] + [a[idx] for a in per_rep]
        outs.append(program(*jax.device_put(args, split), *shared))
    if len(outs) == 1 and chunk == replicates:
        sol = outs[0]
    else:
        sol = jax.tree.map(lambda *a: jnp.asarray(np.concatenate([np.asarray(b) for b in a])[:replicates]), *outs)
    return FitResult(sol.params, sol.grad_norm, sol.converged, sol.steps)


def fit(
    key: Array,
    problem: Problem,
    x: Array,
    y: Array,
    *,
    weights: Array,
    warm_start: bool = True,
    **training,
) -> FitResult:
    """Train ``R`` replicates on one shared pool, replicate ``r`` weighting example ``i`` by ``weights[r, i]``.

    Replicate ``r`` minimises the weighted empirical risk ``sum_i w_ri l(theta, z_i) / sum_i w_ri``
    (theory.md section 1; 0/1 weights give membership subsets, integer counts bootstrap resamples). Methods
    (``solver="auto"``): the problem's closed form ``solve``; for convex generalised linear models (``design`` and
    ``margin_loss``, ``"glm_lbfgs"``) L-BFGS started at the pilot fit of the whole pool with unit weights and
    preconditioned by the inverse of the pilot's Hessian, shared by every replicate, so no per-replicate Hessian is
    formed; vmapped over replicates the margins ``Theta @ X^T`` and gradients ``(W m') @ X`` are matrix-matrix
    products (``4 N p`` flops per replicate and iteration), and on one device replicates that converge leave the
    batch; ``"glm_newton"`` is damped Newton with the Hessians' upper triangles ``K^T (W m'')^T``, ``K`` the
    Khatri-Rao features of the pool (``O(N p^2)`` per iteration); damping is an Armijo backtracking line search;
    other convex problems: damped Newton with the autodiff Hessian;
    non-convex problems: exactly ``max_steps`` steps of ``optimizer`` (full batch, or minibatches of
    ``batch_size`` drawn in proportion to the weights), every replicate starting from one shared initialisation
    (theory.md section 8).

    Replicates run in chunks of ``chunk_size`` (or as many as ``memory_budget`` bytes allow, by a rough
    estimate), each chunk split over ``devices`` along a 1-D mesh. Replicate ``r`` uses only
    ``fold_in(k, r)`` of the subkeys ``k = init, batch`` of :func:`training_keys` and its weights, so its result
    does not depend on the chunking.

    Args:
      key: PRNG key (initialisation, minibatches).
      problem: the :class:`~qmis_jax.problems.Problem`.
      x: ``(N, dx)`` pool inputs. y: ``(N,)`` pool targets (0/1 for binary problems).
      weights: ``(R, N)`` non-negative weights, every row with a positive sum.
      warm_start: convex solvers start every replicate from the fit of the whole pool with unit weights
        (computed once per call, shared by all replicates), which saves about a third of the iterations.
      **training: the training options, each with its default (``TRAINING_DEFAULTS``; an unknown name is a
        ValueError):
      tol: gradient-norm tolerance (Euclidean norm of the gradient of the weighted mean loss).
      max_steps: Newton iteration cap (default 100) or the exact number of optimizer steps (default 500).
      chunk_size: replicates per compiled call (rounded up to a multiple of the device count).
      memory_budget: bytes per chunk, used when ``chunk_size`` is None (default: 40% of the devices' memory where
        reported, else 2 GiB); on CPU devices chunks are capped at 256 replicates per device. A budget smaller
        than one replicate's rough estimate is refused (ValueError).
      optimizer: optax optimizer of non-convex problems (default ``optax.adam(1e-2)``).
      batch_size: minibatch size of non-convex training (None: full batch).
      shared_init: one initialisation ``init(k_init)`` for all replicates (else ``init(fold_in(k_init, r))``),
        ``k_init = training_keys(key).init``.
      init_params: a start for every replicate, overriding ``problem.init``.
      solver: ``"auto"``, ``"closed_form"``, ``"glm_lbfgs"``, ``"glm_newton"``, ``"newton"`` or ``"optax"``.
      devices: devices to shard replicates over (default ``jax.local_devices()``).

    Returns:
      :class:`FitResult` with leading replicate axis ``R``.

    >>> import jax, jax.numpy as jnp
    >>> from qmis_jax.problems import gaussian_mean
    >>> x = jnp.array([[0.0], [1.0], [5.0]])
    >>> res = fit(jax.random.key(0), gaussian_mean(mu=0.0), x, jnp.zeros(3),
    ...           weights=jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    >>> res.params["mu"][:, 0].tolist()
    [0.5, 3.0]
    """
    opts = fit_options(key, problem, training)
    xh, _ = check_data(problem, x, y)
    wh = check_weights(weights, xh.shape[0])
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros(()).dtype
    x, y = x.astype(dtype), jnp.asarray(y, dtype)
    w = wh.astype(dtype)
    keys, params0 = _start(key, problem, opts)
    check_fits_model(problem, params0, x, y)
    p = ravel_pytree(params0)[0].size
    design = features = None
    if opts.solver in ("glm_newton", "glm_lbfgs"):
        design = problem.design(x)
        p = design.shape[1]
        # The Khatri-Rao features pay for per-replicate Newton Hessians only (L-BFGS forms none).
        if (
            opts.solver == "glm_newton"
            and design.shape[0] * p * (p + 1) // 2 * design.dtype.itemsize <= FEATURES_MAX_BYTES
        ):
            features = _solvers.triangle_features(design)
    sizes = dict(n=xh.shape[0], dx=xh.shape[1], p=p, itemsize=x.dtype.itemsize)
    per = _replicate_bytes(opts, **sizes, fresh=False, features=features is not None)
    chunk = _chunk(opts, wh.shape[0], per)
    program = _pool_program(_config(problem, opts), len(opts.devices))
    tol = jnp.asarray(opts.tol, x.dtype)
    start, precond = _pilot(problem, opts, False, 0, bool(warm_start), x, y, design, features, params0, tol)
    shared = _Shared(params0, keys.init, keys.batch, tol, start, precond)
    pool = _Data(x, y, None, design, features)
    return _run(program, wh.shape[0], chunk, opts.devices, [w], (pool, shared))


def fit_fresh(
    key: Array,
    problem: Problem,
    *,
    n: int,
    replicates: int,
    start: int = 0,
    **training,
) -> FitResult:
    """Train ``replicates`` models, replicate ``i`` on its own fresh data set ``problem.sample(fold_in(k_data, i), n)``.

    The fresh-data design of theory.md sections 6 and 7: each replicate's data are generated inside the compiled
    program (nothing ``(R, n, dx)``-sized is held outside a chunk) and can be regenerated with
    :func:`replicate_data`. Methods, chunking and sharding are those of :func:`fit` with unit weights, except that
    the GLM pilot (start and preconditioner of ``"glm_lbfgs"``) is fitted on a pilot sample of ``4 n`` points (at
    most 65536) drawn from ``k_pilot``, a key no replicate uses; on CPU devices replicates are trained a few at a
    time inside a chunk (``lax.map``), each generating its data in the loop so they stay in cache. The subkeys
    ``k_data, k_init, k_batch, k_pilot = split(key, 4)`` (:func:`training_keys`) each serve one purpose: data sets,
    initialisation, minibatches, pilot; so no replicate's data key ``fold_in(k_data, i)`` is ever an
    initialisation, minibatch or pilot key.

    Args:
      key: PRNG key. problem: the problem. n: examples per replicate. replicates: ``R``.
      start: number of the first replicate: replicates ``start .. start + R - 1`` are trained, so a long run can
        be cut into chunks (and resumed) with the same results.
      **training: the training options of :func:`fit` (``tol``, ``max_steps``, ``chunk_size``,
        ``memory_budget``, ``optimizer``, ``batch_size``, ``shared_init``, ``init_params``, ``solver``,
        ``devices``).

    Returns:
      :class:`FitResult` with leading replicate axis ``R``.

    >>> import jax
    >>> from qmis_jax.problems import gaussian_mean
    >>> res = fit_fresh(jax.random.key(0), gaussian_mean(mu=[1.0, 2.0]), n=100, replicates=3)
    >>> res.params["mu"].shape
    (3, 2)
    """
    opts = fit_options(key, problem, training, n=n, replicates=replicates, start=start)
    n, replicates = opts.n, opts.replicates
    keys, params0 = _start(key, problem, opts)
    x_shape = jax.eval_shape(lambda k: problem.sample(k, n), key)[0]
    dx = x_shape.shape[1] if len(x_shape.shape) == 2 else 1
    p = ravel_pytree(params0)[0].size
    if opts.solver in ("glm_newton", "glm_lbfgs"):
        p = jax.eval_shape(lambda k: problem.design(problem.sample(k, n)[0]), key).shape[1]
    itemsize = x_shape.dtype.itemsize
    per = _replicate_bytes(opts, n=n, dx=dx, p=p, itemsize=itemsize, fresh=True)
    chunk = _chunk(opts, replicates, per)
    program = _fresh_program(_config(problem, opts), n, _microbatch(opts), len(opts.devices))
    tol = jnp.asarray(opts.tol, x_shape.dtype)
    start, precond = _pilot(problem, opts, True, n, True, keys.pilot, params0, tol)
    shared = _Shared(params0, keys.init, keys.batch, tol, start, precond)
    return _run(program, replicates, chunk, opts.devices, [], (keys.data, shared), offset=opts.start)


def fit_data(
    key: Array,
    problem: Problem,
    x: Array,
    y: Array,
    *,
    start: int = 0,
    **training,
) -> FitResult:
    """Train ``R`` replicates on their own given data sets ``x[r]``, ``y[r]`` (one data set per replicate).

    The embedded-target design of theory.md section 7 builds such sets (a random half of fixed targets plus fresh
    points). Replicate ``r`` is numbered ``start + r``: its initialisation and minibatch keys are
    ``fold_in(k, start + r)`` of ``k = k_init, k_batch`` (:func:`training_keys`, the same subkeys as
    :func:`fit_fresh` with the same key), so a chunk trained alone equals the same replicates inside a larger
    call. Convex GLMs use damped Newton from the initialisation (no shared pilot).

    Args:
      key: PRNG key. problem: the problem.
      x: ``(R, n, dx)`` inputs. y: ``(R, n)`` targets.
      start: number of the first replicate.
      **training: the training options of :func:`fit` (``tol``, ``max_steps``, ``chunk_size``,
        ``memory_budget``, ``optimizer``, ``batch_size``, ``shared_init``, ``init_params``, ``solver``,
        ``devices``).

    Returns:
      :class:`FitResult` with leading replicate axis ``R``.
    """
    opts = fit_options(key, problem, training, start=start)
    xh, yh = np.asarray(x), np.asarray(y)
    if xh.ndim < 3 or yh.ndim != 2 or xh.shape[:2] != yh.shape:
        raise ValueError(f"x must be (R, n, dx) and y (R, n) with matching R and n, got {xh.shape} and {yh.shape}")
    if xh.shape[0] == 0:
        raise ValueError("x must hold at least one replicate (R >= 1)")
    for r in range(0, xh.shape[0], max(1, xh.shape[0] // 4)):  # spot-check labels and finiteness cheaply
        check_data(problem, xh[r], yh[r])
    if not (np.all(np.isfinite(xh)) and np.all(np.isfinite(yh))):
        raise ValueError("x and y must be finite (NaN or inf found)")
    keys, params0 = _start(key, problem, opts)
    check_fits_model(problem, params0, xh[0], yh[0])
    p = ravel_pytree(params0)[0].size + 1
    n, dx = xh.shape[1], int(np.prod(xh.shape[2:]))
    per = _replicate_bytes(opts, n=n, dx=dx, p=p, itemsize=xh.dtype.itemsize, fresh=True)
    chunk = _chunk(opts, xh.shape[0], per)
    program = _data_program(_config(problem, opts))
    shared = _Shared(params0, keys.init, keys.batch, jnp.asarray(opts.tol, xh.dtype))
    per_rep = [xh, yh.astype(xh.dtype)]
    return _run(program, xh.shape[0], chunk, opts.devices, per_rep, (shared,), offset=opts.start)


def replicate_data(key: Array, problem: Problem, *, n: int, index) -> tuple[Array, Array]:
    """Regenerate the data sets of :func:`fit_fresh`: replicate ``i`` is ``problem.sample(fold_in(k_data, i), n)``
    with ``k_data = training_keys(key).data``.

    Args:
      key: the key given to :func:`fit_fresh`. problem: the problem. n: examples per replicate.
      index: an int (one replicate) or an int array ``(m,)``.

    Returns:
      ``(x, y)``: ``(n, dx)``, ``(n,)`` for an int; stacked ``(m, n, dx)``, ``(m, n)`` for an array.
    """
    check_key(key)
    check_problem(problem)
    n = check_positive_int("n", n)
    idx = np.asarray(index)
    if not np.issubdtype(idx.dtype, np.integer) or idx.ndim > 1 or np.any(idx < 0):
        raise ValueError(f"index must be a non-negative int or 1-D int array, got {index!r}")
    return _replicate_data(problem, n, training_keys(key).data, jnp.asarray(idx, jnp.uint32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _replicate_data(problem, n, k_data, idx):
    one = lambda i: problem.sample(jax.random.fold_in(k_data, i), n)
    return one(idx) if idx.ndim == 0 else jax.lax.map(one, idx)
