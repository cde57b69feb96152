"""The indicator's settings as one frozen, hashable record (a static argument of the compiled estimators)."""

from __future__ import annotations

import dataclasses
from typing import Any

from qmis_jax._checks import one_of, positive_int

from .margins import LOSS_DIFFERENCE_METHODS as DIFFERENCE_METHODS
from .mis import MIS_METHODS
from .sandwich import hashable_skip

PTQ_METHODS = ("loss", "rtn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndicatorOptions:
    """How the indicator ``r_Q^n`` is estimated (theory.md sections 3-6); validated when built.

    Frozen and hashable: one compiled program per (quantizer, problem, options) and shape.

    Attributes:
      ptq: ``"loss"`` (loss-minimising PTQ, section 3(a)) or ``"rtn"`` (round-to-nearest, section 3(b)).
      method: ``"gaussian"`` or ``"cramer"`` rates (section 4).
      z: half-width of the single-model intervals, in standard errors (1.96: pointwise 95%).
      skip: leaves left in full precision (names, or a hashable callable); see
        :func:`qmis_jax.quantizers.quantize_tree`.
      max_sweeps: bound of the loss-PTQ sweeps (None: the default).
      chunk_size: competitors evaluated at once (None: all).
      cap: Cramer rate cap (None: ``log`` of the sample size, section 8).
      differences: ``"exact"`` loss differences, or the second-order ``"taylor"`` form (section 6, "Cost").
      start_descents: loss PTQ, single-model audit: how many round-to-nearest threshold crossings (those with the
        smallest ``m / s``) are descended to see whether their start leads elsewhere (theory.md section 3(a)); the
        others count as events unresolved, which can only lower ``r``. The population indicator descends every
        crossing that can matter.

    >>> IndicatorOptions(ptq="rtn").method
    'gaussian'
    >>> IndicatorOptions(ptq="nearest")
    Traceback (most recent call last):
    ...
    ValueError: ptq must be one of ('loss', 'rtn'), got ptq='nearest'
    """

    ptq: str = "loss"
    method: str = "gaussian"
    z: float = 1.96
    skip: Any = None
    max_sweeps: int | None = None
    chunk_size: int | None = None
    cap: float | None = None
    differences: str = "exact"
    start_descents: int = 4

    def __post_init__(self):
        one_of("ptq", self.ptq, PTQ_METHODS)
        one_of("method", self.method, MIS_METHODS)
        one_of("differences", self.differences, DIFFERENCE_METHODS)
        if isinstance(self.z, bool) or not isinstance(self.z, (int, float)) or not self.z >= 0:
            raise ValueError(f"z must be a number >= 0, got z={self.z!r}")
        positive_int("max_sweeps", self.max_sweeps, allow_none=True)
        positive_int("chunk_size", self.chunk_size, allow_none=True)
        if isinstance(self.start_descents, bool) or not isinstance(self.start_descents, int) or self.start_descents < 0:
            raise ValueError(f"start_descents must be a non-negative int, got start_descents={self.start_descents!r}")
        if self.cap is not None and not (isinstance(self.cap, (int, float)) and self.cap > 0):
            raise ValueError(f"cap must be a positive number or None, got cap={self.cap!r}")
        object.__setattr__(self, "z", float(self.z))
        object.__setattr__(self, "skip", hashable_skip(self.skip))

    def estimator_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~qmis_jax.indicator.single_model_indicator` these options stand for."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
