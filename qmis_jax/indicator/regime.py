"""The regime flag of the asymptotic MIS (theory.md section 5): whether ``mis_asymptotic`` can be read at all, from
``min_k sqrt(n) c_k``. Host-side NumPy."""

from __future__ import annotations

import numpy as np

__all__ = ["REGIME_THRESHOLD", "asymptotic_regime"]

# Derived from the exact Gaussian-mean tables: see asymptotic_regime's docstring and docs/theory.md section 5.
REGIME_THRESHOLD = 1.5


# --------------------------------------------------------------------------------------------------------------------
# Regime of the asymptotic MIS
# --------------------------------------------------------------------------------------------------------------------


def asymptotic_regime(sqrt_n_c_min, *, threshold: float = REGIME_THRESHOLD):
    """Whether the asymptotic MIS of section 5 can be read: ``min_k sqrt(n) c_k >= threshold`` (default 1.5).

    theory.md section 5. The criterion is derived from the exact Gaussian-mean values
    (:func:`~qmis_jax.indicator.gaussian_mean_quantized_delta` against
    :func:`~qmis_jax.indicator.gaussian_mean_mis_approximation`, 1-D grid of step 1, ``Z ~ N(mu, 1)``, one dominant
    competitor with ``c = 0.5 - |mu|`` and the other at ``0.5 + |mu|``)::

        sqrt(n) c_min   mu=0.2   mu=0.3   mu=0.4  mu=0.45  mu=0.48     (approximation / exact)
            0.25            --       --       --     0.26     0.26
            0.50            --       --     0.43     0.44     0.44
            0.75            --     0.57     0.56     0.56     0.56
            1.00          0.73     0.65     0.66     0.66     0.66
            1.25          0.74     0.72     0.72     0.72     0.72
            1.50          0.77     0.77     0.77     0.77     0.77
            1.75          0.81     0.81     0.81     0.81     0.81
            2.00          0.84     0.84     0.84     0.84     0.84
            2.50          0.88     0.89     0.89     0.89     0.89
            3.00          0.91     0.91     0.91     0.91       --
            4.00          0.95     0.95     0.95     0.95       --

    (entries at the ``n`` nearest the given ``sqrt(n) c``, ``n >= 10``). The ratio depends on ``sqrt(n) c_min``
    almost alone: at most 0.74 up to 1.25, at least 0.80 from 1.75 on (0.84 at 2, 0.95 at 4). The threshold 1.5
    sits in the middle of that transition (ratio 0.77): the flag is False wherever the approximation is more than
    30% under the exact value and True wherever it is within 20% of it, on this family, with room on both sides.

    With several competitors of comparable ``c_k`` the sum of section 5 over-counts and the ratio can exceed 1 in
    the regime (``mu = 0``, two equal competitors: 1.19 at ``n = 10``, 1.38 to 1.54 from ``n = 30`` on), or be
    accurate early by compensation (``mu = 0.1``, ``n = 10``: ``sqrt(n) c_min = 1.26``, ratio 0.98, flag False).
    The flag does not cover those (section 8); it says only that every event is rare enough for the Gaussian tail
    to mean something. Outside the regime the bracket of section 10 is the number to read.

    Args:
      sqrt_n_c_min: ``min_k sqrt(n) c_k`` (e.g. :attr:`~qmis_jax.indicator.MisApprox.sqrt_n_c_min`): a number or an
        array. NaN (no valid competitor, a continuous release) gives False.
      threshold: the criterion (keep the default unless re-deriving it).

    Returns:
      ``bool`` for a scalar input, a bool array otherwise.

    >>> asymptotic_regime(2.24), asymptotic_regime(0.45)
    (True, False)
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got threshold={threshold!r}")
    x = np.asarray(sqrt_n_c_min, dtype=np.float64)
    out = ~np.isnan(x) & (x >= threshold)
    return bool(out) if out.ndim == 0 else out
