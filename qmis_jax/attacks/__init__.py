"""Membership-inference experiments (theory.md sections 1, 7 and 10): membership designs, LOSS, LiRA and RMIA, the
per-score helpers, metrics with held-out limits by replicate, and ROC-based bounds.

Experiment only: it imports :mod:`qmis_jax.stats` and never :mod:`qmis_jax.indicator`.
"""

from ._errors import AttackNotRun
from .designs import embedded_target_membership, loss_attack, pool_membership, score_from_loss, shadow_mask
from .heldout import HeldoutAdvantage, heldout_advantage, heldout_advantage_embedded
from .lira import (
    FIX_VARIANCE_BELOW,
    LiraFallbacks,
    LiraFit,
    LiraResult,
    fit_lira,
    lira,
    lira_fallbacks,
    lira_matrix,
    lira_metrics,
    lira_metrics_with_matrix,
    lira_pool,
    lira_scores,
)
from .metrics import (
    AttackMetrics,
    attack_metrics,
    attack_metrics_by_replicate,
    attack_metrics_embedded,
    not_run_dict,
    roc_curve,
)
from .rmia import RmiaResult, rmia, rmia_probability, rmia_scores, rmia_tune_a
from .roc import EpsilonBound, auc_convex_hull, epsilon_lower_bound, roc_convex_hull, tpr_at_fpr

__all__ = [
    "AttackMetrics",
    "AttackNotRun",
    "EpsilonBound",
    "FIX_VARIANCE_BELOW",
    "HeldoutAdvantage",
    "LiraFallbacks",
    "LiraFit",
    "LiraResult",
    "RmiaResult",
    "attack_metrics",
    "attack_metrics_by_replicate",
    "attack_metrics_embedded",
    "auc_convex_hull",
    "embedded_target_membership",
    "epsilon_lower_bound",
    "fit_lira",
    "heldout_advantage",
    "heldout_advantage_embedded",
    "lira",
    "lira_fallbacks",
    "lira_matrix",
    "lira_metrics",
    "lira_metrics_with_matrix",
    "lira_pool",
    "lira_scores",
    "loss_attack",
    "not_run_dict",
    "pool_membership",
    "rmia",
    "rmia_probability",
    "rmia_scores",
    "rmia_tune_a",
    "roc_convex_hull",
    "roc_curve",
    "score_from_loss",
    "shadow_mask",
    "tpr_at_fpr",
]
