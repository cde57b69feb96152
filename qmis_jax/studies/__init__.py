"""Studies people run: the synthetic study, the molecular study and the single-model audit of a saved model.

The ``run_*`` functions take the parsed command-line arguments of ``qmis`` and return the output directory.
"""

from __future__ import annotations

import argparse
import os
import zipfile

import numpy as np

from qmis_jax._memory import MIB, parse_bytes, replicate_bytes
from qmis_jax.store import MemoryStore, ResultStore, StoreError, config_hash, write_json

__all__ = [
    "MemoryStore",
    "ResultStore",
    "StoreError",
    "config_hash",
    "run_audit_cli",
    "run_study",
]


def _budget(args) -> int:
    budget = args.memory_budget
    if isinstance(budget, str):
        budget = parse_bytes(budget)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"--memory-budget must be a positive number of bytes, got {budget!r}")
    return budget


def _single_n(values) -> int | None:
    """The molecular study's one training-set size (``--n`` takes one value there)."""
    if values is None:
        return None
    if len(values) != 1:
        raise ValueError(f"--n takes one training-set size for the molecular study, got {len(values)}")
    return values[0]


# each study's own options, from the parsed arguments (the shared ones are added by run_study)
def _args(args: argparse.Namespace, *names: str) -> dict:
    return {name: getattr(args, name) for name in names}


_STUDY_OPTIONS = {
    "synthetic": lambda a: {
        "n_values": a.n,
        "validation": False if a.no_validation else None,
        **_args(a, "models", "dim", "k_modes", "ptq", "method"),
    },
    "molecular": lambda a: {"n": _single_n(a.n), **_args(a, "dataset", "featurizers", "heads", "task")},
}


def run_study(args: argparse.Namespace) -> str:
    """Run the study ``args.command`` (``qmis synthetic`` or ``qmis molecular``) into ``args.out``.

    The study's own options come from ``_STUDY_OPTIONS``; the shared ones (quantizers, replicates, seed, memory
    budget) are added here. With ``--quick`` they override the quick preset (which ignores the ones left None);
    otherwise options left None keep the configuration's defaults.
    """
    import importlib

    study = importlib.import_module(f"qmis_jax.studies.{args.command}")
    options = _STUDY_OPTIONS[args.command](args)
    options.update(quantizers=args.quantizers, replicates=args.replicates, seed=args.seed, memory_budget=_budget(args))
    config_cls = getattr(study, f"{args.command.capitalize()}Config")
    if args.quick:
        cfg = config_cls.quick(**options)
    else:
        cfg = config_cls(**{k: v for k, v in options.items() if v is not None})
    study.run(cfg, args.out, resume=args.resume, progress=not args.no_progress)
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


def _real(arr: np.ndarray, what: str) -> np.ndarray:
    """``arr`` if it holds finite real numbers, else a ValueError naming ``what``."""
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
        raise ValueError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or infinite values")
    return arr


def _audit_xy(data: dict[str, np.ndarray], flag: str, path: str, model: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``x (n, d)`` and ``y (n,)`` of a data file of ``qmis audit``."""
    x, y = data["x"], data["y"]
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{flag} needs x of shape (n, d), n >= 1, and y of shape (n,), got {x.shape} and {y.shape}")
    _real(x, f"{flag} {path!r} x")
    _real(y, f"{flag} {path!r} y")
    if model == "logistic" and not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"{flag} y must hold 0/1 labels for --model logistic")
    return x, y


def run_audit_cli(args: argparse.Namespace) -> str:
    """Single-model audit of a saved linear model: ``r_hat`` with interval and utility per quantizer."""
    import jax
    import jax.numpy as jnp

    from qmis_jax import problems
    from qmis_jax.audit import audit_model, resolve_quantizers
    from qmis_jax.audit.tables import single_model_table
    from qmis_jax.quantizers import names

    prm = load_npz(args.params, "--params", ("w", "b"))
    x, y = _audit_xy(load_npz(args.data, "--data", ("x", "y")), "--data", args.data, args.model)
    n, d = x.shape
    test = None
    if args.test_data:
        test = _audit_xy(load_npz(args.test_data, "--test-data", ("x", "y")), "--test-data", args.test_data, args.model)
        if test[0].shape[1] != d:
            raise ValueError(f"--test-data x has {test[0].shape[1]} columns, the training data (--data) {d}")
    w, b = (_real(prm[k], f"--params {args.params!r} '{k}'") for k in ("w", "b"))
    if w.size != d:
        raise ValueError(f"--params 'w' must hold d = {d} values (the data's width), got shape {w.shape}")
    if b.size != 1:
        raise ValueError(f"--params 'b' must hold one value (the intercept), got shape {b.shape}")
    if n <= d + 1:
        raise ValueError(
            f"--data holds n = {n} examples for a model of p = {d + 1} parameters; the single-model audit needs "
            "n > p (its rates come from the spread of loss differences over the training set)"
        )
    budget, need = _budget(args), replicate_bytes(n=n, p=d + 1, dx=d)
    if need > budget:
        raise ValueError(
            f"--memory-budget {budget} bytes ({budget / MIB:.3g} MiB) is less than the audit of n = {n} examples "
            f"needs, about {need / MIB:.3g} MiB; raise --memory-budget"
        )
    params = {"b": jnp.asarray(b.astype(np.float32).reshape(1)), "w": jnp.asarray(w.astype(np.float32).reshape(d, 1))}
    problem = problems.logistic_mixture(dim=d) if args.model == "logistic" else problems.linear_regression(dim=d)
    qs = resolve_quantizers(list(args.quantizers or names()))
    config = {
        "command": "audit",
        "params": os.path.abspath(args.params),
        "data": os.path.abspath(args.data),
        "test_data": os.path.abspath(args.test_data) if args.test_data else None,
        "model": args.model,
        "ptq": args.ptq,
        "method": args.method,
        "quantizers": list(qs),
        "seed": args.seed,
    }
    store = ResultStore(args.out, config, resume=args.resume)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    test_xy = None if test is None else tuple(jnp.asarray(a, jnp.float32) for a in test)

    def compute():
        return audit_model(
            jax.random.key(args.seed), problem, params, xj, yj, qs, test=test_xy, ptq=args.ptq, method=args.method
        ).to_dict()

    report = store.get_or_compute_json("single-audit", compute)
    report["problem"] = {"name": args.model, "dim": d}
    report["config_hash"] = config_hash(config)
    write_json(os.path.join(args.out, "report.json"), report)
    lines = [
        f"# Single-model audit of {args.params}",
        "",
        f"n = {x.shape[0]} training points, d = {d}, {args.ptq} PTQ, {args.method} rates. One model has no flip "
        "rate and no section-1 attack: r_hat is what one audit says (biased upward at O(1/n)), not a bound.",
        "",
        *single_model_table(report),
    ]
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return args.out
