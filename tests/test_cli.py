"""The `qmis` command: bad input ends with one line on stderr and exit status 2, never a traceback."""

import numpy as np
import pytest

from qmis_jax.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("synthetic", "--n", "0"), "--n must be a positive integer"),
        (("synthetic", "--n", "100,-5"), "--n must be a positive integer"),
        (("synthetic", "--replicates", "-3"), "--replicates must be a positive integer"),
        (("synthetic", "--quick", "--quantizers", "int4,bogus"), "unknown quantizer 'bogus'"),
        (("synthetic", "--quick", "--models", "resnet"), "unknown model 'resnet'"),
        (("synthetic", "--quick", "--memory-budget", "-1"), "--memory-budget must be a positive"),
        (("molecular", "--dataset", "nope", "--quick"), "unknown data set 'nope'"),
        (("molecular", "--dataset", "solubility", "--featurizers", "morgan9", "--quick"), "unknown featurizer"),
        (("synthetic", "--quick", "--stall-timeout", "-1"), "--stall-timeout must be a number of seconds >= 0"),
        (("synthetic", "--quick", "--stall-timeout", "inf"), "--stall-timeout must be a number of seconds >= 0"),
        (("synthetic", "--bogus-flag"), "unrecognized arguments"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(capsys, tmp_path, argv, needle):
    code, _, err = run(capsys, *argv, *(() if "--bogus-flag" in argv else ("--out", str(tmp_path / "o"))))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmis: error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_unwritable_out_and_bad_npz_files(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "synthetic", "--quick", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot be created" in err and len(err.strip().splitlines()) == 1

    np.savez(tmp_path / "params.npz", w=np.zeros(3), b=np.zeros(1))
    truncated = tmp_path / "data.npz"
    np.savez(truncated, x=np.zeros((10, 3)), y=np.zeros(10))
    truncated.write_bytes(truncated.read_bytes()[:50])
    code, _, err = run(
        capsys,
        "audit",
        "--params",
        str(tmp_path / "params.npz"),
        "--data",
        str(truncated),
        "--out",
        str(tmp_path / "a"),
    )
    assert code == 2 and "not a readable .npz" in err

    np.savez(tmp_path / "nan.npz", x=np.full((10, 3), np.nan), y=np.zeros(10))
    code, _, err = run(
        capsys,
        "audit",
        "--params",
        str(tmp_path / "params.npz"),
        "--data",
        str(tmp_path / "nan.npz"),
        "--out",
        str(tmp_path / "b"),
    )
    assert code == 2 and "NaN" in err
    code, _, err = run(
        capsys,
        "audit",
        "--params",
        str(tmp_path / "missing.npz"),
        "--data",
        str(tmp_path / "nan.npz"),
        "--out",
        str(tmp_path / "c"),
    )
    assert code == 2 and "does not exist" in err


def test_listing_commands(capsys):
    code, out, _ = run(capsys, "quantizers")
    assert code == 0 and "int4_stochastic" in out and "ternary_s90" in out
    code, out, _ = run(capsys, "datasets")
    assert code == 0 and "solubility" in out and "rdkit2d" in out
