"""RMIA (Zarifzadeh et al., ICML 2024, "Low-Cost High-Power Membership Inference Attacks") in the embedded-target
design (theory.md section 7), online and offline, sharing LiRA's shadow replicates.

For a release ``theta`` and a point ``x`` let ``p_theta(x)`` be the model's probability of ``x``'s true label (any
positive "likelihood" works; for regression use ``p = exp(-loss)``, see :func:`rmia_probability`). RMIA compares the
likelihood ratio of the target against population points ``z``::

    LR_theta(x) = p_theta(x) / p_ref(x),       score(x) = Pr_z[ LR_theta(x) / LR_theta(z) > gamma ],

where ``p_ref`` is the mean of ``p`` over reference models (here: the shadow replicates) and ``z`` runs over
population points drawn fresh from the data law (never in any training set), shared by all replicates. In the
embedded-target design every replicate trains on a random half of the ``T`` fixed targets plus fresh points, so
every target is IN about half of the shadows: the attack plays the section-1 game and its held-out advantage is a
lower bound on ``Delta``, like LiRA's.

* **Online**: ``p_ref(x) = (mean_IN p(x) + mean_OUT p(x)) / 2`` over the shadows that did / did not train on ``x``
  (the paper's ``Pr(x) = (Pr(x | IN) + Pr(x | OUT)) / 2``; a side without shadows falls back on the other side).
  For ``z``, every shadow is OUT and ``p_ref(z)`` is the mean over all shadows.
* **Offline** (OUT models only): the paper's linear approximation of the IN/OUT average from OUT models,
  ``p_ref(x) = ((1 + a) mean_OUT p(x) + (1 - a)) / 2`` for targets and population points alike (targets without an
  OUT shadow use their IN mean: counted in ``.fallbacks``). ``a`` in ``[0, 1]`` says how much of the missing IN mass
  the OUT mean predicts: ``a = 1`` uses the OUT mean alone; smaller ``a`` pulls ``p_ref`` towards 1/2, which damps
  the ratio of points the OUT models already fit well. The paper tunes ``a`` by attacking one reference model with
  the others; :func:`rmia` does the same with ``a="auto"`` (default): every shadow in turn is attacked with the
  remaining shadows as references (leave-one-out), and the ``a`` of the grid ``0, 0.1, ..., 1`` with the largest
  pooled AUC is used on the evaluation replicates (:func:`rmia_tune_a`). It uses shadows only, so the evaluation
  stays held out. For likelihoods that are not probabilities (densities, ``exp(-loss)`` of a large loss) the
  ``(1 - a)`` term has no meaning and the tuning picks ``a`` near 1.

Scores are counts ``#{z : LR(x) > gamma LR(z)}`` divided by the number of ``z``, computed in the log domain
(``log LR``) by sorting the ``z`` ratios of each replicate: ``O(R (Z + T) log Z)``, no ``(T, Z)`` matrix.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._errors import AttackNotRun
from .lira import LiraFallbacks, _check_design

__all__ = ["A_GRID", "RmiaResult", "rmia", "rmia_counts", "rmia_probability", "rmia_scores", "rmia_tune_a"]

Array = jax.Array

#: Grid of the offline scaling parameter searched by ``a="auto"``.
A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def rmia_probability(loss, *, task: str = "binary") -> Array:
    """RMIA's per-example likelihood ``p = exp(-loss)``, returned as ``log p = -loss`` (theory.md section 7).

    * ``task="binary"`` (or any log loss): ``loss = -log p_correct``, so ``exp(-loss)`` is the probability of the
      true label, the quantity of the paper.
    * ``task="regression"`` (squared loss ``l``): ``exp(-l)`` is the Gaussian likelihood of the target up to a
      constant factor (which cancels in ``LR``); it is not a probability, so prefer the online attack, or the
      offline one with ``a="auto"``, which then chooses ``a`` close to 1.

    Pass the result to :func:`rmia` with ``log=True``; working with ``log p`` avoids the underflow of
    ``exp(-loss)`` for large losses.

    Args:
      loss: per-example losses, any shape.
      task: ``"binary"`` or ``"regression"`` (``Problem.task``), for validation and documentation.

    Returns:
      ``-loss`` as a floating array.
    """
    if task not in ("binary", "regression"):
        raise ValueError(f"task must be 'binary' or 'regression', got task={task!r}")
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        loss = loss.astype(jnp.result_type(float))
    return -loss


def _log_mean(logp: Array, weights: Array, axis: int = 0) -> tuple[Array, Array]:
    """``log`` of the weighted mean of ``exp(logp)`` along ``axis`` (0/1 weights) and the weight count."""
    count = weights.sum(axis=axis)
    masked = jnp.where(weights > 0, logp, -jnp.inf)
    top = jnp.max(masked, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.sum(weights * jnp.exp(logp - top), axis=axis)
    return jnp.log(total) - jnp.log(jnp.maximum(count, 1.0)) + jnp.squeeze(top, axis), count


def _offline_ref(log_out: Array, a) -> Array:
    """``log(((1 + a) exp(log_out) + (1 - a)) / 2)``, stable for any ``log_out`` and ``a`` in ``[0, 1]``."""
    a = jnp.asarray(a, log_out.dtype)
    lo = jnp.log((1.0 + a) / 2.0) + log_out
    hi = jnp.where(a < 1, jnp.log(jnp.maximum((1.0 - a) / 2.0, jnp.finfo(log_out.dtype).tiny)), -jnp.inf)
    return jnp.logaddexp(lo, hi)


def _references(logp_x, logp_z, member, shadow, online: bool, a):
    """``(log p_ref(x) (T,), log p_ref(z) (Z,))`` from the shadow rows (see the module docstring)."""
    dt = logp_x.dtype
    sh = shadow[:, None]
    log_in, n_in = _log_mean(logp_x, (sh & member).astype(dt))
    log_out, n_out = _log_mean(logp_x, (sh & ~member).astype(dt))
    log_z, _ = _log_mean(logp_z, jnp.broadcast_to(sh, logp_z.shape).astype(dt))
    if online:
        both = jnp.logaddexp(log_in, log_out) - jnp.log(2.0)
        ref_x = jnp.where(n_in == 0, log_out, jnp.where(n_out == 0, log_in, both))
        return ref_x, log_z
    ref_x = jnp.where(n_out == 0, log_in, _offline_ref(log_out, a))
    return ref_x, _offline_ref(log_z, a)


def rmia_counts(log_lr_x, log_lr_z, *, gamma=1.0) -> Array:
    """``#{z : LR(x) > gamma LR(z)}`` for every target of every replicate, from log likelihood ratios.

    Args:
      log_lr_x: ``(R, T)`` ``log LR`` of the targets under each replicate's release.
      log_lr_z: ``(R, Z)`` ``log LR`` of the population points under the same releases.
      gamma: the paper's threshold on the pairwise ratio (> 0).

    Returns:
      ``(R, T)`` int32 counts in ``0..Z``.

    >>> rmia_counts(jnp.log(jnp.array([[2.0, 0.5]])), jnp.log(jnp.array([[1.0, 0.25, 4.0]]))).tolist()
    [[2, 1]]
    """
    shifted = jnp.sort(jnp.asarray(log_lr_z) + jnp.log(jnp.asarray(gamma, jnp.asarray(log_lr_z).dtype)), axis=-1)
    return jax.vmap(lambda zs, xs: jnp.searchsorted(zs, xs, side="left"))(shifted, jnp.asarray(log_lr_x)).astype(
        jnp.int32
    )


@functools.partial(jax.jit, static_argnames=("online",))
def rmia_scores(log_px, log_pz, membership, shadow, *, online: bool = True, a=1.0, gamma=1.0) -> Array:
    """RMIA score of every (replicate, target) pair, references taken from the shadow rows (jit/vmap core).

    ``score = #{z : LR(x) > gamma LR(z)} / Z`` with ``LR = p / p_ref`` and ``p_ref`` as in the module docstring.
    Entries of shadow rows are in-sample (their own ``p`` entered ``p_ref``); evaluate only the other rows.

    Args:
      log_px: ``(R, T)`` log-likelihood ``log p`` of each target under each replicate's release.
      log_pz: ``(R, Z)`` the same for the population points (fresh, in no training set).
      membership: ``(R, T)`` bool, target in the replicate's training set.
      shadow: ``(R,)`` bool, the reference replicates.
      online: IN and OUT references, or OUT only with the linear approximation.
      a: offline scaling parameter in ``[0, 1]`` (ignored online).
      gamma: threshold on ``LR(x) / LR(z)`` (> 0).

    Returns:
      ``(R, T)`` scores in ``[0, 1]``; higher = more likely a member.
    """
    log_px = jnp.asarray(log_px)
    log_pz = jnp.asarray(log_pz, log_px.dtype)
    member = jnp.asarray(membership, bool)
    sh = jnp.asarray(shadow, bool)
    ref_x, ref_z = _references(log_px, log_pz, member, sh, online, a)
    # p = 0 under the release and every reference gives 0 / 0: no evidence, the lowest ratio
    diffs = (log_px - ref_x[None, :], log_pz - ref_z[None, :])  # references per target (point), over replicates
    lr_x, lr_z = (jnp.where(jnp.isnan(v), -jnp.inf, v) for v in diffs)
    counts = rmia_counts(lr_x, lr_z, gamma=gamma)
    return counts.astype(log_px.dtype) / log_pz.shape[-1]


def _auc_from_counts(counts: Array, member: Array, weight: Array, size: int) -> Array:
    """Mann-Whitney AUC of integer scores in ``0..size`` (ties count one half), pairs weighted by ``weight``."""
    wm = (weight * member).ravel()
    wn = (weight * ~member).ravel()
    c = counts.ravel()
    hist_m = jnp.zeros(size + 1, wm.dtype).at[c].add(wm)
    hist_n = jnp.zeros(size + 1, wn.dtype).at[c].add(wn)
    below_n = jnp.cumsum(hist_n) - hist_n
    num = jnp.sum(hist_m * (below_n + 0.5 * hist_n))
    return num / jnp.maximum(hist_m.sum() * hist_n.sum(), 1.0)


def _leave_one_out_log_mean(logp: Array, weights: Array) -> tuple[Array, Array]:
    """Row ``s`` of the result: ``log`` of the weighted mean of ``exp(logp)`` over the rows other than ``s``.

    Exclusive prefix and suffix log-sums (``cumlogsumexp``) joined by ``logaddexp``: ``O(S N)``, no cancellation.
    """
    masked = jnp.where(weights > 0, logp, -jnp.inf)
    pad = jnp.full((1, *logp.shape[1:]), -jnp.inf, logp.dtype)
    before = jnp.concatenate([pad, jax.lax.cumlogsumexp(masked, axis=0)[:-1]])
    after = jnp.concatenate([jax.lax.cumlogsumexp(masked, axis=0, reverse=True)[1:], pad])
    count = weights.sum(axis=0, keepdims=True) - weights
    return jnp.logaddexp(before, after) - jnp.log(jnp.maximum(count, 1.0)), count


@jax.jit
def _tune(log_px, log_pz, member, gamma, grid):
    """Pooled leave-one-out AUC of the offline attack for every ``a`` of ``grid``; every row is a shadow."""
    dt = log_px.dtype
    out_x, n_out = _leave_one_out_log_mean(log_px, (~member).astype(dt))  # (S, T)
    all_z, _ = _leave_one_out_log_mean(log_pz, jnp.ones_like(log_pz))  # (S, Z)
    weight = (n_out > 0).astype(dt)

    def auc(a):
        cnt = rmia_counts(log_px - _offline_ref(out_x, a), log_pz - _offline_ref(all_z, a), gamma=gamma)
        return _auc_from_counts(cnt, member, weight, log_pz.shape[-1])

    return jax.vmap(auc)(grid)


def rmia_tune_a(log_px, log_pz, membership, *, shadow, gamma=1.0, grid=A_GRID) -> tuple[float, np.ndarray]:
    """Choose the offline ``a`` on the shadows: leave-one-out attacks, largest pooled AUC (Zarifzadeh et al.).

    Each shadow ``s`` in turn is the attacked model, the other shadows its references (their OUT rows for each
    target); its targets are scored with the offline RMIA for every ``a`` of ``grid`` (targets with no OUT
    reference left are skipped), and the AUC is pooled over all shadows. Only shadow rows are used.

    Args:
      log_px: ``(R, T)`` log-likelihoods of the targets. log_pz: ``(R, Z)`` of the population points.
      membership: ``(R, T)`` bool. shadow: ``(R,)`` bool, at least 2 shadows.
      gamma: as in :func:`rmia`. grid: candidate values in ``[0, 1]``.

    Returns:
      ``(a, aucs)``: the chosen value (the first maximiser) and the pooled AUC of every grid value.

    Raises:
      AttackNotRun: fewer than 2 shadows. ValueError: a grid value outside ``[0, 1]``.
    """
    grid = tuple(float(g) for g in grid)
    if not grid or any(not 0.0 <= g <= 1.0 for g in grid):
        raise ValueError(f"grid must hold values in [0, 1], got grid={grid!r}")
    sh = np.asarray(shadow, bool)
    if sh.sum() < 2:
        raise AttackNotRun(f"shadow: tuning the offline `a` needs at least 2 shadow replicates, got {int(sh.sum())}")
    rows = np.flatnonzero(sh)  # only shadow rows take part
    log_px, log_pz = jnp.asarray(log_px)[rows], jnp.asarray(log_pz)[rows]
    member = jnp.asarray(np.asarray(membership, bool)[rows])
    aucs = np.asarray(_tune(log_px, log_pz.astype(log_px.dtype), member, gamma, jnp.asarray(grid, log_px.dtype)))
    return grid[int(np.argmax(aucs))], aucs


class RmiaResult(NamedTuple):
    """Scores of :func:`rmia` split by the true membership, with the fallbacks and the offline ``a``.

    Attributes:
      member_scores: 1-D scores of the evaluation pairs with membership, in row-major (replicate, target) order.
      nonmember_scores: the same without membership.
      fallbacks: :class:`~qmis_jax.attacks.LiraFallbacks`; ``one_sided`` counts the targets whose reference mean
        lacked the side the test wants (online: no IN or no OUT shadow; offline: no OUT shadow);
        ``pooled_variance`` is always 0.
      a: the offline scaling parameter used (``None`` online).
      a_aucs: the tuning AUCs over :data:`A_GRID` when ``a="auto"`` (else ``None``).
    """

    member_scores: jax.Array
    nonmember_scores: jax.Array
    fallbacks: LiraFallbacks
    a: float | None = None
    a_aucs: np.ndarray | None = None


def rmia(
    target_probs,
    z_probs,
    membership,
    *,
    shadow,
    online: bool = True,
    a="auto",
    gamma: float = 1.0,
    log: bool = False,
) -> RmiaResult:
    """RMIA in the embedded-target design: shadows are the reference models, the other replicates are attacked.

    ``score(x) = Pr_z[ LR(x) / LR(z) > gamma ]``, ``LR = p / p_ref`` (module docstring; Zarifzadeh et al. 2024),
    for every pair (evaluation replicate, target), split by the true membership. A section-1 attack (theory.md
    section 7): the held-out advantage of these scores lower-bounds ``Delta``. Scores lie on the grid ``k / Z``, so
    many pairs tie: use ``Z`` of a few hundred or more. Use :func:`rmia_scores` under ``jit``/``vmap``.

    Args:
      target_probs: ``(R, T)`` ``p`` of each target (probability of its true label; ``exp(-loss)`` for regression)
        under each replicate's release; log-likelihoods with ``log=True`` (e.g. :func:`rmia_probability`).
      z_probs: ``(R, Z)`` the same for ``Z`` population points drawn fresh from the data law, shared by all
        replicates and in none of their training sets.
      membership: ``(R, T)`` bool, target in the replicate's training set (:func:`embedded_target_membership`).
      shadow: ``(R,)`` bool, the reference replicates (:func:`shadow_mask`); the others are attacked.
      online: IN and OUT references (default) or the offline attack (OUT references only).
      a: offline scaling parameter in ``[0, 1]``, or ``"auto"`` (tuned on the shadows, :func:`rmia_tune_a`);
        ignored online.
      gamma: threshold ``> 0`` on the ratio ``LR(x) / LR(z)`` (the paper uses 1 or values near it).
      log: the inputs are ``log p`` instead of ``p``.

    Returns:
      :class:`RmiaResult`: ``(member_scores, nonmember_scores)`` 1-D over the evaluation pairs in row-major
      (replicate, target) order, as :func:`~qmis_jax.attacks.lira` returns them; ``.fallbacks``, ``.a``.

    Raises:
      AttackNotRun: no evaluation replicate, no shadow, or (offline, ``a="auto"``) fewer than 2 shadows.
      ValueError: on malformed inputs, non-positive probabilities, or ``a`` outside ``[0, 1]``.
    """
    px = jnp.asarray(target_probs)
    pz = jnp.asarray(z_probs)
    member, sh = _check_design(px.shape, membership, shadow)
    if pz.ndim != 2 or pz.shape[0] != px.shape[0] or pz.shape[1] < 1:
        raise ValueError(f"z_probs must have shape (R={px.shape[0]}, Z>=1), got shape {pz.shape}")
    dt = jnp.result_type(px.dtype, pz.dtype, jnp.float32)
    px, pz = px.astype(dt), pz.astype(dt)
    if log:
        if not (bool(jnp.all(px < jnp.inf)) and bool(jnp.all(pz < jnp.inf))) or bool(
            jnp.any(jnp.isnan(px)) | jnp.any(jnp.isnan(pz))
        ):
            raise ValueError("log-likelihoods must be finite or -inf (target_probs / z_probs with log=True)")
        log_px, log_pz = px, pz
    else:
        for name, arr in (("target_probs", px), ("z_probs", pz)):
            if not bool(jnp.all(jnp.isfinite(arr) & (arr >= 0))):
                raise ValueError(f"{name} must be finite and >= 0 (or pass log-likelihoods with log=True)")
        log_px, log_pz = jnp.log(px), jnp.log(pz)
    if sh.all():
        raise AttackNotRun("shadow: no evaluation replicate left (all replicates are shadows)")
    if not sh.any():
        raise AttackNotRun("shadow: RMIA needs at least one reference (shadow) replicate, got none")
    if not isinstance(gamma, (int, float, np.number)) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0, got gamma={gamma!r}")
    a_used, a_aucs = None, None
    if not online:
        if isinstance(a, str):
            if a != "auto":
                raise ValueError(f"a must be a number in [0, 1] or 'auto', got a={a!r}")
            a_used, a_aucs = rmia_tune_a(log_px, log_pz, member, shadow=sh, gamma=gamma)
        else:
            if isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"a must be a number in [0, 1] or 'auto', got a={a!r}")
            a_used = float(a)
    scores = rmia_scores(
        log_px,
        log_pz,
        jnp.asarray(member),
        jnp.asarray(sh),
        online=bool(online),
        a=1.0 if a_used is None else a_used,
        gamma=float(gamma),
    )
    n_in = (member & sh[:, None]).sum(axis=0)
    n_out = (~member & sh[:, None]).sum(axis=0)
    one_sided = ((n_in == 0) | (n_out == 0)) if online else (n_out == 0)
    fallbacks = LiraFallbacks(int(member.shape[1]), 0, int(one_sided.sum()))
    ev = ~sh
    ev_scores = np.asarray(scores)[ev]
    ev_member = member[ev]
    return RmiaResult(jnp.asarray(ev_scores[ev_member]), jnp.asarray(ev_scores[~ev_member]), fallbacks, a_used, a_aucs)
