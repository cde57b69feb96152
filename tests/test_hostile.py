"""Bad input, row by row: the table "Bad input" of README.md.

API rows raise a ValueError or KeyError whose message names the argument and the bad value (or, for jitted
functions that cannot raise, return NaN). CLI rows end with exit status 2 and one line on stderr, never a
traceback. Rows already covered elsewhere (tests/test_cli.py: truncated or missing .npz, NaN in --data, unwritable
--out, bad sizes and names of `qmis synthetic` and `qmis molecular`; tests/test_store.py: corrupt manifests and
units of the store) are not repeated here.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qmis_jax as qj
from qmis_jax import attacks, indicator, train
from qmis_jax import quantizers as Q
from qmis_jax.cli import main
from qmis_jax.store import ResultStore

KEY = jax.random.key(0)
LOGISTIC = qj.problems.logistic_mixture(dim=3)
X = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.float32)
W = np.ones((2, 20), np.float32)


def small_audit(**kw):
    args = dict(n=50, replicates=8, population_size=200, test_size=50, attacks=("loss",), n_boot=10)
    args.update(kw)
    return qj.audit(KEY, args.pop("problem", LOGISTIC), args.pop("quantizers", ["int4", "sign"]), **args)


def molecular():
    return pytest.importorskip("qmis_jax.molecular")


# (row, call, exception, message pattern)
API_ERRORS = [
    ("audit n=0", lambda: small_audit(n=0), ValueError, r"n must be a positive integer, got 0"),
    ("audit n=2.5", lambda: small_audit(n=2.5), ValueError, r"n must be a positive integer, got 2.5"),
    ("audit n=1", lambda: small_audit(n=1), ValueError, r"n must be >= 2 .* got n=1"),
    (
        "audit replicates<0",
        lambda: small_audit(replicates=-3),
        ValueError,
        r"replicates must be a positive integer, got -3",
    ),
    (
        "audit chunk_size=0",
        lambda: small_audit(chunk_size=0),
        ValueError,
        r"chunk_size must be a positive integer, got 0",
    ),
    (
        "audit population_size=0",
        lambda: small_audit(population_size=0),
        ValueError,
        r"population_size must be a positive integer, got 0",
    ),
    (
        "audit lira_replicates=0",
        lambda: small_audit(lira_replicates=0),
        ValueError,
        r"lira_replicates must be a positive integer, got 0",
    ),
    (
        "audit lira_targets=0",
        lambda: small_audit(lira_targets=0),
        ValueError,
        r"lira_targets must be a positive integer, got 0",
    ),
    ("audit lira_targets>=n", lambda: small_audit(lira_targets=50), ValueError, r"lira_targets must be smaller"),
    (
        "audit memory_budget below one replicate",
        lambda: small_audit(memory_budget=1000),
        ValueError,
        r"memory_budget=1000 bytes \(.* MiB\) cannot hold one replicate, which needs about .* MiB at n=50 .* raise "
        r"memory_budget or lower n",
    ),
    ("audit memory_budget=0", lambda: small_audit(memory_budget=0), ValueError, r"memory_budget must be .* got"),
    (
        "audit unknown quantizer",
        lambda: small_audit(quantizers=["int4", "int3"]),
        KeyError,
        r"unknown quantizer 'int3'",
    ),
    ("audit no quantizer", lambda: small_audit(quantizers=[]), ValueError, r"at least one quantizer"),
    ("audit quantizers=5", lambda: small_audit(quantizers=5), ValueError, r"quantizers must be a preset name"),
    ("audit unknown ptq", lambda: small_audit(ptq="gptq"), ValueError, r"ptq must be one of .* got ptq='gptq'"),
    ("audit unknown method", lambda: small_audit(method="exact"), ValueError, r"method must be one of .*'exact'"),
    ("audit unknown attack", lambda: small_audit(attacks="shokri"), ValueError, r"attacks must be among .*'shokri'"),
    ("audit problem not a Problem", lambda: small_audit(problem="logistic"), ValueError, r"problem must be a"),
    ("quantizers.get unknown", lambda: Q.get("int3"), KeyError, r"unknown quantizer 'int3'; valid names: fp32"),
    ("uniform bits=1", lambda: Q.uniform(bits=1), ValueError, r"`bits` must be in 2\.\.16, got 1: .* use sign\(\)"),
    ("uniform bits=0", lambda: Q.uniform(bits=0), ValueError, r"`bits` must be an integer in 2\.\.16, got 0"),
    ("uniform bits=33", lambda: Q.uniform(bits=33), ValueError, r"`bits` must be an integer in 2\.\.16, got 33"),
    ("uniform bits=2.5", lambda: Q.uniform(bits=2.5), ValueError, r"`bits` must be an integer in 2\.\.16, got 2\.5"),
    ("uniform step=0", lambda: Q.uniform(step=0.0), ValueError, r"`step` must be a finite number > 0, got 0\.0"),
    ("uniform step=nan", lambda: Q.uniform(step=float("nan")), ValueError, r"`step` must be a finite .* got nan"),
    ("ternary sparsity=1", lambda: Q.ternary(sparsity=1.0), ValueError, r"`sparsity` must lie in \[0, 1\), got 1\.0"),
    ("prune sparsity<0", lambda: Q.prune(sparsity=-0.1), ValueError, r"`sparsity` must lie in \[0, 1\), got -0\.1"),
    ("stochastic without key", lambda: Q.get("int4_stochastic")(jnp.ones(3)), ValueError, r"`key` is required"),
    ("integer weights", lambda: Q.get("int4")(jnp.arange(3)), ValueError, r"`w` must be a floating-point array"),
    ("logistic dim=0", lambda: qj.problems.logistic_mixture(dim=0), ValueError, r"dim must be a positive integer"),
    ("gaussian mu=nan", lambda: qj.problems.gaussian_mean(mu=[np.nan]), ValueError, r"mu must be finite"),
    ("gaussian sigma=0", lambda: qj.problems.gaussian_mean(mu=[0.0], sigma=0.0), ValueError, r"sigma must be a pos"),
    ("fit NaN in x", lambda: train.fit(KEY, LOGISTIC, X * np.nan, Y, weights=W), ValueError, r"x must be finite"),
    ("fit empty x", lambda: train.fit(KEY, LOGISTIC, X[:0], Y[:0], weights=W[:, :0]), ValueError, r"N >= 1, got"),
    (
        "fit x of the wrong width",
        lambda: train.fit(KEY, LOGISTIC, np.ones((20, 4), np.float32), Y, weights=W),
        ValueError,
        r"x rows of shape \(4,\) do not fit the model of problem 'logistic_mixture'",
    ),
    (
        "fit x of strings",
        lambda: train.fit(KEY, LOGISTIC, X.astype(str), Y, weights=W),
        ValueError,
        r"x must hold real numbers, got dtype <U",
    ),
    ("fit y of another length", lambda: train.fit(KEY, LOGISTIC, X, Y[:9], weights=W), ValueError, r"y must have"),
    ("fit labels not 0/1", lambda: train.fit(KEY, LOGISTIC, X, Y + 2, weights=W), ValueError, r"labels in \{0, 1\}"),
    ("fit negative weights", lambda: train.fit(KEY, LOGISTIC, X, Y, weights=-W), ValueError, r"non-negative"),
    ("fit unknown solver", lambda: train.fit(KEY, LOGISTIC, X, Y, weights=W, solver="lbfgs"), KeyError, r"'lbfgs'"),
    (
        "fit memory_budget below one replicate",
        lambda: train.fit(KEY, LOGISTIC, X, Y, weights=W, memory_budget=10),
        ValueError,
        r"memory_budget=10 bytes .* cannot hold one replicate",
    ),
    ("fit_fresh n=0", lambda: train.fit_fresh(KEY, LOGISTIC, n=0, replicates=2), ValueError, r"n must be a positive"),
    (
        "sandwich rows mismatch",
        lambda: indicator.sandwich_covariance(LOGISTIC.loss, LOGISTIC.init(KEY), X, Y[:9]),
        ValueError,
        r"x and y must have the same number of rows",
    ),
    (
        "sandwich NaN in x",
        lambda: indicator.sandwich_covariance(LOGISTIC.loss, LOGISTIC.init(KEY), X * np.nan, Y),
        ValueError,
        r"singular or non-finite",
    ),
    (
        "attack_metrics empty",
        lambda: attacks.attack_metrics(jax.random.key(0), [], [1.0, 2.0]),
        ValueError,
        r"at least one score",
    ),
    (
        "attack_metrics NaN",
        lambda: attacks.attack_metrics(jax.random.key(0), [1.0, np.nan], [1.0, 2.0]),
        ValueError,
        r"contains NaN",
    ),
    ("indicator shapes", lambda: indicator.indicator(jnp.ones(3), jnp.ones(2, bool)), ValueError, r"the same shape"),
    ("unknown data set", lambda: molecular().load_dataset("nope"), KeyError, r"unknown dataset 'nope'; valid names"),
    ("unknown featurizer", lambda: molecular().featurize(["CCO"], "morgan9"), KeyError, r"unknown featurizer"),
]


@pytest.mark.parametrize(("row", "call", "error", "pattern"), API_ERRORS, ids=[r[0] for r in API_ERRORS])
def test_api_rejects_bad_input_with_a_clear_error(row, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_jitted_functions_return_nan_for_bad_numbers():
    """Traced code cannot raise: a negative standard deviation gives a NaN rate (it gave +inf, "cannot happen"),
    and NaN or inf weights give a NaN release (the absmax scale is NaN), never a plausible number."""
    rates = np.asarray(indicator.gaussian_rate(jnp.array([0.5, -0.5, 0.5]), jnp.array([-1.0, -1.0, 1.0])))
    assert np.isnan(rates[0]) and np.isnan(rates[1]) and rates[2] == pytest.approx(0.125)
    for bad in (np.nan, np.inf):
        out = np.asarray(Q.get("int4")(jnp.array([1.0, bad, 0.5])))
        assert np.all(np.isnan(out))


def test_audit_takes_one_attack_name_as_a_string():
    """``attacks="loss"`` is the tuple ``("loss",)``, not the letters of "loss" (it failed on 'l')."""
    with pytest.raises(ValueError, match=r"population_size must be"):  # checked after the attacks
        small_audit(attacks="loss", population_size=0)


def test_single_model_indicator_flags_nan_parameters():
    nan_params = jax.tree.map(lambda a: a * jnp.nan, LOGISTIC.init(KEY))
    out = indicator.single_model_indicator(Q.get("int4"), LOGISTIC, nan_params, jnp.asarray(X), jnp.asarray(Y))
    assert not bool(out.ok) and np.isnan(float(out.r_hat))  # flagged, not reported as infinitely secure


# ----------------------------------------------------------------------------------------------------------------
# The qmis command
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small .npz inputs of `qmis audit`: a logistic model on 200 points in R^3, and broken variants."""
    d = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 3))
    y = (x[:, 0] + 0.5 * rng.standard_normal(200) > 0).astype(float)
    save = lambda name, **arrays: np.savez(d / name, **arrays) or str(d / name)
    return {
        "params": save("params.npz", w=np.array([1.5, 0.2, -0.1]), b=np.array([0.05])),
        "params_nan": save("params_nan.npz", w=np.array([np.nan, 0.2, -0.1]), b=np.array([0.05])),
        "params_b3": save("params_b3.npz", w=np.array([1.5, 0.2, -0.1]), b=np.zeros(3)),
        "data": save("data.npz", x=x, y=y),
        "empty": save("empty.npz", x=np.zeros((0, 3)), y=np.zeros(0)),
        "strings": save("strings.npz", x=np.array([["a", "b", "c"]] * 10), y=np.zeros(10)),
        "tiny": save("tiny.npz", x=x[:3], y=y[:3]),
        "labels": save("labels.npz", x=x, y=np.arange(200) % 3),
        "test_wide": save("test_wide.npz", x=rng.standard_normal((50, 5)), y=np.zeros(50)),
        "test_nan": save("test_nan.npz", x=np.full((50, 3), np.nan), y=np.zeros(50)),
        "no_x": save("no_x.npz", features=x, y=y),
        "dir": str(d),
    }


def run_cli(capsys, argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(code, err, needle):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmis: error:"), err
    assert needle in lines[0], err
    assert "Traceback" not in err


# (row, argv with {placeholders} for the files, expected text of the one stderr line)
CLI_ERRORS = [
    ("audit NaN in --params", "audit --params {params_nan} --data {data}", "'w' holds NaN or infinite values"),
    ("audit intercept of 3 values", "audit --params {params_b3} --data {data}", "'b' must hold one value"),
    ("audit empty --data", "audit --params {params} --data {empty}", "n >= 1, and y of shape (n,), got (0, 3)"),
    ("audit --data of strings", "audit --params {params} --data {strings}", "x must hold real numbers"),
    ("audit fewer examples than parameters", "audit --params {params} --data {tiny}", "needs n > p"),
    ("audit labels not 0/1", "audit --params {params} --data {labels}", "y must hold 0/1 labels"),
    ("audit --data without x", "audit --params {params} --data {no_x}", "lacks array(s) ['x']; it holds"),
    (
        "audit --test-data of another width",
        "audit --params {params} --data {data} --test-data {test_wide}",
        "--test-data x has 5 columns",
    ),
    (
        "audit NaN in --test-data",
        "audit --params {params} --data {data} --test-data {test_nan}",
        "x holds NaN or infinite values",
    ),
    ("audit unknown quantizer", "audit --params {params} --data {data} --quantizers int3", "unknown quantizer 'int3'"),
    ("audit unknown model", "audit --params {params} --data {data} --model resnet", "invalid choice: 'resnet'"),
    ("audit unknown ptq", "audit --params {params} --data {data} --ptq gptq", "invalid choice: 'gptq'"),
    (
        "audit --memory-budget below the audit",
        "audit --params {params} --data {data} --memory-budget 1K",
        "--memory-budget 1024 bytes",
    ),
    ("--memory-budget not a size", "synthetic --quick --memory-budget 2X", "--memory-budget must be a positive size"),
    ("--memory-budget 0", "synthetic --quick --memory-budget 0", "--memory-budget must be a positive size"),
    ("synthetic --memory-budget below one replicate", "synthetic --quick --memory-budget 1K", "more than --memory"),
    ("synthetic --n 1", "synthetic --quick --n 1", "--n must be at least 2"),
    ("synthetic --replicates 3", "synthetic --quick --replicates 3", "--replicates must be at least 4"),
    ("synthetic --dim 0", "synthetic --quick --dim 0", "--dim must be a positive integer, got 0"),
    ("--seed beyond 32 bits", "synthetic --quick --seed 4294967296", "--seed must be an integer in [0, 2^32)"),
    ("--seed negative", "synthetic --quick --seed -1", "--seed must be an integer in [0, 2^32)"),
    ("molecular unknown head", "molecular --dataset solubility --quick --heads cnn", "unknown head 'cnn'"),
    ("molecular unknown task", "molecular --dataset solubility --quick --task ranking", "invalid choice: 'ranking'"),
    ("unknown command", "bogus", "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize(("row", "argv", "needle"), CLI_ERRORS, ids=[r[0] for r in CLI_ERRORS])
def test_cli_rejects_bad_input_with_one_line(capsys, files, tmp_path, row, argv, needle):
    args = [a.format(**files) for a in argv.split()]
    if args[0] != "bogus":
        args += ["--out", str(tmp_path / "out"), "--no-progress"]
    code, err = run_cli(capsys, args)
    assert_one_line(code, err, needle)
    if args[0] == "audit":  # refused before anything is written
        assert not os.path.exists(tmp_path / "out")


def test_cli_result_directories_foreign_existing_and_corrupt(capsys, files, tmp_path):
    """A finished `qmis audit` directory is refused without --resume, and with another configuration; a
    corrupt unit or manifest is named; a directory of another study is refused before any work."""
    out = str(tmp_path / "audit")
    base = ["audit", "--params", files["params"], "--data", files["data"], "--quantizers", "sign", "--out", out]
    code, err = run_cli(capsys, base)
    assert code == 0, err
    with open(os.path.join(out, "report.json")) as fh:
        report = json.load(fh)
    assert report["n"] == 200 and np.isfinite(report["quantizers"]["sign"]["r_hat"])

    assert_one_line(*run_cli(capsys, base), "already holds results; pass --resume")
    assert_one_line(*run_cli(capsys, [*base[:-3], "int4", "--out", out, "--resume"]), "another configuration")

    unit = os.path.join(out, "units", "single-audit.json")
    with open(unit) as fh:
        text = fh.read()
    with open(unit, "w") as fh:
        fh.write(text[: len(text) // 2])
    assert_one_line(*run_cli(capsys, [*base, "--resume"]), "is corrupt")

    with open(os.path.join(out, "manifest.json"), "w") as fh:
        fh.write("{ not json")
    assert_one_line(*run_cli(capsys, [*base, "--resume"]), "is not a readable qmis_jax manifest")

    foreign = str(tmp_path / "foreign")
    ResultStore(foreign, {"study": "synthetic", "n": [400]})
    assert_one_line(*run_cli(capsys, [*base[:-1], foreign, "--resume"]), "another configuration")
    assert_one_line(*run_cli(capsys, ["synthetic", "--quick", "--out", foreign, "--resume"]), "another configuration")
