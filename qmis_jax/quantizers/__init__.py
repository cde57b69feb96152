"""Post-training quantizers with straight-through gradients, codebook levels and decision thresholds.

Every quantizer is a frozen, hashable :class:`Quantizer` (usable as a static ``jax.jit`` argument). Calling it
quantizes a tensor; ``levels``, ``neighbors``, ``codes`` and ``thresholds`` expose the codebook needed by the
indicator of theory.md sections 3-6. Presets are listed by :func:`names` and built by :func:`get` (``NAME@FORMAT``
publishes the scale in ``f32``, ``bf16``, ``f16`` or ``e8m0``); :func:`release_info`, :func:`is_continuous` and
:func:`published` describe what a release publishes (section 9); :func:`tree_published` gives it as stored and
:func:`releases_differ` says whether two releases differ (section 10).
"""

from qmis_jax.quantizers._base import SCALE_CODE_BITS, SCALE_FORMATS, ContinuousQuantizer, LadderQuantizer, Quantizer
from qmis_jax.quantizers.binary import Sign, sign
from qmis_jax.quantizers.fp8 import FP8, fp8
from qmis_jax.quantizers.identity import Identity, identity
from qmis_jax.quantizers.mx import FP4, fp4
from qmis_jax.quantizers.prune import Prune, prune
from qmis_jax.quantizers.qwix import Qwix, from_qwix, from_qwix_rules, quantize_tree_qwix
from qmis_jax.quantizers.registry import get, names
from qmis_jax.quantizers.release import (
    Published,
    is_continuous,
    published,
    release_info,
    tree_scale_codes,
    tree_scale_margins,
)
from qmis_jax.quantizers.ternary import Ternary, ternary
from qmis_jax.quantizers.tree import (
    PublishedLeaf,
    published_differ,
    quantize_tree,
    releases_differ,
    tree_codes,
    tree_levels,
    tree_neighbors,
    tree_published,
    tree_thresholds,
)
from qmis_jax.quantizers.uniform import Uniform, size_adaptive, uniform

__all__ = [
    "FP4",
    "FP8",
    "SCALE_CODE_BITS",
    "SCALE_FORMATS",
    "ContinuousQuantizer",
    "Identity",
    "LadderQuantizer",
    "Prune",
    "Published",
    "PublishedLeaf",
    "Quantizer",
    "Qwix",
    "Sign",
    "Ternary",
    "Uniform",
    "fp4",
    "fp8",
    "from_qwix",
    "from_qwix_rules",
    "get",
    "identity",
    "is_continuous",
    "names",
    "prune",
    "published",
    "published_differ",
    "quantize_tree",
    "quantize_tree_qwix",
    "release_info",
    "releases_differ",
    "sign",
    "size_adaptive",
    "ternary",
    "tree_codes",
    "tree_levels",
    "tree_neighbors",
    "tree_published",
    "tree_scale_codes",
    "tree_scale_margins",
    "tree_thresholds",
    "uniform",
]
