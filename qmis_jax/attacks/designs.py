"""Membership designs and per-score helpers of the attacks (theory.md section 7): LOSS, the score of a loss, and
the membership masks of the embedded-target and pool designs.

Designs:

* **Fresh-data design** (:func:`loss_attack`): replicate ``r`` trains on ``n`` fresh points; its members are those
  points, its non-members ``n`` further fresh points. A global threshold on the loss is then an attack in the
  section-1 game, so its advantage lower-bounds ``Delta``.
* **Embedded-target design** (:func:`embedded_target_membership`): ``T = 2k`` fixed target points, each replicate
  trains on a random half of them plus ``n - k`` fresh points (LiRA, RMIA).
* **Pool design** (:func:`pool_membership`): a different game, see :func:`~qmis_jax.attacks.lira_pool`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qmis_jax._checks import positive_int

__all__ = ["embedded_target_membership", "loss_attack", "pool_membership", "score_from_loss", "shadow_mask"]

Array = jax.Array

_TASKS = ("binary", "regression")


def loss_attack(member_losses, nonmember_losses) -> tuple[Array, Array]:
    """LOSS attack (Yeom et al. 2018) in the fresh-data design: the score is minus the per-example loss.

    A global threshold on the loss of the released model (theory.md section 7, fresh-data design). Pool all
    replicates' scores into :func:`~qmis_jax.attacks.attack_metrics`.

    Args:
      member_losses: ``(R, n)`` losses of each replicate's release on its own training points (any shape).
      nonmember_losses: ``(R, n)`` losses of each replicate's release on fresh points (any shape).

    Returns:
      ``(member_scores, nonmember_scores)`` = ``(-member_losses, -nonmember_losses)``, same shapes.

    >>> ms, ns = loss_attack(jnp.array([[0.1, 0.2]]), jnp.array([[0.5, 0.3]]))
    >>> ms.tolist()
    [[-0.10000000149011612, -0.20000000298023224]]
    """
    return -jnp.asarray(member_losses), -jnp.asarray(nonmember_losses)


def score_from_loss(loss, task: str) -> Array:
    """LiRA's per-example statistic from the per-example loss of a release (theory.md section 7).

    * ``task="binary"`` with the logistic loss ``l = -log p_correct``: the logit of ``p_correct``,
      ``log(p / (1 - p)) = -log(expm1(l)) = -l - log(-expm1(-l))``, computed in the last form, which is accurate
      for small and large ``l`` alike (Carlini et al. 2022 use this logit scaling because it is close to Gaussian
      across replicates). Losses are floored at the dtype's smallest normal number, so ``l = 0`` gives a large
      finite score instead of ``+inf``.
    * ``task="regression"`` (squared loss): ``-l``.

    Higher means "more likely a member" in both cases.

    Args:
      loss: per-example losses, any shape; non-negative for ``"binary"``.
      task: ``"binary"`` or ``"regression"`` (``Problem.task``).

    Returns:
      Array of scores with the shape of ``loss`` (floating dtype).

    >>> float(score_from_loss(jnp.log(2.0), "binary"))  # p_correct = 1/2
    0.0
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got task={task!r}")
    loss = jnp.asarray(loss)
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        loss = loss.astype(jnp.result_type(float))
    if task == "regression":
        return -loss
    l_safe = jnp.maximum(loss, jnp.finfo(loss.dtype).tiny)
    return -l_safe - jnp.log(-jnp.expm1(-l_safe))


def _halves_chunk(key: Array, start: Array, rows: int, size: int) -> Array:
    def row(i):
        # ranks of i.i.d. 32-bit random words: a uniform random permutation (ties, of probability ~size^2 / 2^33,
        # are broken by position, which keeps every row exactly balanced)
        bits = jax.random.bits(jax.random.fold_in(key, i), (size,), dtype=jnp.uint32)
        rank = jnp.argsort(jnp.argsort(bits, stable=True), stable=True)
        return rank < size // 2

    return jax.vmap(row)(start + jnp.arange(rows))


def _balanced_halves(key: Array, replicates: int, size: int) -> Array:
    # Rows are generated in fixed chunks of about 2^20 entries (a few milliseconds), so one compiled program serves
    # every replicate count for a given size; row i depends only on fold_in(key, i).
    rows = max(1, (1 << 20) // size)
    chunks = [_halves_chunk(key, jnp.int32(start), rows, size) for start in range(0, replicates, rows)]
    return jnp.concatenate(chunks)[:replicates]


def embedded_target_membership(key: Array, *, replicates: int, targets: int) -> Array:
    """Which of ``T`` embedded targets each replicate trains on (theory.md section 7, embedded-target design).

    Replicate ``i`` ranks ``T`` random 32-bit words drawn with ``fold_in(key, i)`` (a uniform random
    permutation) and includes the targets ranked in the first half, so every replicate holds exactly ``T / 2``
    targets, each target is in each replicate with probability 1/2 independently across replicates, and row ``i``
    does not depend on how many replicates are generated (chunk-invariant). Each replicate then adds
    ``n - T / 2`` fresh points.

    Args:
      key: JAX PRNG key.
      replicates: number of replicates ``R`` (>= 1).
      targets: number of target points ``T`` (even, >= 2).

    Returns:
      ``(R, T)`` bool array, ``True`` where the target is in the replicate's training set.

    >>> m = embedded_target_membership(jax.random.key(0), replicates=3, targets=4)
    >>> m.sum(axis=1).tolist()
    [2, 2, 2]
    """
    replicates = positive_int("replicates", replicates)
    targets = positive_int("targets", targets, minimum=2)
    if targets % 2:
        raise ValueError(f"targets must be even (each replicate takes half), got targets={targets}")
    return _balanced_halves(key, replicates, targets)


def pool_membership(key: Array, *, replicates: int, pool: int) -> Array:
    """Random halves of one fixed pool: the classic LiRA design (theory.md section 7, pool design).

    Every replicate trains on exactly ``pool / 2`` points of a fixed pool of ``pool`` points (and nothing else),
    drawn as in :func:`embedded_target_membership`. **This is a different game** from section 1: membership within
    a fixed pool, where the release varies less than with fresh data. An attack's advantage here can exceed
    ``Delta`` and bounds nothing about the MIS; report it apart, labelled ``lira_pool``, for comparison with other
    tools only.

    Args:
      key: JAX PRNG key.
      replicates: number of replicates ``R`` (>= 1).
      pool: pool size (even, >= 2), e.g. ``2 n``.

    Returns:
      ``(R, pool)`` bool array, ``True`` where the pool point is in the replicate's training set.
    """
    replicates = positive_int("replicates", replicates)
    pool = positive_int("pool", pool, minimum=2)
    if pool % 2:
        raise ValueError(f"pool must be even (each replicate takes half), got pool={pool}")
    return _balanced_halves(key, replicates, pool)


def shadow_mask(replicates: int, *, shadows: int) -> Array:
    """Boolean mask with the first ``shadows`` of ``replicates`` replicates marked as shadow models.

    Membership is drawn independently per replicate, so a fixed split is as good as a random one and keeps the
    evaluation replicates the same when more shadows are appended at the end of a study.

    Args:
      replicates: total number of replicates ``R``.
      shadows: number of shadow replicates, ``1 <= shadows < R``.

    Returns:
      ``(R,)`` bool array.
    """
    replicates = positive_int("replicates", replicates, minimum=2)
    shadows = positive_int("shadows", shadows)
    if shadows >= replicates:
        raise ValueError(f"shadows must be < replicates={replicates}, got shadows={shadows}")
    return jnp.arange(replicates) < shadows
