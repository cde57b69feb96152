"""The generic statistical bottom layer that :mod:`qmis_jax.indicator` and :mod:`qmis_jax.attacks` both use:
Clopper-Pearson intervals, Hoeffding / empirical-Bernstein limits of a bounded mean, the paired bootstrap and the
arithmetic of the certified MIS bracket (theory.md sections 7 and 10).

It imports no other package of qmis_jax.
"""

from .bootstrap import PairedDiff, paired_bootstrap, rank_quantizers
from .bracket import MisBracket, SwapBound, bracket_levels, bracket_report, mis_bracket, swap_bound
from .intervals import clopper_pearson, mean_lower_limit

__all__ = [
    "MisBracket",
    "PairedDiff",
    "SwapBound",
    "bracket_levels",
    "bracket_report",
    "clopper_pearson",
    "mean_lower_limit",
    "mis_bracket",
    "paired_bootstrap",
    "rank_quantizers",
    "swap_bound",
]
