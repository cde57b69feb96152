"""Model-ready arrays for the molecular study: featurize, drop invalid molecules, standardize, binarize."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .datasets import MolecularDataset, binarize, load_dataset
from .featurizers import COUNT_FEATURIZERS, featurize, featurize_dataset, featurizer_names, standardize

__all__ = ["MolecularData", "prepare"]

_TASKS = ("regression", "binary")


class MolecularData(NamedTuple):
    """Featurized train/test arrays ready for the replicate engine (float32, finite).

    Attributes:
      x_train: ``(n_train, f)`` float32 features. y_train: ``(n_train,)`` float32 targets: standardized with the
        training mean and standard deviation for regression (``info["y_mean"]``, ``info["y_scale"]``), 0/1 for
        binary tasks.
      x_test: ``(n_test, f)`` float32. y_test: ``(n_test,)`` float32, transformed with the TRAINING statistics.
      task: ``"regression"`` or ``"binary"``.
      n_invalid_train, n_invalid_test: molecules dropped because RDKit could not parse their SMILES.
      info: JSON-serialisable description: dataset record (name, target, source, split...), featurizer,
        ``n_bits``, ``log1p``, feature standardization and clip, ``y_mean``/``y_scale`` (regression: an RMSE on
        ``y`` times ``y_scale`` is the RMSE in the target's original units), class balance (binary), sizes.
      feature_names: the ``f`` feature names.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    n_invalid_train: int
    n_invalid_test: int
    info: dict[str, Any]
    feature_names: tuple[str, ...] = ()


def prepare(
    dataset_name: str | MolecularDataset,
    featurizer: str,
    *,
    task: str | None = None,
    binarize_threshold: float | None = None,
    positive_classes: tuple[str, ...] | None = None,
    n_bits: int = 1024,
    log1p: bool | None = None,
    standardize_features: bool | None = None,
    clip: float | None = 10.0,
) -> MolecularData:
    """Load, featurize and transform one packaged dataset for training.

    Steps: :func:`load_dataset`; for ``task="binary"``, :func:`binarize` (label ``1[y > threshold]``, threshold
    the median of the training targets unless given, or ``positive_classes`` for solubility's given classes);
    :func:`featurize_dataset` (cached in memory); invalid SMILES dropped and counted; features standardized with
    TRAINING statistics (:func:`standardize`, values clipped to ``[-clip, clip]``) where asked; regression targets
    standardized with the training mean and standard deviation.

    Args:
      dataset_name: one of :func:`qmis_jax.molecular.dataset_names` (featurized once and cached), or a
        regression :class:`MolecularDataset` of one's own (featurized on each call, not cached).
      featurizer: one of :func:`qmis_jax.molecular.featurizer_names`.
      task: ``"regression"`` or ``"binary"``; ``None`` -> ``"binary"`` if ``binarize_threshold`` or
        ``positive_classes`` is given, else ``"regression"``.
      binarize_threshold: binary cut in the target's original units (``None``: training median).
      positive_classes: given classes labelled 1 (datasets that ship classes).
      n_bits: fingerprint length for the count featurizers.
      log1p: ``log1p`` of counts; ``None`` -> True for count featurizers (tames the largest counts).
      standardize_features: ``None`` -> True for ``"rdkit2d"`` only (descriptors live on wildly different scales;
        fingerprints are kept as counts or bits).
      clip: bound on standardized features (``None``: no clipping); unused when features are not standardized.

    Returns:
      :class:`MolecularData`.
    """
    if featurizer not in featurizer_names():
        raise KeyError(f"unknown featurizer {featurizer!r}; valid names: {', '.join(featurizer_names())}")
    wants_binary = binarize_threshold is not None or positive_classes is not None
    if task is None:
        task = "binary" if wants_binary else "regression"
    if task not in _TASKS:
        raise ValueError(f"task: must be one of {_TASKS} or None, got {task!r}")
    if task == "regression" and wants_binary:
        raise ValueError(
            f"task: 'regression' takes no binarize_threshold / positive_classes, got {binarize_threshold!r} / "
            f"{positive_classes!r}"
        )
    if log1p is None:
        log1p = featurizer in COUNT_FEATURIZERS
    if standardize_features is None:
        standardize_features = featurizer == "rdkit2d"

    if isinstance(dataset_name, MolecularDataset):
        ds = dataset_name
        if ds.task != "regression":
            raise ValueError(f"dataset_name: expected a regression MolecularDataset, got task={ds.task!r}")
        f_train = featurize(ds.smiles_train, featurizer, n_bits=n_bits, log1p=bool(log1p))
        f_test = featurize(ds.smiles_test, featurizer, n_bits=n_bits, log1p=bool(log1p))
    else:
        ds = load_dataset(dataset_name)
        f_train, f_test = featurize_dataset(dataset_name, featurizer, n_bits=n_bits, log1p=bool(log1p))
    if len(ds.y_train) != len(f_train.valid) or len(ds.y_test) != len(f_test.valid):
        raise ValueError(f"dataset_name: {ds.name!r} has SMILES and targets of different lengths")
    if task == "binary":
        ds = binarize(ds, binarize_threshold, positive_classes=positive_classes)

    x_train, x_test = f_train.x[f_train.valid], f_test.x[f_test.valid]
    y_train = np.asarray(ds.y_train, dtype=np.float64)[f_train.valid]
    y_test = np.asarray(ds.y_test, dtype=np.float64)[f_test.valid]
    if x_train.shape[0] < 2:
        raise ValueError(f"dataset_name: {ds.name!r} has {x_train.shape[0]} valid training molecules")

    if standardize_features:
        st = standardize(x_train, x_test, clip=clip)
        x_train, x_test = st.train, st.test
    elif not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise ValueError(
            f"standardize_features: featurizer {featurizer!r} gives missing values; pass standardize_features=True "
            "so they are imputed with training statistics"
        )

    info: dict[str, Any] = {
        "dataset": ds.info(),
        "featurizer": featurizer,
        "n_bits": int(n_bits) if featurizer in COUNT_FEATURIZERS else None,
        "log1p": bool(log1p),
        "standardized_features": bool(standardize_features),
        "clip": float(clip) if (standardize_features and clip is not None) else None,
        "n_features": int(x_train.shape[1]),
        "n_train": int(x_train.shape[0]),
        "n_test": int(x_test.shape[0]),
        "n_invalid_train": int(f_train.n_invalid),
        "n_invalid_test": int(f_test.n_invalid),
    }
    if task == "regression":
        y_mean = float(y_train.mean())
        y_scale = float(y_train.std())
        if not y_scale > 0:
            raise ValueError(f"dataset_name: {ds.name!r} has constant training targets")
        y_train = (y_train - y_mean) / y_scale
        y_test = (y_test - y_mean) / y_scale
        info.update(y_mean=y_mean, y_scale=y_scale, y_transform="(y - y_mean) / y_scale, training statistics")
    else:
        info.update(
            y_mean=None,
            y_scale=None,
            positive_fraction_train=float(y_train.mean()),
            positive_fraction_test=float(y_test.mean()) if y_test.size else None,
        )
    return MolecularData(
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=y_train.astype(np.float32),
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=y_test.astype(np.float32),
        task=task,
        n_invalid_train=int(f_train.n_invalid),
        n_invalid_test=int(f_test.n_invalid),
        info=info,
        feature_names=f_train.names,
    )
