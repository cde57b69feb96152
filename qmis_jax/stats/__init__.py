"""MIS statistics (theory.md sections 2-7): sandwich covariances, post-training quantization procedures,
competitors and loss gaps, rates and the indicator ``r_Q^n``, the asymptotic MIS, single-model and population
estimates, exact Gaussian-mean oracles, membership-inference attacks and paired comparisons.
"""

from .attacks import (
    LiraFallbacks,
    LiraFit,
    LiraResult,
    embedded_target_membership,
    fit_lira,
    lira,
    lira_fallbacks,
    lira_pool,
    lira_scores,
    loss_attack,
    pool_membership,
    score_from_loss,
    shadow_mask,
)
from .bootstrap import PairedDiff, paired_bootstrap, rank_quantizers
from .estimate import (
    PTQ_METHODS,
    PopulationAudit,
    SingleAudit,
    population_indicator,
    single_model_indicator,
    single_model_indicator_batched,
)
from .exact import (
    gaussian_mean_fp_delta,
    gaussian_mean_gaps,
    gaussian_mean_mis_approximation,
    gaussian_mean_quantized_delta,
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
from .metrics import AttackMetrics, attack_metrics, clopper_pearson, roc_curve
from .mis import MIS_METHODS, MisApprox, mis_asymptotic
from .ptq import ptq_loss, ptq_rtn
from .rates import CramerRate, cramer_rate, gaussian_rate, indicator
from .rmia import RmiaResult, rmia, rmia_probability, rmia_scores, rmia_tune_a
from .roc import EpsilonBound, auc_convex_hull, epsilon_lower_bound, roc_convex_hull, tpr_at_fpr
from .sandwich import (
    hessian_diag,
    per_sample_grads,
    sandwich_covariance,
    sandwich_covariance_batched,
    sandwich_covariance_flagged,
    sandwich_diagonal,
)

__all__ = [
    "LOSS_DIFFERENCE_METHODS",
    "MIS_METHODS",
    "PTQ_METHODS",
    "AttackMetrics",
    "CramerRate",
    "EpsilonBound",
    "LiraFallbacks",
    "LiraFit",
    "LiraResult",
    "MisApprox",
    "Moves",
    "PairedDiff",
    "PopulationAudit",
    "RmiaResult",
    "SingleAudit",
    "attack_metrics",
    "auc_convex_hull",
    "clopper_pearson",
    "competitors",
    "cramer_rate",
    "embedded_target_membership",
    "epsilon_lower_bound",
    "fit_lira",
    "gap_stats",
    "gaussian_mean_fp_delta",
    "gaussian_mean_gaps",
    "gaussian_mean_mis_approximation",
    "gaussian_mean_quantized_delta",
    "gaussian_rate",
    "hessian_diag",
    "indicator",
    "lira",
    "lira_fallbacks",
    "lira_pool",
    "lira_scores",
    "loss_attack",
    "loss_differences",
    "mis_asymptotic",
    "paired_bootstrap",
    "per_sample_grads",
    "pool_membership",
    "population_indicator",
    "ptq_loss",
    "ptq_rtn",
    "rank_quantizers",
    "rmia",
    "rmia_probability",
    "rmia_scores",
    "rmia_tune_a",
    "roc_convex_hull",
    "roc_curve",
    "rtn_differences",
    "rtn_margins",
    "sandwich_covariance",
    "sandwich_covariance_batched",
    "sandwich_covariance_flagged",
    "sandwich_diagonal",
    "score_from_loss",
    "shadow_mask",
    "single_model_indicator",
    "single_model_indicator_batched",
    "tpr_at_fpr",
]
