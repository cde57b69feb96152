"""RDKit featurizers: fixed molecular representations standing in for pretrained embedders.

``featurizer_names()``: ``"ecfp"`` (Morgan radius-2 count fingerprint), ``"fcfp"`` (the same with pharmacophoric
feature invariants), ``"atompair"`` (hashed atom-pair counts), ``"maccs"`` (the 167 MACCS keys) and ``"rdkit2d"``
(every RDKit 2-D descriptor of ``rdkit.Chem.Descriptors.descList``).

Invalid SMILES (RDKit parses nothing, or an empty molecule) never raise: they are counted, get a zero row and
``valid=False``, and RDKit's parse-error log is silenced while featurizing. RDKit is imported lazily, so importing
this module does not need it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "COUNT_FEATURIZERS",
    "Features",
    "Standardized",
    "featurize",
    "featurize_dataset",
    "featurizer_names",
    "standardize",
]

_NAMES = ("ecfp", "fcfp", "atompair", "maccs", "rdkit2d")
#: Featurizers whose entries are counts (a ``log1p`` transform applies to them).
COUNT_FEATURIZERS = ("ecfp", "fcfp", "atompair")
_MACCS_BITS = 167
_MORGAN_RADIUS = 2
#: Descriptors replaced by ``log1p`` of their value: Ipc grows like a factorial of the molecule's size.
_LOG_DESCRIPTORS = ("Ipc",)


class Features(NamedTuple):
    """Featurized molecules.

    Attributes:
      x: ``(n, f)`` float32 features; rows of invalid molecules are zero. For ``"rdkit2d"`` a descriptor RDKit
        cannot compute (or that overflows float32) is NaN, imputed later by :func:`standardize` with training
        statistics; every other featurizer gives finite values.
      valid: ``(n,)`` bool, False where the SMILES did not parse.
      n_invalid: number of invalid SMILES.
      names: the ``f`` feature names.
    """

    x: np.ndarray
    valid: np.ndarray
    n_invalid: int
    names: tuple[str, ...]


class Standardized(NamedTuple):
    """Output of :func:`standardize`: standardized train and test arrays and the training statistics used."""

    train: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


def featurizer_names() -> tuple[str, ...]:
    """Names accepted by :func:`featurize`: ``("ecfp", "fcfp", "atompair", "maccs", "rdkit2d")``."""
    return _NAMES


def _check_name(name: str) -> None:
    if name not in _NAMES:
        raise KeyError(f"unknown featurizer {name!r}; valid names: {', '.join(_NAMES)}")


def _check_n_bits(n_bits) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int | np.integer) or n_bits < 1:
        raise ValueError(f"n_bits: must be a positive integer, got {n_bits!r}")
    return int(n_bits)


def _parse(smiles: Sequence[str]):
    """RDKit molecules (None where invalid), with RDKit's error log blocked."""
    from rdkit import Chem, rdBase

    blocker = rdBase.BlockLogs()  # restores the previous log state when released
    try:
        mols = []
        for s in smiles:
            mol = Chem.MolFromSmiles(s) if isinstance(s, str) and s.strip() else None
            if mol is not None and mol.GetNumAtoms() == 0:
                mol = None
            mols.append(mol)
    finally:
        del blocker
    return mols


def _generator(name: str, n_bits: int):
    from rdkit.Chem import rdFingerprintGenerator as fg

    if name == "ecfp":
        return fg.GetMorganGenerator(radius=_MORGAN_RADIUS, fpSize=n_bits)
    if name == "fcfp":
        return fg.GetMorganGenerator(
            radius=_MORGAN_RADIUS, fpSize=n_bits, atomInvariantsGenerator=fg.GetMorganFeatureAtomInvGen()
        )
    return fg.GetAtomPairGenerator(fpSize=n_bits)


def _descriptor_list():
    from rdkit.Chem import Descriptors

    return list(Descriptors.descList)


def _descriptor_row(mol, funcs) -> np.ndarray:
    row = np.empty(len(funcs), dtype=np.float64)
    for j, (dname, fn) in enumerate(funcs):
        try:
            v = float(fn(mol))
        except Exception:  # RDKit raises assorted errors on unusual chemistry: treat as missing
            v = math.nan
        if dname in _LOG_DESCRIPTORS and v >= 0:
            v = math.log1p(v)
        row[j] = v
    return row


def featurize(smiles: Sequence[str], name: str, *, n_bits: int = 1024, log1p: bool = False) -> Features:
    """Featurize SMILES strings with one RDKit featurizer.

    * ``"ecfp"``: Morgan (ECFP4) radius-2 count fingerprint folded to ``n_bits`` (``rdFingerprintGenerator``):
      entry ``j`` counts the atom environments whose hash is ``j mod n_bits``.
    * ``"fcfp"``: the same with feature (pharmacophore) atom invariants (FCFP4).
    * ``"atompair"``: hashed atom-pair counts, ``n_bits`` entries.
    * ``"maccs"``: the 167 MACCS structural keys (0/1; ``n_bits`` ignored).
    * ``"rdkit2d"``: every descriptor of ``rdkit.Chem.Descriptors.descList`` (``n_bits`` ignored); ``Ipc`` is
      replaced by ``log1p(Ipc)`` (it reaches 1e13 on drug-sized molecules); non-finite values are NaN, to be
      imputed by :func:`standardize` with training statistics.

    Args:
      smiles: ``n`` SMILES strings; anything RDKit cannot parse (or a non-string) is an invalid molecule.
      name: one of :func:`featurizer_names`.
      n_bits: fingerprint length for the hashed count featurizers.
      log1p: apply ``log1p`` to counts (count featurizers only).

    Returns:
      :class:`Features` with ``x`` of shape ``(n, f)`` float32, ``f = n_bits`` for count fingerprints, 167 for
      MACCS, ``len(descList)`` for descriptors.
    """
    _check_name(name)
    n_bits = _check_n_bits(n_bits)
    if log1p and name not in COUNT_FEATURIZERS:
        raise ValueError(f"log1p: only for count featurizers {COUNT_FEATURIZERS}, got name={name!r}")
    if isinstance(smiles, str):
        raise ValueError(f"smiles: expected a sequence of SMILES strings, got one string {smiles!r}")
    mols = _parse(list(smiles))
    n = len(mols)
    valid = np.array([m is not None for m in mols], dtype=bool)

    if name in COUNT_FEATURIZERS:
        gen = _generator(name, n_bits)
        x = np.zeros((n, n_bits), dtype=np.float64)
        for i, m in enumerate(mols):
            if m is not None:
                x[i] = gen.GetCountFingerprintAsNumPy(m)
        if log1p:
            x = np.log1p(x)
        names = tuple(f"{name}_{j}" for j in range(n_bits))
    elif name == "maccs":
        from rdkit.Chem import MACCSkeys

        x = np.zeros((n, _MACCS_BITS), dtype=np.float64)
        for i, m in enumerate(mols):
            if m is not None:
                x[i] = MACCSkeys.GenMACCSKeys(m).ToList()
        names = tuple(f"maccs_{j}" for j in range(_MACCS_BITS))
    else:
        funcs = _descriptor_list()
        from rdkit import rdBase

        x = np.zeros((n, len(funcs)), dtype=np.float64)
        blocker = rdBase.BlockLogs()
        try:
            for i, m in enumerate(mols):
                if m is not None:
                    x[i] = _descriptor_row(m, funcs)
        finally:
            del blocker
        x[~np.isfinite(x) | (np.abs(x) > np.finfo(np.float32).max)] = np.nan
        names = tuple(f"{d}_log1p" if d in _LOG_DESCRIPTORS else d for d, _ in funcs)
    return Features(x=x.astype(np.float32), valid=valid, n_invalid=int(n - valid.sum()), names=names)


def standardize(train: np.ndarray, test: np.ndarray, *, clip: float | None = None) -> Standardized:
    """Standardize features with TRAINING statistics only: ``(x - mean_train) / sd_train``.

    NaN entries are imputed with the training mean of their column (so they become 0); a column that is constant
    on the training set gets ``scale = 1`` (it becomes 0 on train; test values keep their offset). With ``clip``
    the standardized values are clipped to ``[-clip, clip]``. Test data never enter the statistics.

    Args:
      train: ``(n, f)`` training features (valid rows only). test: ``(m, f)`` test features.
      clip: optional positive bound on the standardized values.

    Returns:
      :class:`Standardized` with float32 ``train`` ``(n, f)``, ``test`` ``(m, f)``, and float64 ``mean``,
      ``scale`` ``(f,)``. Columns that are NaN on the whole training set get mean 0.
    """
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 1:
        raise ValueError(f"train: expected a non-empty (n, f) array, got shape {train.shape}")
    if test.ndim != 2 or test.shape[1] != train.shape[1]:
        raise ValueError(f"test: expected shape (m, {train.shape[1]}), got {test.shape}")
    if clip is not None and not (isinstance(clip, int | float) and clip > 0):
        raise ValueError(f"clip: must be a positive number or None, got {clip!r}")
    observed = np.isfinite(train)
    count = observed.sum(axis=0)
    mean = np.where(observed, train, 0.0).sum(axis=0) / np.maximum(count, 1)
    centred = np.where(observed, train - mean, 0.0)
    sd = np.sqrt((centred**2).sum(axis=0) / np.maximum(count, 1))
    scale = np.where(sd > 0, sd, 1.0)

    def apply(a):
        z = np.where(np.isfinite(a), (a - mean) / scale, 0.0)
        if clip is not None:
            z = np.clip(z, -clip, clip)
        return z.astype(np.float32)

    return Standardized(train=apply(train), test=apply(test), mean=mean, scale=scale)


@functools.lru_cache(maxsize=64)
def _featurize_dataset_raw(dataset_name: str, name: str, n_bits: int) -> tuple[Features, Features]:
    from .datasets import load_dataset

    ds = load_dataset(dataset_name)
    out = []
    for smiles in (ds.smiles_train, ds.smiles_test):
        f = featurize(smiles, name, n_bits=n_bits)
        f.x.setflags(write=False)
        f.valid.setflags(write=False)
        out.append(f)
    return out[0], out[1]


def featurize_dataset(
    dataset_name: str, name: str, *, n_bits: int = 1024, log1p: bool = False
) -> tuple[Features, Features]:
    """Featurize a packaged dataset's train and test SMILES, cached in memory per (dataset, featurizer, n_bits).

    Nothing is written to disk; cached arrays are read-only (``log1p`` is applied to a copy).

    Args:
      dataset_name: one of :func:`qmis_jax.molecular.dataset_names`.
      name: one of :func:`featurizer_names`. n_bits, log1p: as in :func:`featurize`.

    Returns:
      ``(train_features, test_features)``.
    """
    _check_name(name)
    n_bits = _check_n_bits(n_bits)
    if log1p and name not in COUNT_FEATURIZERS:
        raise ValueError(f"log1p: only for count featurizers {COUNT_FEATURIZERS}, got name={name!r}")
    # n_bits does not change MACCS keys or descriptors: one cache entry for them.
    train, test = _featurize_dataset_raw(dataset_name, name, n_bits if name in COUNT_FEATURIZERS else 1)
    if log1p:
        train = train._replace(x=np.log1p(train.x))
        test = test._replace(x=np.log1p(test.x))
    return train, test
