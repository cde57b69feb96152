"""The one exception of the attacks that is not a bad input: an attack that cannot run at this size."""

from __future__ import annotations

__all__ = ["AttackNotRun"]


class AttackNotRun(ValueError):
    """An attack that cannot be run, or held out, at this size (theory.md sections 7 and 10).

    Raised when the design is too small for the attack's held-out split or its fits: fewer than 4 replicates or
    targets to split in halves, a selection half without both members and non-members, fewer than 2 evaluation
    replicates with both classes, or too few shadow replicates for LiRA's Gaussians or RMIA's references. These
    conditions depend on the sizes and the membership design only, never on the scores, so dropping such an attack
    from the bracket's Bonferroni count keeps the bracket valid. Its message is the reason the audit reports
    (``"ran": false, "reason": ...``).

    A subclass of ValueError: code that calls an attack directly still sees a ValueError. Malformed inputs (wrong
    shapes, NaN scores) raise a plain ValueError, never this.
    """
