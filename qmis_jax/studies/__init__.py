"""Studies people run: the synthetic study, the molecular study and the single-model audit of a saved model.

The ``run_*`` functions take the parsed command-line arguments of ``qmis`` and return the output directory.
"""

from __future__ import annotations

import argparse
import math
import os
import zipfile

import numpy as np

from qmis_jax.studies.store import MemoryStore, ResultStore, StoreError, config_hash, write_json

GIB = 2**30

__all__ = [
    "MemoryStore",
    "ResultStore",
    "StoreError",
    "config_hash",
    "run_audit_cli",
    "run_molecular",
    "run_synthetic",
]


def _budget(args) -> int:
    if not (args.memory_budget > 0 and math.isfinite(args.memory_budget)):
        raise ValueError(f"--memory-budget must be a positive number of GiB, got {args.memory_budget}")
    return int(args.memory_budget * GIB)


def run_synthetic(args: argparse.Namespace) -> str:
    from qmis_jax.studies import synthetic

    over = dict(
        n_values=args.n,
        replicates=args.replicates,
        models=args.models,
        quantizers=args.quantizers,
        dim=args.dim,
        k_modes=args.k_modes,
        seed=args.seed,
        ptq=args.ptq,
        method=args.method,
        memory_budget=_budget(args),
    )
    if args.quick:
        cfg = synthetic.SyntheticConfig.quick(**over)
    else:
        cfg = synthetic.SyntheticConfig(**{k: v for k, v in over.items() if v is not None})
    synthetic.run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return args.out


def run_molecular(args: argparse.Namespace) -> str:
    from qmis_jax.studies import molecular

    over = dict(
        dataset=args.dataset,
        featurizers=args.featurizers,
        heads=args.heads,
        task=args.task,
        quantizers=args.quantizers,
        replicates=args.replicates,
        seed=args.seed,
        memory_budget=_budget(args),
    )
    if args.quick:
        cfg = molecular.MolecularConfig.quick(**over)
    else:
        cfg = molecular.MolecularConfig(**{k: v for k, v in over.items() if v is not None})
    molecular.run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    return args.out


def load_npz(path: str, what: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Load named arrays from an ``.npz`` (no pickle), with one-line errors naming the file and the problem."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ValueError(f"{what} {path!r} lacks array(s) {missing}; it holds {list(npz.files)}")
            return {k: np.asarray(npz[k]) for k in npz.files}
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{what} {path!r} is not a readable .npz file ({err})") from None


def run_audit_cli(args: argparse.Namespace) -> str:
    """Single-model audit of a saved linear model: ``r_hat`` with interval and utility per quantizer."""
    import jax
    import jax.numpy as jnp

    from qmis_jax import problems, stats
    from qmis_jax.audit import environment, resolve_quantizers
    from qmis_jax.quantizers import names

    prm = load_npz(args.params, "--params", ("w", "b"))
    data = load_npz(args.data, "--data", ("x", "y"))
    x, y = data["x"], data["y"]
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"--data needs x of shape (n, d) and y of shape (n,), got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"--data {args.data!r} holds NaN or infinite values")
    d = x.shape[1]
    w = np.asarray(prm["w"], np.float32).reshape(d, 1) if prm["w"].size == d else None
    if w is None:
        raise ValueError(f"--params 'w' must hold d = {d} values (the data's width), got shape {prm['w'].shape}")
    params = {"b": jnp.asarray(np.asarray(prm["b"], np.float32).reshape(1)), "w": jnp.asarray(w)}
    if args.model == "logistic":
        if not np.all(np.isin(y, (0, 1))):
            raise ValueError("--data y must hold 0/1 labels for --model logistic")
        problem = problems.logistic_mixture(dim=d)
    else:
        problem = problems.linear_regression(dim=d)
    qs = resolve_quantizers(list(args.quantizers or names()))
    config = {
        "command": "audit",
        "params": os.path.abspath(args.params),
        "data": os.path.abspath(args.data),
        "model": args.model,
        "ptq": args.ptq,
        "method": args.method,
        "quantizers": list(qs),
    }
    store = ResultStore(args.out, config, resume=args.resume)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    test = load_npz(args.test_data, "--test-data", ("x", "y")) if args.test_data else None

    def compute():
        out = {}
        for j, (name, q) in enumerate(qs.items()):
            key = jax.random.fold_in(jax.random.key(args.seed), j) if q.stochastic else None
            s = stats.single_model_indicator(q, problem, params, xj, yj, ptq=args.ptq, method=args.method, key=key)
            mis = stats.mis_asymptotic(x.shape[0], s.delta, s.sigma, s.valid, continuous=bool(q.continuous))
            entry = {
                "r_hat": float(s.r_hat),
                "r_hat_interval": [float(v) for v in np.asarray(s.r_interval)],
                "mis_asymptotic": float(mis.mis),
                "continuous": bool(q.continuous),
                "ok": bool(s.ok),
                "n_moves": int(s.n_moves),
            }
            if test is not None:
                util = problems.utility(
                    problem, s.release, jnp.asarray(test["x"], jnp.float32), jnp.asarray(test["y"], jnp.float32)
                )
                entry["utility"] = {k: float(v) for k, v in util.items()}
            out[name] = entry
        return out

    entries = store.get_or_compute_json("single-audit", compute)
    ranking = sorted(entries, key=lambda nm: -entries[nm]["r_hat"])
    report = {
        "version": __import__("qmis_jax").__version__,
        "n": int(x.shape[0]),
        "replicates": 1,
        "problem": {"name": args.model, "dim": d},
        "config_hash": config_hash(config),
        "quantizers": entries,
        "ranking": ranking,
        "environment": environment(),
    }
    write_json(os.path.join(args.out, "report.json"), report)
    lines = [
        f"# Single-model audit of {args.params}",
        "",
        f"n = {x.shape[0]} training points, d = {d}, {args.ptq} PTQ, {args.method} rates.",
        "",
        "| quantizer | r_hat | interval | 1 - MIS (asymptotic) |",
        "|---|---:|---|---:|",
    ]
    for name in ranking:
        e = entries[name]
        lines.append(
            f"| {name} | {e['r_hat']:.4g} | [{e['r_hat_interval'][0]:.4g}, {e['r_hat_interval'][1]:.4g}] "
            f"| {1 - e['mis_asymptotic']:.4g} |"
        )
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return args.out
