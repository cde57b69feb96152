"""Benchmarks of the replicate engine, per the performance protocol of the design document.

    python benchmarks/run.py [--quick] [--out FILE] [--only NAME[,NAME...]] [--no-baselines]

Prints one JSON line per workload (and appends it to ``--out``): the workload, replicate count, median seconds over
>= 3 timed runs after a warm-up (compile time apart), models per second, the FLOPs counted for the useful work and
the achieved GFLOP/s, the float32 matmul peak measured in the same run, every baseline's seconds measured in the same
run, and the speedups (baseline seconds / our seconds). Correctness is checked before anything is timed.

The sequential baselines run the library's own single-replicate program one replicate at a time: the same public
call with ``chunk_size=1``, which jits the program once and loops over replicates in Python. ``memory`` measures the
peak resident memory of each workload in a fresh process at ``R`` and ``4 R`` replicates.

Workloads are plain functions in ``WORKLOADS``; add one with the ``@workload`` decorator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qmis_jax.problems import logistic_mixture, mlp_mixture  # noqa: E402
from qmis_jax.train import fit, fit_data, fit_fresh, replicate_data  # noqa: E402

WORKLOADS: list[tuple[str, Callable[[argparse.Namespace, float], dict]]] = []
SUBSET = 32  # models timed for the one-model-at-a-time baselines, extrapolated linearly to R
TORCH_SUBSET = 8  # models timed for the torch baselines (each timed run of the torch loop takes seconds)


def workload(name: str):
    """Register ``fn(args, peak_gflops) -> dict`` as a workload called ``name``."""

    def register(fn):
        WORKLOADS.append((name, fn))
        return fn

    return register


def timed(fn: Callable[[], object], repeats: int = 3, first: float | None = None) -> tuple[float, float]:
    """``(median seconds, compile seconds)`` over ``repeats`` timed runs after a warm-up call.

    ``first`` is the duration of a warm-up call already made (compile + one run); without it one is made here.
    Compile seconds are the warm-up's excess over the median.
    """
    if first is None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    median = statistics.median(runs)
    return median, max(first - median, 0.0)


def first_call(fn: Callable[[], object]):
    """``(result, seconds)`` of the warm-up call (compilation included)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def matmul_peak(size: int = 4096) -> float:
    """Measured float32 matmul throughput (GFLOP/s): median of 3 runs of a ``size x size`` product."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    seconds, _ = timed(lambda: f(a))
    return 2 * size**3 / seconds / 1e9


def peak_memory_mb() -> float:
    """Peak memory so far: device ``peak_bytes_in_use`` where reported (GPU), else the process's max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(name, replicates, seconds, compile_seconds, flops, peak, baselines, **extra) -> dict:
    return {
        "workload": name,
        "replicates": replicates,
        "seconds": round(seconds, 4),
        "compile_seconds": round(compile_seconds, 3),
        "models_per_s": round(replicates / seconds, 2),
        "gflops": round(flops / seconds / 1e9, 2),
        "peak_gflops": round(peak, 2),
        "baselines": {k: round(v, 4) for k, v in baselines.items()},
        "speedup": {k: round(v / seconds, 2) for k, v in baselines.items()},
        **extra,
    }


def glm_flops(n: int, p: int, steps: np.ndarray, *, solver: str = "glm_lbfgs", features: bool = False) -> float:
    """FLOPs of the useful iterations. L-BFGS: two passes over the design per iteration (``X d`` for the line
    search, ``X^T r`` for the gradient), ``4 n p``. Newton: the Hessian (``n p (p + 1)`` with the Khatri-Rao
    triangle, else ``2 n p^2``) plus five passes of ``2 n p``."""
    if solver == "glm_lbfgs":
        return float(np.sum(steps)) * 4 * n * p
    hess = n * p * (p + 1) if features else 2 * n * p * p
    return float(np.sum(steps)) * (hess + 10 * n * p)


def mlp_flops(n: int, d: int, h: int, steps: int, replicates: int) -> float:
    """FLOPs of full-batch training: forward ``2 n (d h + h)``, backward ``2 n d h`` (kernel) + ``4 n h``."""
    return float(replicates) * steps * (4 * n * d * h + 8 * n * h)


def _sklearn_fit(x, y, tol):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = LogisticRegression(C=np.inf, tol=tol, max_iter=10000).fit(x, y)
    return np.r_[m.intercept_, m.coef_[0]]


def _mean_logistic_loss(theta, x, y):
    return float(np.mean(np.logaddexp(0.0, -(2 * y - 1) * (theta[0] + x @ theta[1:]))))


def side_by_side(ours: Callable[[], object], baselines: dict, repeats: int = 3) -> tuple[float, dict[str, float]]:
    """Median seconds of ``ours`` and of every baseline, timed in rounds (ours, then each baseline, ``repeats``
    times) after one warm-up of each, so that load from other processes drifts over all of them alike.

    ``baselines`` maps a name to ``(fn, scale)``: the baseline's time is its median times ``scale`` (the
    extrapolation from the ``SUBSET`` replicates it runs to the workload's count).
    """
    for fn, _ in baselines.values():
        jax.block_until_ready(fn())
    runs = {name: [] for name in ["ours", *baselines]}
    calls = {"ours": ours, **{name: fn for name, (fn, _) in baselines.items()}}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            runs[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(v) for name, v in runs.items()}
    return median.pop("ours"), {name: median[name] * scale for name, (_, scale) in baselines.items()}


def _sklearn_loop(xs, ys, tol, threads=None):
    """sklearn's L-BFGS over the given data sets, one at a time; ``threads`` limits its BLAS and OpenMP pools
    (None: their defaults)."""
    from threadpoolctl import threadpool_limits

    def loop():
        with threadpool_limits(limits=threads):
            return [_sklearn_fit(xs[i], ys[i], tol) for i in range(xs.shape[0])]

    return loop


def _check_logistic(params, xs, ys, tol, label):
    """Before timing: each subset replicate's mean training loss equals sklearn's optimum within 1e-5."""
    worst = 0.0
    for i in range(xs.shape[0]):
        ours = np.r_[np.asarray(params["b"][i], np.float64), np.asarray(params["w"][i, :, 0], np.float64)]
        ref = _sklearn_fit(xs[i], ys[i], 1e-10)
        worst = max(worst, abs(_mean_logistic_loss(ours, xs[i], ys[i]) - _mean_logistic_loss(ref, xs[i], ys[i])))
    if worst > 1e-5:
        raise AssertionError(f"{label}: mean training loss differs from sklearn's by {worst:.2e} > 1e-5")
    return worst


@workload("logistic_d128")
def logistic_fresh(args, peak):
    """Fresh-data design: replicate i trains on its own n = 1000 points (generated inside the compiled program)."""
    problem, n, tol = logistic_mixture(dim=128), 1000, 1e-5
    replicates = 1024
    key = jax.random.key(0)
    run = lambda: fit_fresh(key, problem, n=n, replicates=replicates, tol=tol)
    res, first = first_call(run)
    xs, ys = (np.asarray(a, np.float64) for a in replicate_data(key, problem, n=n, index=np.arange(SUBSET)))
    worst = _check_logistic(jax.tree.map(lambda a: a[:SUBSET], res.params), xs, ys, tol, "logistic_d128")
    one = lambda m, solver="auto": fit_fresh(key, problem, n=n, replicates=m, tol=tol, chunk_size=1, solver=solver)
    x32, y32, scale = xs.astype(np.float32), ys.astype(np.float32), replicates / SUBSET
    baselines = {
        "sklearn_loop": (_sklearn_loop(x32, y32, tol), scale),
        "sklearn_loop_1_thread": (_sklearn_loop(x32, y32, tol, threads=1), scale),
        "sequential_jax": (lambda: one(SUBSET), scale),
        "sequential_jax_newton": (lambda: one(SUBSET, "glm_newton"), scale),
    }
    skip = args.no_baselines
    seconds, baselines = side_by_side(run, {} if skip else baselines)
    compile_s = max(first - seconds, 0.0)
    gen = lambda: replicate_data(key, problem, n=n, index=np.arange(128))  # 128 data sets, extrapolated
    data_s = timed(gen)[0] * replicates / 128 if not skip else float("nan")
    flops = glm_flops(n, 129, np.asarray(res.steps))
    return record(
        "logistic_d128", replicates, seconds, compile_s, flops, peak, baselines,
        design="fresh data per replicate: generation inside our program and the sequential ones, not sklearn's",
        data_generation_seconds=round(data_s, 4),
        **_glm_fit_fields(res, n=n, tol=tol), max_loss_gap_vs_sklearn=worst,
        baseline_note=f"baselines timed on {SUBSET} replicates and extrapolated linearly to {replicates}; "
        "sequential_jax is fit_fresh with chunk_size=1 (the same program, one replicate per call), "
        "sequential_jax_newton the same with solver='glm_newton'",
    )  # fmt: skip


def _glm_fit_fields(res, *, n, tol):
    """What the logistic workloads record of their fit: sizes, solver, iterations and convergence."""
    steps = np.asarray(res.steps)
    return {
        "n": n, "dim": 128, "tol": tol, "solver": "glm_lbfgs", "iterations_mean": float(np.mean(steps)),
        "iterations_max": int(np.max(steps)), "converged": float(np.mean(res.converged)),
    }  # fmt: skip


def _pool(replicates, n, seed=0):
    """The shared pool of 2n points and ``replicates`` random halves of it as 0/1 membership weights."""
    problem = logistic_mixture(dim=128)
    x, y = jax.jit(problem.sample, static_argnums=1)(jax.random.key(1), 2 * n)
    rng = np.random.default_rng(seed)
    weights = np.zeros((replicates, 2 * n), np.float32)
    for r in range(replicates):
        weights[r, rng.choice(2 * n, n, replace=False)] = 1.0
    return problem, x, y, weights


@workload("logistic_d128_pool")
def logistic_pool(args, peak):
    """Shared-pool design: a pool of 2n points, each replicate trains on a random half (0/1 membership weights)."""
    n, tol = 1000, 1e-5
    replicates = 1024
    problem, x, y, weights = _pool(replicates, n)
    key = jax.random.key(0)
    run = lambda: fit(key, problem, x, y, weights=weights, tol=tol)
    res, first = first_call(run)
    xh, yh = np.asarray(x, np.float64), np.asarray(y, np.float64)
    member = weights[:SUBSET] > 0
    xs = np.stack([xh[m] for m in member])
    ys = np.stack([yh[m] for m in member])
    worst = _check_logistic(jax.tree.map(lambda a: a[:SUBSET], res.params), xs, ys, tol, "logistic_d128_pool")
    one = lambda m: fit(key, problem, x, y, weights=weights[:m], tol=tol, chunk_size=1)
    x32, y32, scale = xs.astype(np.float32), ys.astype(np.float32), replicates / SUBSET
    baselines = {
        "sklearn_loop": (_sklearn_loop(x32, y32, tol), scale),
        "sklearn_loop_1_thread": (_sklearn_loop(x32, y32, tol, threads=1), scale),
        "sequential_jax": (lambda: one(SUBSET), scale),
    }
    skip = args.no_baselines
    seconds, baselines = side_by_side(run, {} if skip else baselines)
    compile_s = max(first - seconds, 0.0)
    flops = glm_flops(2 * n, 129, np.asarray(res.steps))
    return record(
        "logistic_d128_pool", replicates, seconds, compile_s, flops, peak, baselines,
        design="pool of 2n = 2000, each replicate's n = 1000 members by 0/1 weights (baselines fit the members)",
        **_glm_fit_fields(res, n=n, tol=tol), max_loss_gap_vs_sklearn=worst,
        baseline_note=f"baselines timed on {SUBSET} replicates and extrapolated linearly to {replicates}; "
        "sequential_jax is fit with chunk_size=1 (the same program, one replicate per call, the shared pilot "
        "included)",
    )  # fmt: skip


def _torch_baselines(xs, ys, hidden, steps, lr, replicates):
    """torch loop and torch.func vmap baselines ``{name: (fn, scale)}``, only when torch is importable."""
    try:
        import torch
        from torch.func import functional_call, grad, vmap
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    m, n, d = xs.shape
    xt, yt = torch.tensor(xs), torch.tensor(ys)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def loss_fn(out, y):
        return torch.nn.functional.binary_cross_entropy_with_logits(out[..., 0], y)

    def loop():
        for i in range(m):
            net = make()
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                loss_fn(net(xt[i]), yt[i]).backward()
                opt.step()

    def vmapped():
        net = make()
        params = {k: v.detach().expand(m, *v.shape).clone() for k, v in net.named_parameters()}
        state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
        g = vmap(grad(lambda p, x, y: loss_fn(functional_call(net, p, (x,)), y)))
        for t in range(1, steps + 1):
            grads = g(params, xt, yt)
            for k in params:
                mo, ve = state[k]
                mo.mul_(0.9).add_(grads[k], alpha=0.1)
                ve.mul_(0.999).addcmul_(grads[k], grads[k], value=0.001)
                params[k] -= lr * (mo / (1 - 0.9**t)) / ((ve / (1 - 0.999**t)).sqrt() + 1e-8)

    default = torch.get_num_threads()

    def threads(fn, k):
        def call():
            torch.set_num_threads(k)
            try:
                return fn()
            finally:
                torch.set_num_threads(default)

        return call

    scale = replicates / m
    return {
        "torch_loop": (loop, scale),
        "torch_vmap": (vmapped, scale),
        "torch_loop_1_thread": (threads(loop, 1), scale),
        "torch_vmap_1_thread": (threads(vmapped, 1), scale),
    }


@workload("mlp_d128")
def mlp(args, peak):
    """One-hidden-layer MLP (hidden 32), fresh data n = 1000 per replicate, fixed full-batch Adam steps."""
    hidden, n, lr = 32, 1000, 1e-2
    steps = 100 if args.quick else 300
    replicates = 256 if args.quick else 1024
    problem = mlp_mixture(dim=128, hidden=hidden)
    key = jax.random.key(0)
    run = lambda: fit_fresh(key, problem, n=n, replicates=replicates, max_steps=steps)
    res, first = first_call(run)
    one = lambda m: fit_fresh(key, problem, n=n, replicates=m, max_steps=steps, chunk_size=1)
    # Correctness before timing: one replicate per call reproduces our replicates (float32 rounding apart).
    flat = lambda params: np.concatenate([np.asarray(a).reshape(a.shape[0], -1) for a in jax.tree.leaves(params)], 1)
    seq_params = one(SUBSET).params
    gap = float(np.max(np.abs(flat(jax.tree.map(lambda a: a[:SUBSET], res.params)) - flat(seq_params))))
    if gap > 1e-3:
        raise AssertionError(f"mlp_d128: batched and sequential parameters differ by {gap:.2e}")
    skip = args.no_baselines
    baselines = {"sequential_jax": (lambda: one(SUBSET), replicates / SUBSET)}
    if not skip:
        xs, ys = replicate_data(key, problem, n=n, index=np.arange(SUBSET))
        torch_xs, torch_ys = np.asarray(xs)[:TORCH_SUBSET], np.asarray(ys)[:TORCH_SUBSET]
        baselines.update(_torch_baselines(torch_xs, torch_ys, hidden, steps, lr, replicates))
    seconds, baselines = side_by_side(run, {} if skip else baselines)
    compile_s = max(first - seconds, 0.0)
    flops = mlp_flops(n, 128, hidden, steps, replicates)
    return record(
        "mlp_d128", replicates, seconds, compile_s, flops, peak, baselines,
        n=n, dim=128, hidden=hidden, adam_steps=steps, max_param_gap_vs_sequential=gap,
        torch=_torch_version(),
        baseline_note=f"baselines timed on {SUBSET} replicates (torch: {TORCH_SUBSET}) and extrapolated linearly to "
        f"{replicates}; sequential_jax is fit_fresh with chunk_size=1 (the same program, data generation "
        "included); the torch baselines get their data given (no generation)",
    )  # fmt: skip


def _torch_version() -> str:
    try:
        import torch
    except ImportError:
        return "not installed: torch baselines skipped"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def training_of_audit(key, problem, *, n: int, replicates: int) -> dict[str, float]:
    """Warm seconds of every training the audit does, each by the same public call: the fresh-data replicates,
    the swap retraining and the embedded-target replicates (``replicates`` data sets each, trained by ``fit_data``)
    and ``theta*`` (one model on ``max(100 n, 20000)`` fresh points)."""
    x, y = replicate_data(key, problem, n=n, index=np.arange(replicates))
    xs, ys = problem.sample(jax.random.fold_in(key, 1), max(100 * n, 20_000))
    fresh, _ = timed(lambda: fit_fresh(key, problem, n=n, replicates=replicates, tol=1e-6).params)
    on_data, _ = timed(lambda: fit_data(key, problem, x, y, tol=1e-6).params)
    star, _ = timed(lambda: fit_data(key, problem, xs[None], ys[None], tol=1e-6).params)
    return {"fresh": fresh, "swap": on_data, "embedded_target": on_data, "theta_star": star}


@workload("audit")
def audit_workload(args, peak):
    """The whole audit (training, population, statistics with the swap coupling, LOSS and LiRA) of logistic
    d = 128, n = 1000 and the 12 design presets, against every training it does. Both warm (compiled before)."""
    import qmis_jax as qj

    problem, n = logistic_mixture(dim=128), 1000
    replicates = 128 if args.quick else 1024
    names = qj.quantizers.names()[:12]
    key = jax.random.key(0)
    stages: dict[str, float] = {}
    clock = [0.0]

    def progress(stage, done):
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    def run_audit():
        clock[0] = time.perf_counter()
        return qj.audit(key, problem, names, n=n, replicates=replicates, progress=progress)

    report, first = first_call(run_audit)
    entries = report.quantizers
    if sorted(entries) != sorted(names) or entries["fp32"]["r_population"] != 0.0 or len(report.ranking) != 12:
        raise AssertionError("audit: the report lacks quantizers, or fp32 has r != 0")
    stages.clear()
    seconds, compile_s = timed(run_audit, first=first)
    per_run = {k: round(v / 3, 2) for k, v in stages.items()}
    training = training_of_audit(key, problem, n=n, replicates=replicates)
    train_s = sum(training.values())
    out = record("audit", replicates, seconds, compile_s, 0.0, peak, {"training_alone": train_s})
    out.update(
        n=n,
        dim=128,
        quantizers=list(names),
        audit_over_training=round(seconds / train_s, 2),
        training_seconds={k: round(v, 3) for k, v in training.items()},
        stage_seconds=per_run,
        note="training_alone is every model the audit trains: R fresh-data replicates, R swap retrainings, "
        "R embedded-target replicates and theta*; the audit also runs each quantizer's PTQ and indicator on 2R + R "
        "models",
    )
    return out


def exp_log1p_peak(size: int = 1 << 24) -> float:
    """Measured elements per second of ``log1p(exp(-|x|))`` on float32, the two transcendental calls of one
    logistic loss: the best of two layouts (one long row; 64 rows, which XLA may spread over the CPU threads),
    each the median of 3 runs. The anchor of a transcendental-bound kernel, as the matmul peak is for products."""
    x = jax.random.normal(jax.random.key(1), (size,), jnp.float32)
    f = jax.jit(lambda v: jnp.log1p(jnp.exp(-jnp.abs(v))))
    best = min(timed(lambda a=a: f(a))[0] for a in (x, x.reshape(64, -1)))
    return size / best


@workload("sweep")
def sweep_workload(args, peak):
    """The audit's loss-PTQ sweeps alone: int4 releases of 128 trained logistic models (d = 128, so p = 129
    coordinates, n = 1000 points each), against the machine's exp+log1p throughput measured in the same run.
    The work counted is that of an exact, unscreened sweep: 2 p n losses (one exp, one log1p each) per model per
    sweep run, the last sweep (the one that moves nothing) included; screening that skips losses counts as speed."""
    from qmis_jax.indicator.ptq import descent_path_batched, ptq_loss_batched

    problem, n, models, q = logistic_mixture(dim=128), 1000, 128, "int4"
    key = jax.random.key(0)
    params = fit_fresh(key, problem, n=n, replicates=models, tol=1e-6).params
    x, y = replicate_data(key, problem, n=n, index=np.arange(models))
    glm = dict(design=problem.design, margin_loss=problem.margin_loss, penalty=problem.penalty)
    run = lambda: ptq_loss_batched(q, problem.loss, params, x, y, **glm)[0]
    _, first = first_call(run)
    seconds, compile_s = timed(run, first=first)
    path = descent_path_batched(q, problem.loss, params, x, y, **glm)
    sweeps = np.asarray(path.sweeps)
    p = int(path.release.shape[-1])
    losses = 2 * p * n * int(sweeps.sum())
    rate = exp_log1p_peak()
    return record(
        "sweep", models, seconds, compile_s, 0.0, peak, {},
        quantizer=q, n=n, p=p, sweeps_per_model={"mean": round(float(sweeps.mean()), 2), "max": int(sweeps.max())},
        losses_per_s=round(losses / seconds, 1), exp_log1p_per_s=round(rate, 1),
        fraction_of_exp_log1p_peak=round(losses / seconds / rate, 4),
        note="losses counted for an exact, unscreened sweep (2 p n per model per sweep run); exp_log1p_per_s "
        "measured in this run on float32 (best of a flat and a 64-row layout)",
    )  # fmt: skip


@workload("scaling")
def scaling(args, peak):
    """Models/s and peak memory of the shared-pool logistic workload as the replicate count grows."""
    problem, n, tol = logistic_mixture(dim=128), 1000, 1e-5
    counts = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096]
    x, y = jax.jit(problem.sample, static_argnums=1)(jax.random.key(1), 2 * n)
    rng = np.random.default_rng(0)
    sweep = []
    for replicates in counts:
        weights = (rng.random((replicates, 2 * n)) < 0.5).astype(np.float32)
        run = lambda weights=weights: fit(jax.random.key(0), problem, x, y, weights=weights, tol=tol)
        res, first = first_call(run)
        seconds, compile_s = timed(run, first=first)
        flops = glm_flops(2 * n, 129, np.asarray(res.steps))
        sweep.append(
            {
                "replicates": replicates,
                "seconds": round(seconds, 4),
                "compile_seconds": round(compile_s, 3),
                "models_per_s": round(replicates / seconds, 2),
                "gflops": round(flops / seconds / 1e9, 2),
                "peak_memory_mb": round(peak_memory_mb(), 1),
            }
        )
    last = sweep[-1]
    out = record("scaling", last["replicates"], last["seconds"], last["compile_seconds"], 0.0, peak, {})
    out["gflops"] = last["gflops"]
    out["sweep"] = sweep
    out["memory_note"] = "device peak bytes in use where reported, else the process's max RSS (monotone)"
    return out


_MEMORY_CHILD = """
import resource, sys, jax, numpy as np
sys.path.insert(0, sys.argv[3])
import run as bench
from qmis_jax.problems import mlp_mixture
from qmis_jax.train import fit, fit_fresh
kind, replicates = sys.argv[1], int(sys.argv[2])
key = jax.random.key(0)
if kind == "logistic_d128":
    out = fit_fresh(key, bench.logistic_mixture(dim=128), n=1000, replicates=replicates, tol=1e-5)
elif kind == "logistic_d128_pool":
    problem, x, y, weights = bench._pool(replicates, 1000)
    out = fit(key, problem, x, y, weights=weights, tol=1e-5)
else:
    out = fit_fresh(key, mlp_mixture(dim=128, hidden=32), n=1000, replicates=replicates, max_steps=100)
jax.block_until_ready(out)
# VmHWM: this process's own peak (ru_maxrss on Linux keeps the parent's peak at fork across exec).
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print(int(hwm) / 1024)
except (OSError, IndexError):
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@workload("memory")
def memory(args, peak):
    """Peak resident memory (MiB) of each training workload, each in its own fresh process, at ``R`` and ``4 R``
    replicates: chunking bounds the working set, so the ``4 R`` run should stay within 10% of the ``R`` run."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    sizes = {"logistic_d128": 256, "logistic_d128_pool": 256, "mlp_d128": 64}
    rows = {}
    for kind, base in sizes.items():
        mib = {}
        for replicates in (base, 4 * base):
            cmd = [sys.executable, "-c", _MEMORY_CHILD, kind, str(replicates), here]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            mib[replicates] = float(done.stdout.strip().splitlines()[-1])
        rows[kind] = {
            "replicates": [base, 4 * base],
            "peak_rss_mib": [round(mib[base], 1), round(mib[4 * base], 1)],
            "ratio_4r_over_r": round(mib[4 * base] / mib[base], 3),
        }
    out = record("memory", 0, 1.0, 0.0, 0.0, peak, {})
    for key in ("seconds", "models_per_s", "gflops", "compile_seconds"):
        out.pop(key)
    out["workloads"] = rows
    out["within_10_percent"] = all(r["ratio_4r_over_r"] <= 1.10 for r in rows.values())
    out["memory_note"] = "peak RSS (VmHWM) of a fresh process (JAX runtime and compiled programs included), CPU"
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller MLP and scaling sweep (< 10 min on 2 CPUs)")
    parser.add_argument("--out", help="append the JSON lines to this file")
    parser.add_argument("--only", help="comma-separated workload names")
    parser.add_argument(
        "--no-baselines", action="store_true", help="time our runs only (correctness is still checked first)"
    )
    args = parser.parse_args(argv)
    names = [name for name, _ in WORKLOADS]
    chosen = names if args.only is None else args.only.split(",")
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise KeyError(f"unknown workloads {unknown}; valid: {names}")
    peak = matmul_peak()
    device = f"{jax.devices()[0].device_kind} x{jax.local_device_count()} ({jax.default_backend()})"
    for name, fn in WORKLOADS:
        if name not in chosen:
            continue
        result = fn(args, peak)
        result["device"] = device
        result["cpus"] = os.cpu_count()
        result["python"] = platform.python_version()
        result["jax"] = jax.__version__
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
