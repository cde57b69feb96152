"""The ``qmis`` command: synthetic and molecular studies, a single-model audit, and the benchmarks.

Every sub-command writes ``DIR/report.json`` (the schema of design.md), ``DIR/report.md`` and PNG plots, and
continues an interrupted run with ``--resume``. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"qmis: error: {message}\n")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


def _int_list(name: str):
    one = _positive_int(name)

    def parse(text: str) -> tuple[int, ...]:
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{name} needs at least one value, got {text!r}")
        return tuple(one(p.strip()) for p in parts)

    return parse


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"--quantizers needs at least one name, got {text!r}")
    return names


def _memory_size(text: str) -> int:
    from qmis_jax._memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--memory-budget must be a positive size, in bytes or with a suffix K, M, G, T (512M, 2G), got {text!r}"
        ) from None


def _seconds(text: str) -> float:
    from qmis_jax._watchdog import parse_timeout

    try:
        return parse_timeout(text, name="--stall-timeout")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        # JAX keys hold 32-bit seeds unless x64 is enabled: larger seeds would silently alias smaller ones
        raise argparse.ArgumentTypeError(f"--seed must be an integer in [0, 2^32), got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, *, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, reusing finished work")
    p.add_argument("--seed", type=_seed, default=0, help="PRNG seed; the same seed gives the same numbers (default 0)")
    p.add_argument(
        "--quantizers",
        type=_name_list,
        default=None,
        help="comma-separated preset names (see 'qmis quantizers'); default: all presets (synthetic adds "
        "grid_fixed and grid_adaptive; quick: a subset of nine)",
    )
    p.add_argument(
        "--memory-budget",
        type=_memory_size,
        default=2 * 2**30,
        help="memory the replicate chunks may use, in bytes or with a suffix (512M, 2G); larger runs are cut into "
        "chunks, and a run where one replicate alone needs more is refused (default 2G)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--stall-timeout",
        type=_seconds,
        default=None,
        help="seconds without progress after which the run writes every thread's stack to --out, says where it "
        "stopped and exits with status 3 (continue with --resume); 0 turns it off (default 1800, or "
        "$QMIS_JAX_STALL_TIMEOUT)",
    )
    p.add_argument(
        "--allow-affected-jaxlib",
        action="store_true",
        help="run even on a jaxlib whose CPU linear algebra can deadlock (0.10.0 - 0.11.0; also "
        "QMIS_JAX_ALLOW_AFFECTED_JAXLIB=1); the verified runtime is jax==0.9.2 jaxlib==0.9.2",
    )


def _study_parser(sub, name: str, *, help: str, description: str, n_help: str, replicates_help: str):
    """A study's subcommand with the options every study has: output, resume, seed, quantizers, sizes."""
    parser = sub.add_parser(name, help=help, description=description)
    _common(parser, default_out=f"results/{name}")
    parser.add_argument("--n", type=_int_list("--n"), default=None, help=n_help)
    parser.add_argument("--replicates", type=_positive_int("--replicates"), default=None, help=replicates_help)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qmis",
        description=__doc__.split("\n")[0],
        epilog="Compiled programs are kept in ~/.cache/qmis_jax/xla (or $XDG_CACHE_HOME/qmis_jax/xla), so a second "
        "run compiles little; QMIS_JAX_CACHE=DIR moves that cache, QMIS_JAX_CACHE=off turns it off.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    s = _study_parser(
        sub,
        "synthetic",
        help="synthetic study: Gaussian mixtures in R^dim, logistic and MLP models, all quantizers, a sweep over n",
        description="Rank quantizers on privacy (indicator r_Q^n, flip rates, LOSS and LiRA attacks) and utility "
        "on Gaussian-mixture data, for one or several training-set sizes n.",
        n_help="training-set size, or a comma-separated list for a sweep (default 1000,2000,4000; quick: 400,800)",
        replicates_help="shadow models per (model, n), and as many again for LiRA (default 256; quick: 64)",
    )
    s.add_argument(
        "--models",
        type=_name_list,
        default=None,
        help="comma-separated models among logistic,mlp (default logistic; the MLP is costly on CPU)",
    )
    s.add_argument("--dim", type=_positive_int("--dim"), default=None, help="input dimension (default 128; quick: 16)")
    s.add_argument(
        "--k-modes", type=_positive_int("--k-modes"), default=None, help="Gaussian modes per class (default 4)"
    )
    s.add_argument("--quick", action="store_true", help="small sizes that finish in a few minutes")
    s.add_argument(
        "--no-validation",
        action="store_true",
        help="skip part one (the low-dimensional validation of the theory) and run only the paper's setting",
    )
    s.add_argument("--ptq", choices=("loss", "rtn"), default="loss", help="post-training procedure (default loss)")
    s.add_argument(
        "--method", choices=("gaussian", "cramer"), default="gaussian", help="rate of the indicator (default gaussian)"
    )

    m = _study_parser(
        sub,
        "molecular",
        help="offline molecular-property study (datasets shipped in PyPI packages, RDKit featurizers)",
        description="Utility and privacy of quantized linear/MLP heads on RDKit features of a drug-discovery data set.",
        n_help="training-set size drawn at random from the training split (default: the whole split)",
        replicates_help="LiRA shadow models (default 256; quick: 32)",
    )
    m.add_argument("--dataset", required=True, help="data set name (see 'qmis datasets')")
    m.add_argument(
        "--featurizers",
        type=_name_list,
        default=None,
        help="comma-separated featurizers among ecfp,fcfp,atompair,maccs,rdkit2d (default all)",
    )
    m.add_argument("--heads", type=_name_list, default=None, help="comma-separated heads among linear,mlp")
    m.add_argument(
        "--task", choices=("regression", "classification"), default=None, help="task (default: the data set's own)"
    )
    m.add_argument("--quick", action="store_true", help="small sizes that finish in about a minute")

    a = sub.add_parser(
        "audit",
        help="audit one trained model: the single-model indicator r_hat of each quantizer on its training data",
        description="Audit a user's own trained model. PARAMS is an .npz of the parameter arrays (logistic: 'w' of "
        "shape (d, 1) and 'b' of shape (1,)); DATA is an .npz with 'x' (n, d) and 'y' (n,) the training set.",
    )
    _common(a, default_out="results/audit")
    a.add_argument("--params", required=True, help=".npz file of the trained parameters")
    a.add_argument("--data", required=True, help=".npz file with x and y, the training set")
    a.add_argument("--test-data", default=None, help="optional .npz with held-out x and y for utility")
    a.add_argument("--model", choices=("logistic", "linear"), default="logistic", help="model family of PARAMS")
    a.add_argument("--ptq", choices=("loss", "rtn"), default="loss", help="post-training procedure (default loss)")
    a.add_argument("--method", choices=("gaussian", "cramer"), default="gaussian", help="rate (default gaussian)")

    b = sub.add_parser("bench", help="run the benchmarks against the baselines (JSON lines)")
    b.add_argument("--quick", action="store_true", help="quick sizes (< 10 minutes on 2 CPU cores)")
    b.add_argument("--out", default=None, help="file for the JSON lines (default: print only)")

    sub.add_parser("quantizers", help="list the quantizer presets")
    sub.add_parser("datasets", help="list the molecular data sets and featurizers")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "quantizers":
        from qmis_jax import quantizers

        for name in quantizers.names():
            q = quantizers.get(name)
            release = "continuous" if quantizers.is_continuous(q) else "discrete"
            print(f"{name:16s} {release:10s} {q!r}")
        print(
            "scale formats (suffix NAME@FORMAT on any scaled preset, e.g. int4@e8m0): "
            + ", ".join(quantizers.SCALE_FORMATS)
            + "; f32 (the default) publishes a continuous scale, e8m0 a power of two (a grid fixed in advance)"
        )
        return 0
    if args.command == "datasets":
        from qmis_jax.molecular import dataset_names, featurizer_names

        print("datasets:    " + ", ".join(dataset_names()))
        print("featurizers: " + ", ".join(featurizer_names()))
        return 0
    if args.command == "bench":
        import runpy

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        script = os.path.join(here, "benchmarks", "run.py")
        if not os.path.exists(script):
            raise ValueError("the benchmarks ship with the source tree (benchmarks/run.py), not with the wheel")
        sys.argv = [script] + (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
        runpy.run_path(script, run_name="__main__")
        return 0
    from qmis_jax import _runtime, _watchdog
    from qmis_jax.studies import run_audit_cli, run_study

    risk = _runtime.deadlock_risk()
    if risk is not None and not (args.allow_affected_jaxlib or _runtime.override_allowed()):
        raise ValueError(f"{risk}; or run anyway with --allow-affected-jaxlib ({_runtime.ALLOW_ENV}=1)")
    runner = run_audit_cli if args.command == "audit" else run_study
    timeout = _watchdog.default_timeout() if args.stall_timeout is None else args.stall_timeout
    with _watchdog.Watchdog(args.out, timeout=timeout, command=_resume_command(args.argv)):
        out = runner(args)
    print(f"wrote {os.path.join(out, 'report.json')}, report.md and plots")
    return 0


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same arguments with ``--resume``."""
    return " ".join(["qmis", *(shlex.quote(a) for a in argv if a != "--resume"), "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qmis`` console script; returns the exit status.

    Run as the command (``argv`` None), stderr goes through :func:`qmis_jax._xla_log.filter_stderr`, which drops
    jaxlib's harmless compilation-cache lines (``QMIS_JAX_XLA_LOG=all`` keeps them).
    """
    if argv is None:
        from qmis_jax import _xla_log

        quiet = _xla_log.filter_stderr()
        try:
            return main(sys.argv[1:])
        finally:
            if quiet is not None:
                quiet.close()
    parser = build_parser()
    argv = list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a one-line usage error already printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.version:
        from qmis_jax._version import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    args.argv = argv
    try:
        from qmis_jax._cache import enable_compilation_cache

        enable_compilation_cache()
        return _run(args)
    except KeyboardInterrupt:
        print("qmis: interrupted; finished work is saved, continue with --resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, MemoryError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"qmis: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
