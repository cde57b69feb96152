"""Post-training quantizers with straight-through gradients, codebook levels and decision thresholds.

Every quantizer is a frozen, hashable :class:`Quantizer` (usable as a static ``jax.jit`` argument). Calling it
quantizes a tensor; ``levels``, ``neighbors``, ``codes`` and ``thresholds`` expose the codebook needed by the
indicator of theory.md sections 3-6. Presets are listed by :func:`names` and built by :func:`get`.
"""

from qmis_jax.quantizers._base import ContinuousQuantizer, LadderQuantizer, Quantizer
from qmis_jax.quantizers.binary import Sign, sign
from qmis_jax.quantizers.fp8 import FP8, fp8
from qmis_jax.quantizers.identity import Identity, identity
from qmis_jax.quantizers.prune import Prune, prune
from qmis_jax.quantizers.qwix import Qwix, from_qwix, from_qwix_rules, quantize_tree_qwix
from qmis_jax.quantizers.registry import get, names
from qmis_jax.quantizers.ternary import Ternary, ternary
from qmis_jax.quantizers.tree import (
    quantize_tree,
    tree_codes,
    tree_levels,
    tree_neighbors,
    tree_thresholds,
)
from qmis_jax.quantizers.uniform import Uniform, size_adaptive, uniform

__all__ = [
    "FP8",
    "ContinuousQuantizer",
    "Identity",
    "LadderQuantizer",
    "Prune",
    "Quantizer",
    "Qwix",
    "Sign",
    "Ternary",
    "Uniform",
    "fp8",
    "from_qwix",
    "from_qwix_rules",
    "get",
    "identity",
    "names",
    "prune",
    "quantize_tree",
    "quantize_tree_qwix",
    "sign",
    "size_adaptive",
    "ternary",
    "tree_codes",
    "tree_levels",
    "tree_neighbors",
    "tree_thresholds",
    "uniform",
]
