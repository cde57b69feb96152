"""Membership-inference attacks that play the game of theory.md section 1: LOSS and LiRA.

Convention: every attack returns scores where a higher score means "more likely a member"; feed the member and
non-member scores to :func:`qmis_jax.attacks.attack_metrics`.

Designs (theory.md section 7):

* **Fresh-data design** (:func:`loss_attack`): replicate ``r`` trains on ``n`` fresh points; its members are those
  points, its non-members ``n`` further fresh points. A global threshold on the loss is then an attack in the
  section-1 game, so its advantage lower-bounds ``Delta``.
* **Embedded-target design** (:func:`lira`, :func:`embedded_target_membership`): ``T = 2k`` fixed target points,
  each replicate trains on a random half of them plus ``n - k`` fresh points. Per-target Gaussian fits of the
  statistic on shadow replicates calibrate a likelihood-ratio test (Carlini et al. 2022, "Membership Inference
  Attacks From First Principles") evaluated on held-out replicates; the game stays that of section 1.
* **Pool design** (:func:`lira_pool`, :func:`pool_membership`): a different game, see there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import AttackNotRun
from .metrics import attack_metrics, attack_metrics_embedded

__all__ = [
    "FIX_VARIANCE_BELOW",
    "LiraFallbacks",
    "LiraFit",
    "LiraResult",
    "fit_lira",
    "lira",
    "lira_fallbacks",
    "lira_matrix",
    "lira_metrics",
    "lira_metrics_with_matrix",
    "lira_pool",
    "lira_scores",
]

Array = jax.Array


class LiraFit(NamedTuple):
    """Per-target Gaussian fits of the LiRA statistic on shadow replicates (theory.md section 7).

    Attributes (each ``(T,)``, or with the leading batch axes of the scores under ``vmap``):
      mu_in, var_in: mean and variance of the statistic over shadow replicates that trained on the target.
      mu_out, var_out: the same over shadow replicates that did not.
      n_in, n_out: the number of shadow replicates behind each fit; where one is below 2, part of the fit comes
        from all targets together (:func:`fit_lira`, :func:`lira_fallbacks`).
    """

    mu_in: Array
    var_in: Array
    mu_out: Array
    var_out: Array
    n_in: Array
    n_out: Array


def _side_fit(scores: Array, weights: Array, fix_variance: bool) -> tuple[Array, Array, Array, Array]:
    """Per-target mean, variance and count of one side, and the mean of all its scores (all targets together).

    The variance is the target's own unbiased one where it has >= 2 scores (unless ``fix_variance``), else the
    pooled within-target variance of the side.
    """
    count = weights.sum(axis=0)
    mean = (weights * scores).sum(axis=0) / jnp.maximum(count, 1.0)
    ss = (weights * (scores - mean[None, :]) ** 2).sum(axis=0)
    dof = jnp.maximum(count - 1.0, 0.0)
    pooled = ss.sum() / jnp.maximum(dof.sum(), 1.0)
    own = ss / jnp.maximum(dof, 1.0)
    var = jnp.broadcast_to(pooled, mean.shape) if fix_variance else jnp.where(count >= 2, own, pooled)
    global_mean = (weights * scores).sum() / jnp.maximum(count.sum(), 1.0)
    return mean, var, count, global_mean


@functools.partial(jax.jit, static_argnames=("fix_variance",))
def fit_lira(scores, membership, *, shadow, fix_variance: bool = False) -> LiraFit:
    """Fit LiRA's per-target in/out Gaussians on the shadow replicates (Carlini et al. 2022; section 7).

    For target ``t``, ``mu_in[t]`` and ``var_in[t]`` are the sample mean and unbiased variance of
    ``scores[r, t]`` over shadow replicates ``r`` with ``membership[r, t]``; ``mu_out``/``var_out`` over shadow
    replicates without it. With ``fix_variance=True`` every target shares one variance per side: the pooled
    within-target variance ``sum_t sum_r (s_rt - mu_t)^2 / sum_t (count_t - 1)`` (the global-variance variant,
    better with few shadows).

    With few shadows some targets lack scores on one side (every shadow replicate trains on a target or not, so
    ``n_in + n_out`` is the number of shadows); following Carlini et al. 2022 the missing pieces come from
    estimates over all targets, so every target gets a fit (:func:`lira_fallbacks` counts them):

    * one shadow score on a side: its mean is that score, its variance the pooled variance of the side;
    * no score on one side: that side is the other side moved by the global gap ``shift``, the mean of
      ``mu_in - mu_out`` over the targets with scores on both sides (free of the targets' own levels; the mean of
      all in-scores minus that of all out-scores where no target has both), with the other side's variance
      (``mu_in = mu_out + shift``, ``var_in = var_out`` without in-scores). The likelihood ratio is then
      ``shift * (s - mu_out) / var_out - shift^2 / (2 var_out)``: the offline test of the out-fit, increasing in
      ``(s - mu_out) / sd_out`` whenever members score higher on average, on the scale of the other targets'
      ratios so that one threshold serves them all; symmetrically without out-scores.

    Variances are floored at ``sqrt(tiny)`` of the dtype so a constant statistic does not divide by zero. Jitted
    (``fix_variance`` static) and vmap-friendly: masks enter as weights. The pooled variance of a side needs one
    target with >= 2 scores there; :func:`lira` checks that, this core does not.

    Args:
      scores: ``(R, T)`` statistic of each replicate's release on each target (:func:`score_from_loss`).
      membership: ``(R, T)`` bool, target in the replicate's training set.
      shadow: ``(R,)`` bool, which replicates are shadows.
      fix_variance: share one variance per side across targets.

    Returns:
      :class:`LiraFit` with ``(T,)`` fields.

    >>> member = jnp.array([[True, False], [False, True], [True, False], [True, False], [False, True]])
    >>> scores = jnp.array([[1.0, 0.0], [0.0, 4.0], [3.0, 1.0], [5.0, 2.0], [9.0, 9.0]])
    >>> fit = fit_lira(scores, member, shadow=jnp.array([True, True, True, True, False]))
    >>> fit.n_in.tolist(), fit.n_out.tolist()
    ([3.0, 1.0], [1.0, 3.0])
    >>> fit.mu_in.tolist(), fit.var_in.tolist()  # target 1 has one in-score: the pooled in-variance
    ([3.0, 4.0], [4.0, 4.0])
    """
    scores = jnp.asarray(scores)
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        scores = scores.astype(jnp.result_type(float))
    member = jnp.asarray(membership, dtype=bool)
    sh = jnp.asarray(shadow, dtype=bool)[:, None]
    mu_in, var_in, n_in, g_in = _side_fit(scores, (sh & member).astype(scores.dtype), fix_variance)
    mu_out, var_out, n_out, g_out = _side_fit(scores, (sh & ~member).astype(scores.dtype), fix_variance)
    has_in, has_out = n_in > 0, n_out > 0
    both = (has_in & has_out).astype(scores.dtype)
    paired = (both * (mu_in - mu_out)).sum() / jnp.maximum(both.sum(), 1.0)
    shift = jnp.where(both.sum() > 0, paired, g_in - g_out)
    mu_in, var_in, mu_out, var_out = (
        jnp.where(has_in, mu_in, mu_out + shift),
        jnp.where(has_in, var_in, var_out),
        jnp.where(has_out, mu_out, mu_in - shift),
        jnp.where(has_out, var_out, var_in),
    )
    floor = jnp.sqrt(jnp.finfo(scores.dtype).tiny)
    return LiraFit(mu_in, jnp.maximum(var_in, floor), mu_out, jnp.maximum(var_out, floor), n_in, n_out)


@functools.partial(jax.jit, static_argnames=("online",))
def lira_scores(scores, fit: LiraFit, *, online: bool = True) -> Array:
    """LiRA test statistic of every (replicate, target) pair given the shadow fits (Carlini et al. 2022).

    * Online: the Gaussian log-likelihood ratio
      ``log N(s; mu_in, var_in) - log N(s; mu_out, var_out)``.
    * Offline (out-fits only): the one-sided test of ``s`` against ``N(mu_out, var_out)``, returned as the
      standardised statistic ``(s - mu_out) / sqrt(var_out)``. It is an increasing function of the paper's
      ``Phi((s - mu_out) / sd_out)`` applied identically to every target, so any pooled threshold, hence the ROC and
      every metric, is the same, without the saturation of ``Phi`` near 1 in floating point.

    Entries of shadow replicates are in-sample (they entered the fits); evaluate only the others.

    Args:
      scores: ``(R, T)`` statistic (any leading shape broadcasting against the ``(T,)`` fits).
      fit: :class:`LiraFit` from :func:`fit_lira`.
      online: use the in-fits (likelihood ratio) or only the out-fits (one-sided test).

    Returns:
      ``(R, T)`` array; higher = more likely a member.
    """
    s = jnp.asarray(scores)
    row = (None,) * (s.ndim - 1)  # the fit is per target: broadcast it over the replicate axis explicitly
    z_out = (s - fit.mu_out[row]) / jnp.sqrt(fit.var_out)[row]
    if not online:
        return z_out
    z_in = (s - fit.mu_in[row]) / jnp.sqrt(fit.var_in)[row]
    return 0.5 * (z_out**2 - z_in**2) + 0.5 * (jnp.log(fit.var_out) - jnp.log(fit.var_in))[row]


@functools.partial(jax.jit, static_argnames=("online", "fix_variance"))
def _lira_matrix(scores, membership, shadow, online, fix_variance):
    fit = fit_lira(scores, membership, shadow=shadow, fix_variance=fix_variance)
    return lira_scores(scores, fit, online=online)


class LiraFallbacks(NamedTuple):
    """How many targets LiRA scored with a fit partly taken from all targets (:func:`fit_lira`).

    Each target is counted once, under the larger of its fallbacks.

    Attributes:
      targets: number of targets ``T``.
      pooled_variance: targets with exactly one shadow score on a side the test uses, whose variance there is the
        pooled one (never counted with ``fix_variance=True``, which pools every target).
      one_sided: targets with no shadow score on a side the test uses, fitted from the other side and the global
        in/out gap (online: no in- or no out-score; offline: no out-score).
    """

    targets: int
    pooled_variance: int
    one_sided: int

    def to_dict(self) -> dict[str, int]:
        """JSON-friendly dict of the three counts."""
        return {k: int(v) for k, v in self._asdict().items()}


class LiraResult(NamedTuple):
    """Scores of :func:`lira` split by the true membership, with the fallback counts of the fit.

    Attributes:
      member_scores: 1-D scores of the evaluation pairs with membership, in row-major (replicate, target) order.
      nonmember_scores: the same without membership.
      fallbacks: the :class:`LiraFallbacks` of the fit.
    """

    member_scores: Array
    nonmember_scores: Array
    fallbacks: LiraFallbacks


def _check_design(shape: tuple[int, ...], membership, shadow) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of ``membership (R, T)`` and ``shadow (R,)``, checked against the scores' ``shape``."""
    member = np.asarray(membership)
    sh = np.asarray(shadow)
    if len(shape) != 2:
        raise ValueError(f"scores must have shape (R, T), got shape {shape}")
    if member.shape != shape:
        raise ValueError(f"membership must have the shape of scores {shape}, got {member.shape}")
    if member.dtype != bool:
        raise ValueError(f"membership must be a bool array, got dtype {member.dtype}")
    if sh.shape != (shape[0],) or sh.dtype != bool:
        raise ValueError(f"shadow must be a ({shape[0]},) bool array, got {sh.dtype} array of shape {sh.shape}")
    return member, sh


def _count_fallbacks(member: np.ndarray, sh: np.ndarray, online: bool, fix_variance: bool) -> LiraFallbacks:
    n_in = (member & sh[:, None]).sum(axis=0)
    n_out = (~member & sh[:, None]).sum(axis=0)
    one_sided = (n_out == 0) | ((n_in == 0) if online else False)
    single = (n_out == 1) | ((n_in == 1) if online else False)
    pooled = single & ~one_sided if not fix_variance else np.zeros_like(single)
    return LiraFallbacks(int(member.shape[1]), int(pooled.sum()), int(one_sided.sum()))


def lira_fallbacks(membership, *, shadow, online: bool = True, fix_variance: bool = False) -> LiraFallbacks:
    """Count the targets whose LiRA fit falls back on estimates over all targets (few shadows; :func:`fit_lira`).

    Depends only on the design, so it can be called before training to see what a number of shadows gives:
    with ``S`` shadows a target has ``n_in ~ Binomial(S, 1/2)`` in-shadows and ``S - n_in`` out-shadows.

    Args:
      membership: ``(R, T)`` bool, target in the replicate's training set.
      shadow: ``(R,)`` bool, which replicates are shadows.
      online: count the sides of the online test (both) or of the offline one (out only).
      fix_variance: as in :func:`lira`; pooled variances are then not counted as fallbacks.

    Returns:
      :class:`LiraFallbacks` (Python ints).

    >>> member = jnp.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]], dtype=bool)
    >>> shadow = jnp.array([True, True, True, False])  # target 0: 3 in, 0 out; the others: 1 in, 2 out
    >>> lira_fallbacks(member, shadow=shadow)
    LiraFallbacks(targets=4, pooled_variance=3, one_sided=1)
    >>> lira_fallbacks(member, shadow=shadow, online=False)
    LiraFallbacks(targets=4, pooled_variance=0, one_sided=1)
    """
    shape = np.shape(membership)
    if len(shape) != 2:
        raise ValueError(f"membership must have shape (R, T), got shape {shape}")
    member, sh = _check_design(shape, membership, shadow)
    return _count_fallbacks(member, sh, bool(online), bool(fix_variance))


def lira(scores, membership, *, shadow, online: bool = True, fix_variance: bool = False) -> LiraResult:
    """LiRA in the embedded-target design: fit on shadow replicates, score the held-out ones (section 7).

    Per-target Gaussians of the statistic are fitted on the shadow replicates (:func:`fit_lira`); every pair
    (evaluation replicate ``r``, target ``t``) is scored by :func:`lira_scores`, and the scores are split by the
    true membership. In the embedded-target design the result is a section-1 attack, so the advantage of these
    scores lower-bounds ``Delta``. Use :func:`fit_lira` and :func:`lira_scores` directly under ``jit``/``vmap``
    (this wrapper validates and returns data-dependent sizes).

    With few shadows, targets with fewer than two in- or out-shadows take part of their fit from all targets
    (Carlini et al. 2022's global variance, and the offline test where a side is empty; :func:`fit_lira`); their
    number is ``result.fallbacks`` (:class:`LiraFallbacks`), to be reported with the metrics.

    Args:
      scores: ``(R, T)`` statistic of each replicate's release on each target (:func:`score_from_loss`).
      membership: ``(R, T)`` bool, target in the replicate's training set
        (:func:`embedded_target_membership`).
      shadow: ``(R,)`` bool, which replicates are shadows (:func:`shadow_mask`); the others are evaluated.
      online: likelihood ratio of in- and out-fits (needs some target with >= 2 in-shadows and some target with
        >= 2 out-shadows, for the pooled variances), or the offline one-sided test on the out-fits only (needs
        some target with >= 2 out-shadows).
      fix_variance: one pooled variance per side instead of per-target variances (few shadows).

    Returns:
      :class:`LiraResult`, the pair ``(member_scores, nonmember_scores)``: 1-D arrays over the evaluation pairs
      with and without membership, in row-major (replicate, target) order; ``.fallbacks`` counts the targets
      fitted with a fallback.

    Raises:
      AttackNotRun: when every replicate is a shadow, or when no target has two shadow scores on a side the test
        needs (fewer than two shadows, for instance): the design is too small for the fits.
      ValueError: on malformed inputs.
    """
    lr, member, sh, fallbacks = lira_matrix(scores, membership, shadow=shadow, online=online, fix_variance=fix_variance)
    ev_member, ev_lr = member[~sh], lr[~sh]
    return LiraResult(jnp.asarray(ev_lr[ev_member]), jnp.asarray(ev_lr[~ev_member]), fallbacks)


def lira_matrix(scores, membership, *, shadow, online: bool = True, fix_variance: bool = False):
    """LiRA's statistic for every (replicate, target) pair, with the design checked once (as in :func:`lira`).

    Args:
      scores, membership, shadow, online, fix_variance: as in :func:`lira`.

    Returns:
      ``(matrix, membership, shadow, fallbacks)``: the ``(R, T)`` statistic (shadow rows are in-sample), the
      membership ``(R, T)`` and shadow ``(R,)`` masks as NumPy bools, and the :class:`LiraFallbacks`.

    Raises:
      ValueError: as :func:`lira`.
    """
    scores = jnp.asarray(scores)
    member, sh = _check_design(scores.shape, membership, shadow)
    if not bool(jnp.all(jnp.isfinite(scores))):
        raise ValueError("scores must be finite (use score_from_loss, which keeps them finite)")
    if sh.all():
        raise AttackNotRun("shadow: no evaluation replicate left (all replicates are shadows)")
    n_in = (member & sh[:, None]).sum(axis=0)
    n_out = (~member & sh[:, None]).sum(axis=0)
    if online and n_in.max() < 2:
        raise AttackNotRun(
            f"shadow: no target has >= 2 in-shadow replicates to estimate a variance from (most: {int(n_in.max())}, "
            f"with {int(sh.sum())} shadow(s)); use more shadows, or online=False for the offline test"
        )
    if n_out.max() < 2:
        raise AttackNotRun(
            f"shadow: no target has >= 2 out-shadow replicates to estimate a variance from (most: "
            f"{int(n_out.max())}, with {int(sh.sum())} shadow(s)); use more shadows"
        )
    lr = np.asarray(_lira_matrix(scores, jnp.asarray(member), jnp.asarray(sh), bool(online), bool(fix_variance)))
    return lr, np.asarray(member), np.asarray(sh), _count_fallbacks(member, sh, bool(online), bool(fix_variance))


def lira_pool(scores, membership, *, shadow, online: bool = True, fix_variance: bool = False) -> LiraResult:
    """LiRA in the classic pool design (theory.md section 7): a different game, reported as ``lira_pool``.

    Same computation as :func:`lira`, on scores of a fixed pool of points where each replicate trains on a random
    half (:func:`pool_membership`) and on nothing else. That game is membership *within a fixed pool*; the release
    varies less than with fresh data, so this advantage can exceed ``Delta`` and **bounds nothing** about the MIS.
    Offered only for comparison with other tools; never feed it into ``mis_empirical_upper``.

    Args:
      scores: ``(R, P)`` statistic of each replicate's release on each pool point.
      membership: ``(R, P)`` bool from :func:`pool_membership`.
      shadow: ``(R,)`` bool, which replicates are shadows.
      online: as in :func:`lira`.
      fix_variance: as in :func:`lira`.

    Returns:
      :class:`LiraResult` as in :func:`lira` (the pair of scores, with ``.fallbacks``).
    """
    return lira(scores, membership, shadow=shadow, online=online, fix_variance=fix_variance)


FIX_VARIANCE_BELOW = 64


def lira_metrics_with_matrix(
    key: Array,
    scores,
    membership,
    *,
    shadow,
    online: bool = True,
    pool: bool = False,
    bound_level=None,
) -> tuple[dict, np.ndarray]:
    """LiRA on one quantizer's scores -> the :meth:`~qmis_jax.attacks.AttackMetrics.to_dict` dictionary, with the
    fallback counts of the fit, and the ``(R, T)`` statistic of every pair (:func:`lira_matrix`).

    Embedded-target design (section-1 game): the held-out advantage and its one-sided bound are by replicate and
    target (:func:`~qmis_jax.attacks.attack_metrics_embedded`). Pool design (``pool=True``, a different game): the
    held-out split is by pair and every figure is descriptive (theory.md section 7). Below ``FIX_VARIANCE_BELOW``
    shadow replicates every target shares one variance per side (Carlini et al. 2022 do the same with few shadow
    models: per-target variances from a handful of scores hurt the test).

    Args:
      key: PRNG key of the metrics' held-out split.
      scores: ``(R, T)`` statistics of every replicate's release on the targets (higher = member).
      membership: ``(R, T)`` bool, target ``t`` is in replicate ``r``'s training set.
      shadow: ``(R,)`` bool, the replicates the Gaussians are fitted on (the others are attacked).
      online: fit both sides (online LiRA) or only the non-member side (offline).
      pool: the pool design.
      bound_level: one-sided level of ``advantage_bound`` (theory.md section 10: ``bracket_levels(J)[1]``).

    Returns:
      ``(metrics, matrix)``: the metrics' dictionary and the ``(R, T)`` statistic.
    """
    fix = int(np.sum(np.asarray(shadow))) < FIX_VARIANCE_BELOW
    lr, member, sh, fallbacks = lira_matrix(scores, membership, shadow=shadow, online=online, fix_variance=fix)
    ev_lr, ev_member = lr[~sh], member[~sh]
    if pool:
        pair = jnp.asarray(ev_lr[ev_member]), jnp.asarray(ev_lr[~ev_member])
        metrics = attack_metrics(key, *pair, bound_level=bound_level)
    else:
        metrics = attack_metrics_embedded(key, ev_lr, ev_member, bound_level=bound_level)
    out = metrics.to_dict()
    out["fallbacks"] = fallbacks.to_dict()
    out["fixed_variance"] = fix
    return out, lr


def lira_metrics(
    key: Array, scores, membership, *, shadow, online: bool = True, pool: bool = False, bound_level=None
) -> dict:
    """:func:`lira_metrics_with_matrix` without the matrix: the metrics' dictionary with the fallback counts."""
    return lira_metrics_with_matrix(
        key, scores, membership, shadow=shadow, online=online, pool=pool, bound_level=bound_level
    )[0]
