"""The asymptotic MIS indicator (theory.md sections 2-6, 8, 9): sandwich covariances, post-training quantization
procedures and their events, competitors and loss gaps, rates and the indicator ``r_Q^n``, the asymptotic MIS with
its regime rule, single-model and population estimates, exact Gaussian-mean oracles and the exact loss-PTQ flip
probability of small models on fixed grids.

Theory only: it imports :mod:`qmis_jax.stats`, :mod:`qmis_jax.quantizers` and never :mod:`qmis_jax.attacks`.
"""

from .estimate import (
    PopulationAudit,
    SingleAudit,
    no_exponential_security,
    population_indicator,
    ptq_paths_batched,
    ptq_release,
    ptq_release_batched,
    single_model_indicator,
    single_model_indicator_batched,
)
from .events import EVENT_KINDS, EventSet
from .exact import (
    LossPtqFlip,
    gaussian_mean_fp_delta,
    gaussian_mean_gaps,
    gaussian_mean_mis_approximation,
    gaussian_mean_quantized_delta,
    loss_ptq_flip_exact,
)
from .margins import (
    LOSS_DIFFERENCE_METHODS,
    Moves,
    competitors,
    gap_stats,
    loss_differences,
    rtn_differences,
    rtn_margins,
)
from .mis import MIS_METHODS, MisApprox, mis_asymptotic
from .options import PTQ_METHODS, IndicatorOptions
from .ptq import DescentPath, descent_path, descent_path_batched, ptq_loss, ptq_loss_batched, ptq_rtn
from .rates import CramerRate, cramer_rate, gaussian_rate, indicator
from .regime import REGIME_THRESHOLD, asymptotic_regime
from .sandwich import (
    BIAS_MAX_P,
    estimator_bias,
    hessian_diag,
    per_sample_grads,
    sandwich_covariance,
    sandwich_covariance_batched,
    sandwich_covariance_flagged,
    sandwich_diagonal,
)

__all__ = [
    "BIAS_MAX_P",
    "CramerRate",
    "DescentPath",
    "EVENT_KINDS",
    "EventSet",
    "IndicatorOptions",
    "LOSS_DIFFERENCE_METHODS",
    "LossPtqFlip",
    "MIS_METHODS",
    "MisApprox",
    "Moves",
    "PTQ_METHODS",
    "PopulationAudit",
    "REGIME_THRESHOLD",
    "SingleAudit",
    "asymptotic_regime",
    "competitors",
    "cramer_rate",
    "descent_path",
    "descent_path_batched",
    "estimator_bias",
    "gap_stats",
    "gaussian_mean_fp_delta",
    "gaussian_mean_gaps",
    "gaussian_mean_mis_approximation",
    "gaussian_mean_quantized_delta",
    "gaussian_rate",
    "hessian_diag",
    "indicator",
    "loss_differences",
    "loss_ptq_flip_exact",
    "mis_asymptotic",
    "no_exponential_security",
    "per_sample_grads",
    "population_indicator",
    "ptq_loss",
    "ptq_loss_batched",
    "ptq_paths_batched",
    "ptq_release",
    "ptq_release_batched",
    "ptq_rtn",
    "rtn_differences",
    "rtn_margins",
    "sandwich_covariance",
    "sandwich_covariance_batched",
    "sandwich_covariance_flagged",
    "sandwich_diagonal",
    "single_model_indicator",
    "single_model_indicator_batched",
]
