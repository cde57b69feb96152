"""The synthetic study, in two parts: a validation of the theory where it can be seen, then the paper's setting.

Part one (validation, theory.md sections 3-6, 8, 9 and 10): does the indicator predict how often a release flips?
Logistic regression in low dimension (``validation_dim``) on one fixed problem chosen so that no published number
sits at 0 or on a decision threshold of any preset (theory.md section 8, last bullet; see
:data:`VALIDATION_PROBLEM`), every discrete preset (two fixed grids, the size-adaptive grid, ``int4@e8m0``,
``sign@e8m0``, ``ternary@e8m0``, ``mxfp4``) under both PTQs (``validation_ptqs``, the audit's ``ptq=``).

1. A pilot runs the audit's population stage alone (no replicates) at ``validation_pilot_n`` for each PTQ: every
   quantizer's population release, its events and their ``c_k = delta_k / sigma_k`` (sections 3-6).
2. Sizes: for a codebook fixed in advance the events, hence the ``c_k``, do not depend on n, so the predicted flip
   at any n is ``1 - prod_k (1 - Phi(-sqrt(n) c_k))`` (:func:`predicted_flip`, independent events: within a few
   percent of the audit's joint-Gaussian probability here). For each target of ``validation_flip_targets`` the
   size of a grid of ratio :data:`SIZE_GRID_RATIO` (shared by every quantizer and PTQ, so that audits are shared
   and compiled programs reused) whose prediction is nearest in log-odds is taken, within ``[validation_n_min,
   validation_n_max]`` and only where the prediction lies in ``[SELECT_LOW, SELECT_HIGH]`` (inside the measurable
   range ``[0.02, 0.9]``). The size-adaptive grid's codebook changes with n: its ``c_k`` are carried over as
   ``c_k (n / n0)^-alpha`` and each chosen size is checked by a population stage at that size (a probe), moved
   along the grid at most :data:`MAX_PROBES` times until its exact prediction is near the target
   (:func:`select_sizes`).
3. Replicates: enough for a Monte Carlo standard error of at most ``validation_se`` at the predicted flip
   (``R = p (1 - p) / se^2``, ``p`` widened by 25% towards 1/2, at least ``validation_min_replicates``, a multiple
   of :data:`VALIDATION_CHUNK`) unless ``validation_replicates`` fixes R; quantizers sharing a PTQ and a size share
   one audit with the largest R they need.
4. Each point's row: ``r`` (or the reason it is 0), ``sqrt(n) c_min``, the events by kind, the predicted flip with
   its standard error against the Monte Carlo flip with its own, whether they agree within
   :data:`AGREEMENT_Z` combined standard errors, the swap-change rate and the certified bracket (section 10).
   A width study shows the bracket against the replicate count at one point.

Part two (the paper's setting): Gaussian mixtures in R^dim (128 by default), logistic and MLP models, the presets
with the E8M0 variants of the scaled ones next to their float32 originals, the two grids, a sweep over n.

Each audit is one :func:`qmis_jax.audit` on its own replicates; its chunks and its finished report are kept in the
study's :class:`~qmis_jax.store.ResultStore` (so are the pilot and the probes), so ``--resume`` loses nothing. The
study writes ``report.json`` (the report schema of design.md for part two's main point, the largest n of the first
model, with every part-two point under ``"runs"`` and part one under ``"validation"``), ``report.md`` and the
figures.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from qmis_jax import problems
from qmis_jax import quantizers as Q
from qmis_jax._memory import replicate_bytes
from qmis_jax._progress import progress_bar
from qmis_jax.audit import audit, environment, population_stage
from qmis_jax.audit import plan as audit_plan
from qmis_jax.indicator.options import IndicatorOptions
from qmis_jax.store import ResultStore, config_hash, write_json
from qmis_jax.studies import markdown, plots
from qmis_jax.studies._points import study_diagnostics, study_point

MODELS = ("logistic", "mlp")
GRIDS = ("grid_fixed", "grid_adaptive")
# E8M0 variants run next to their float32 originals in part two (theory.md section 9)
E8M0_VARIANTS = ("int8@e8m0", "int4@e8m0", "sign@e8m0", "ternary@e8m0")
QUICK_QUANTIZERS = (
    "fp32",
    "int8",
    "int4",
    "int2",
    "ternary",
    "sign",
    "prune50",
    "int4@e8m0",
    "sign@e8m0",
    *GRIDS,
)
VALIDATION_QUANTIZERS = ("grid_fixed", "grid_adaptive", "int4@e8m0", "sign@e8m0", "ternary@e8m0", "mxfp4")
QUICK_VALIDATION_QUANTIZERS = ("grid_fixed", "sign@e8m0")
PTQS = ("loss", "rtn")
# Part one's problem (theory.md section 8, last bullet: no published leaf may sit at 0). In R^2 with 4 modes per
# class, separation 2.4, offsets of norm 2, direction seed 37 and class prior sigmoid(0.9) ~ 0.711, the closed form
# gives theta* = (b, w) = (0.900, 2.139, -1.089): no coordinate is 0, none sits on a decision threshold or a scale
# boundary of any preset, and every preset's smallest c_k = delta_k / sigma_k lies in [0.017, 0.09] under both PTQs
# (pilot at n = 1024), so that predicted flips from about 0.6 down to 0.05 are reached between n = 50 and 20,000.
# It was picked by a scan over seeds 0-39, separations 0.8-3.0, intercepts 0.3-3.3 and offset norms 2-4, maximising
# the smallest c_k over the presets (the RTN margins over the sandwich standard deviations), then checked under loss
# PTQ, where near-ties of the loss rule out many otherwise good candidates. The prior sigmoid(1.25) with seed 3 and
# separation 1.6 would put b = 1.25 and w_2 = -1.250 on a threshold of the h = 0.5 grid and of mxfp4 (r < 1e-8).
VALIDATION_PROBLEM = {
    "k_modes": 4,
    "separation": 2.4,
    "scale": 2.0,
    "seed": 37,
    "prior": 1.0 / (1.0 + math.exp(-0.9)),
}
SIZE_GRID_RATIO = 2.0  # a coarse grid: every new size costs an audit with its own compiled programs
VALIDATION_CHUNK = 64  # replicates per chunk in part one: one compiled program per size, whatever R
SELECT_LOW, SELECT_HIGH = 0.04, 0.85  # predicted flips a chosen size must have (measurable in [0.02, 0.9])
MAX_PROBES = 3  # population stages per target for a codebook that changes with n
PROBE_TOLERANCE = 0.7  # a probed size is near a target when their log-odds differ by at most this
AGREEMENT_Z = 4.0  # predicted and measured flips agree within this many combined standard errors


def default_quantizers() -> tuple[str, ...]:
    """Part two's quantizers: every preset, the E8M0 variants of :data:`E8M0_VARIANTS` and the two grids."""
    return (*Q.names(), *E8M0_VARIANTS, *GRIDS)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Configuration of the synthetic study (all sizes validated by :func:`validate`).

    Part two: ``n_values``, ``replicates``, ``models``, ``quantizers``, ``dim``, ``k_modes``, ``hidden``,
    ``grid_step``, ``adaptive_alpha``, ``ptq``, ``method``, ``attacks``. Part one (``validation``), see the module
    docstring: its problem (``validation_dim``, ``validation_k_modes``, ``validation_separation``,
    ``validation_scale``, ``validation_problem_seed``, ``validation_prior``; the defaults are
    :data:`VALIDATION_PROBLEM`, chosen for ``validation_dim = 2``), its quantizers and PTQs, the pilot size, the
    target predicted flips, the size range, the Monte Carlo precision (``validation_se``, or a fixed
    ``validation_replicates``), the attacks behind its bracket and the width study's replicate counts. ``seed``
    sets every PRNG key of both parts, never the problems.
    """

    n_values: tuple[int, ...] = (1000, 2000, 4000)
    replicates: int = 256
    models: tuple[str, ...] = ("logistic",)
    quantizers: tuple[str, ...] | None = None
    dim: int = 128
    k_modes: int = 4
    hidden: int = 32
    grid_step: float = 0.05
    adaptive_alpha: float = 0.25
    seed: int = 0
    ptq: str = "loss"
    method: str = "gaussian"
    attacks: tuple[str, ...] = ("loss", "lira")
    memory_budget: int = 2 * 2**30
    validation: bool = True
    validation_dim: int = 2
    validation_k_modes: int = VALIDATION_PROBLEM["k_modes"]
    validation_separation: float = VALIDATION_PROBLEM["separation"]
    validation_scale: float = VALIDATION_PROBLEM["scale"]
    validation_problem_seed: int = VALIDATION_PROBLEM["seed"]
    validation_prior: float = VALIDATION_PROBLEM["prior"]
    validation_quantizers: tuple[str, ...] = VALIDATION_QUANTIZERS
    validation_ptqs: tuple[str, ...] = PTQS
    validation_grid_steps: tuple[float, ...] = (0.5, 1.0)
    validation_flip_targets: tuple[float, ...] = (0.6, 0.25, 0.08)
    validation_pilot_n: int = 1024
    validation_n_min: int = 50
    validation_n_max: int = 20_000
    validation_replicates: int | None = None
    validation_se: float = 0.02
    validation_min_replicates: int = 64
    validation_attacks: tuple[str, ...] = ("loss",)
    validation_width_replicates: tuple[int, ...] = (64, 256)

    @classmethod
    def quick(cls, **overrides) -> SyntheticConfig:
        """A miniature of both parts that finishes in a few minutes on two CPU cores (part one: two presets, both
        PTQs, two sizes each, 128 replicates per point)."""
        base = dict(
            n_values=(800,),
            replicates=64,
            models=("logistic",),
            dim=16,
            quantizers=QUICK_QUANTIZERS,
            validation_dim=2,
            validation_quantizers=QUICK_VALIDATION_QUANTIZERS,
            validation_grid_steps=(1.0,),
            validation_flip_targets=(0.3, 0.08),
            validation_pilot_n=256,
            validation_n_max=5000,
            validation_replicates=128,
            validation_width_replicates=(64,),
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


def _check_validation(cfg: SyntheticConfig) -> None:
    """ValueErrors naming the first bad part-one setting."""
    if not 2 <= cfg.validation_dim <= 16:
        raise ValueError(f"validation_dim must be in [2, 16] (the low-dimensional part), got {cfg.validation_dim}")
    if not cfg.validation_ptqs or any(p not in PTQS for p in cfg.validation_ptqs):
        raise ValueError(f"validation_ptqs must be a non-empty subset of {PTQS}, got {cfg.validation_ptqs}")
    if not cfg.validation_flip_targets or not all(0 < t < 1 for t in cfg.validation_flip_targets):
        raise ValueError(
            f"validation_flip_targets must be predicted flip probabilities in (0, 1), got {cfg.validation_flip_targets}"
        )
    if not 0 < cfg.validation_prior < 1:
        raise ValueError(f"validation_prior must lie in (0, 1), got {cfg.validation_prior}")
    if not 2 <= cfg.validation_n_min <= cfg.validation_pilot_n <= cfg.validation_n_max:
        raise ValueError(
            "validation sizes must satisfy 2 <= validation_n_min <= validation_pilot_n <= validation_n_max, got "
            f"{cfg.validation_n_min}, {cfg.validation_pilot_n}, {cfg.validation_n_max}"
        )
    if not 0 < cfg.validation_se < 0.5:
        raise ValueError(f"validation_se must be a standard error in (0, 0.5), got {cfg.validation_se}")
    reps = (cfg.validation_replicates or 4, cfg.validation_min_replicates, *cfg.validation_width_replicates)
    if any(r < 4 for r in reps):
        raise ValueError(
            "validation_replicates, validation_min_replicates and validation_width_replicates must be at least 4, "
            f"got {cfg.validation_replicates}, {cfg.validation_min_replicates}, {cfg.validation_width_replicates}"
        )
    if any(h <= 0 for h in cfg.validation_grid_steps):
        raise ValueError(f"validation_grid_steps must be positive, got {cfg.validation_grid_steps}")


def validate(cfg: SyntheticConfig) -> SyntheticConfig:
    """Check names and sizes; return the config with the default quantizer list filled in."""
    for m in cfg.models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown model {m!r}; valid: {', '.join(MODELS)}")
    for n in cfg.n_values:
        if n < 2:
            raise ValueError(f"--n must be at least 2 (each replicate embeds LiRA targets among fresh points), got {n}")
    if cfg.replicates < 4:
        raise ValueError(f"--replicates must be at least 4 (LiRA needs shadows and targets), got {cfg.replicates}")
    names = cfg.quantizers or default_quantizers()
    for name in (*names, *(cfg.validation_quantizers if cfg.validation else ())):
        if name not in GRIDS:
            Q.get(name)  # KeyError listing the valid names
    if cfg.validation:
        _check_validation(cfg)
    return dataclasses.replace(cfg, quantizers=tuple(names))


def quantizer_set(cfg: SyntheticConfig, n: int) -> dict[str, Q.Quantizer]:
    """The study's quantizers at training-set size ``n``: presets, the fixed grid and the size-adaptive grid.

    ``grid_fixed`` is ``uniform(step=grid_step)`` (a codebook independent of n: ``r`` tends to a constant);
    ``grid_adaptive`` is ``size_adaptive(n, h0=grid_step, n0=min(n_values), alpha)`` (step shrinking with n:
    ``r -> 0`` while ``n r -> infinity``), theory.md section 4.
    """
    out = {}
    for name in cfg.quantizers:
        if name == "grid_fixed":
            out[name] = Q.uniform(step=cfg.grid_step)
        elif name == "grid_adaptive":
            out[name] = Q.size_adaptive(n, h0=cfg.grid_step, n0=min(cfg.n_values), alpha=cfg.adaptive_alpha)
        else:
            out[name] = Q.get(name)
    return out


def validation_names(cfg: SyntheticConfig) -> list[str]:
    """Part one's quantizer names: ``grid_fixed`` becomes one fixed grid per step of ``validation_grid_steps``
    (``grid_fixed_h0.5``...), the rest as given."""
    out = []
    for name in cfg.validation_quantizers:
        if name == "grid_fixed":
            out += [f"grid_fixed_h{h:g}" for h in cfg.validation_grid_steps]
        else:
            out.append(name)
    return out


def validation_quantizer_set(cfg: SyntheticConfig, names: Sequence[str], n: int) -> dict[str, Q.Quantizer]:
    """Part one's quantizers at size ``n``: ``grid_fixed_hH`` the fixed grid of step H; ``grid_adaptive`` of step
    ``min(validation_grid_steps)`` at ``validation_pilot_n``, shrinking as ``n^-adaptive_alpha`` (at the pilot it is
    the finest fixed grid, so its flips are measurable over a wide range of n); presets by name."""
    out = {}
    for name in names:
        if name.startswith("grid_fixed_h"):
            out[name] = Q.uniform(step=float(name[len("grid_fixed_h") :]))
        elif name == "grid_adaptive":
            h0 = min(cfg.validation_grid_steps)
            out[name] = Q.size_adaptive(n, h0=h0, n0=cfg.validation_pilot_n, alpha=cfg.adaptive_alpha)
        else:
            out[name] = Q.get(name)
    return out


def validation_problem(cfg: SyntheticConfig) -> problems.Problem:
    """Part one's problem: ``logistic_mixture`` in R^``validation_dim`` with the class prior ``validation_prior``
    (intercept ``logit(prior)``, never 0) and the law of :data:`VALIDATION_PROBLEM` unless overridden."""
    return problems.logistic_mixture(
        dim=cfg.validation_dim,
        k_modes=cfg.validation_k_modes,
        separation=cfg.validation_separation,
        scale=cfg.validation_scale,
        seed=cfg.validation_problem_seed,
        prior=cfg.validation_prior,
    )


def round_size(n: float, *, n_min: int, n_max: int) -> int:
    """``n`` rounded to the nearest point of the grid ``round(SIZE_GRID_RATIO^k)`` and clipped to
    ``[n_min, n_max]`` (so that quantizers whose sizes nearly coincide share one audit)."""
    if not math.isfinite(n) or n <= 0:
        return n_max
    k = round(math.log(n) / math.log(SIZE_GRID_RATIO))
    return int(min(max(round(SIZE_GRID_RATIO**k), n_min), n_max))


def size_grid(*, n_min: int, n_max: int) -> list[int]:
    """Part one's candidate sizes: ``n_min``, every ``round(SIZE_GRID_RATIO^k)`` in between and ``n_max``."""
    if not 2 <= n_min <= n_max:
        raise ValueError(f"size_grid needs 2 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
    step = math.log(SIZE_GRID_RATIO)
    ks = range(math.ceil(math.log(n_min) / step), math.floor(math.log(n_max) / step) + 1)
    return sorted({n_min, n_max, *(m for m in (round(SIZE_GRID_RATIO**k) for k in ks) if n_min <= m <= n_max)})


def predicted_flip(c: Sequence[float], n: int, *, n0: float | None = None, alpha: float | None = None) -> float:
    """``1 - prod_k (1 - Phi(-sqrt(n) c_k))``: the chance that a training set of size ``n`` triggers any of
    independent Gaussian events with ``c_k = delta_k / sigma_k`` (theory.md sections 4-5).

    The audit's own prediction treats the events as jointly Gaussian with their correlations; the independent-event
    form needs only the ``c_k`` and is what part one uses to choose its sizes (with a codebook fixed in advance the
    ``c_k`` do not depend on n). With ``alpha`` (a size-adaptive grid, step ``h0 (n / n0)^-alpha``, section 4) the
    margins, hence the ``c_k``, are carried from ``n0`` as ``c_k (n / n0)^-alpha``.

    >>> round(predicted_flip([0.05], 400), 4)  # Phi(-1)
    0.1587
    >>> predicted_flip([], 400)
    0.0
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if alpha is not None and (n0 is None or n0 <= 0):
        raise ValueError(f"n0 must be a positive size when alpha is given, got {n0}")
    factor = math.sqrt(n) * (1.0 if alpha is None else (n / n0) ** (-alpha))
    log_stay = 0.0
    for ck in c:
        p = 0.5 * math.erfc(factor * ck / math.sqrt(2.0))  # Phi(-sqrt(n) c_k)
        if p >= 1.0:
            return 1.0
        log_stay += math.log1p(-p)
    return max(0.0, -math.expm1(log_stay))


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p) - math.log1p(-p)


def choose_sizes(
    flip_at: Callable[[int], float],
    grid: Sequence[int],
    targets: Sequence[float],
    *,
    low: float = SELECT_LOW,
    high: float = SELECT_HIGH,
    exclude: Sequence[int] = (),
) -> list[tuple[float, int, float]]:
    """For each target in turn, the size of ``grid`` not chosen yet whose predicted flip ``flip_at(n)`` is nearest
    to it in log-odds, among those whose prediction lies in ``[low, high]``; returns ``(target, n, predicted)``.

    Distinct sizes: when the prediction is clipped at one end of the grid, the next targets take its neighbours.

    >>> choose_sizes(lambda n: 100 / (100 + n), [10, 100, 1000, 10000], (0.5, 0.1))
    [(0.5, 100, 0.5), (0.1, 1000, 0.09090909090909091)]
    """
    preds = {n: flip_at(n) for n in grid}
    taken = set(exclude)
    out = []
    for t in targets:
        cands = [n for n in grid if n not in taken and low <= preds[n] <= high]
        if not cands:
            continue
        n = min(cands, key=lambda m: (abs(_logit(preds[m]) - _logit(t)), m))
        taken.add(n)
        out.append((t, n, preds[n]))
    return out


def select_sizes(
    c: Sequence[float],
    *,
    grid: Sequence[int],
    targets: Sequence[float],
    n0: float | None = None,
    alpha: float | None = None,
    probe: Callable[[int], tuple[list[float], float]] | None = None,
) -> list[dict[str, Any]]:
    """Part one's sizes of one quantizer and PTQ, from its pilot events' ``c_k`` (see the module docstring).

    A codebook fixed in advance (``alpha`` None): :func:`choose_sizes` on :func:`predicted_flip`. A size-adaptive
    grid: its ``c_k`` are carried as ``c_k (n / n0)^-alpha``, and each chosen size is checked by ``probe(n) ->
    (c_k at n, the audit's predicted flip at n)``; while no probed size is in ``[SELECT_LOW, SELECT_HIGH]`` and
    within :data:`PROBE_TOLERANCE` of the target in log-odds, the search goes on from the last probe's own ``c_k``
    (at most :data:`MAX_PROBES` probes per target); the target then takes the probed size nearest to it in range.

    Returns:
      ``[{"n", "target", "predicted", "probes"}]`` sorted by n; ``predicted`` is the exact prediction where a
      probe gave one, else the independent-event one.
    """
    if alpha is None or probe is None:
        chosen = choose_sizes(lambda m: predicted_flip(c, m), grid, targets)
        return sorted(({"n": n, "target": t, "predicted": p, "probes": 0} for t, n, p in chosen), key=lambda e: e["n"])
    probed: dict[int, float] = {}  # size -> the audit's predicted flip there
    taken: set[int] = set()
    out: list[dict[str, Any]] = []

    def usable(m: int) -> bool:
        return m not in taken and SELECT_LOW <= probed[m] <= SELECT_HIGH

    def near(m: int, t: float) -> bool:
        return abs(_logit(probed[m]) - _logit(t)) <= PROBE_TOLERANCE

    ck, at = list(c), float(n0)
    for t in targets:
        count = 0
        while not any(usable(m) and near(m, t) for m in probed) and count < MAX_PROBES:
            estimate = lambda m, ck=ck, at=at: predicted_flip(ck, m, n0=at, alpha=alpha)  # noqa: E731
            # the probe decides what is measurable: here, the size whose estimate is nearest the target
            pick = choose_sizes(estimate, grid, (t,), low=0.0, high=1.0, exclude=probed)
            if not pick:
                break
            n = pick[0][1]
            ck, probed[n] = probe(n)
            at = float(n)
            count += 1
        cands = [m for m in probed if usable(m)]
        if cands:
            n = min(cands, key=lambda m: (abs(_logit(probed[m]) - _logit(t)), m))
            taken.add(n)
            out.append({"n": n, "target": t, "predicted": probed[n], "probes": count})
    return sorted(out, key=lambda e: e["n"])


def replicates_for(p: float, cfg: SyntheticConfig) -> int:
    """Replicates for a Monte Carlo flip rate with standard error at most ``validation_se`` where the predicted flip
    is ``p``: ``max p'(1 - p') / se^2`` over ``p'`` within 25% of ``p`` (a margin for the prediction's own error),
    at least ``validation_min_replicates``, rounded up to a multiple of :data:`VALIDATION_CHUNK`; or
    ``validation_replicates`` when set.

    >>> replicates_for(0.5, SyntheticConfig())  # 625, rounded up to a multiple of 64
    640
    """
    if cfg.validation_replicates:
        return cfg.validation_replicates
    lo, hi = p / 1.25, min(1.0, p * 1.25)
    var = 0.25 if lo <= 0.5 <= hi else max(lo * (1 - lo), hi * (1 - hi))
    need = max(cfg.validation_min_replicates, math.ceil(var / cfg.validation_se**2))
    return VALIDATION_CHUNK * math.ceil(need / VALIDATION_CHUNK)


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def pilot_entry(a) -> dict[str, Any]:
    """One quantizer's :class:`~qmis_jax.indicator.PopulationAudit` as JSON: ``r`` (and its standard error), the
    predicted flip (and its), ``sqrt(n) c_min``, the events by kind, why ``r = 0`` where it is, and every valid
    event's ``c_k = delta_k / sigma_k`` (an event whose ``c_k`` is ``+inf`` never happens and is left out)."""
    valid = np.asarray(a.valid, bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.asarray(a.delta, np.float64)[valid] / np.asarray(a.sigma, np.float64)[valid]
    c = np.where(np.isneginf(c), -1e6, c)
    return {
        "r": _finite(a.r) or 0.0,
        "r_se": _finite(a.r_se),
        "flip_rate_predicted": None if a.continuous else _finite(a.flip_rate_predicted),
        "flip_rate_predicted_se": _finite(a.flip_se),
        "sqrt_n_c_min": _finite(a.sqrt_n_c_min),
        "events": {str(k): int(v) for k, v in (a.events or {}).items()},
        "r_zero_reason": a.r_zero_reason,
        "continuous": bool(a.continuous),
        "c": [float(v) for v in c if np.isfinite(v)],
    }


def population_only(cfg: SyntheticConfig, key, problem, qs, *, n: int, ptq: str) -> dict[str, dict[str, Any]]:
    """The audit's population stage alone (``theta*``, population releases, events, ``r``, predicted flip) at
    size ``n`` under ``ptq``, without replicates: :func:`pilot_entry` per quantizer. With the key of an audit at
    the same size, its numbers are those that audit will report."""
    # every setting the population stage reads is the audit's default, so the numbers match an audit's
    defaults = {
        name: prm.default
        for name, prm in inspect.signature(audit).parameters.items()
        if prm.kind is inspect.Parameter.KEYWORD_ONLY and prm.default is not inspect.Parameter.empty
    }
    wanted = inspect.signature(audit_plan).parameters
    settings = {k: v for k, v in defaults.items() if k in wanted}
    settings.update(
        n=n,
        replicates=4,
        attacks=(),
        indicator=IndicatorOptions(ptq=ptq, method=cfg.method),
        memory_budget=cfg.memory_budget,
        test_size=16,
        n_boot=10,
    )
    the_plan = audit_plan(key, problem, qs, **settings)
    pop = population_stage(the_plan, problem, lambda stage, done: None)
    return {name: pilot_entry(a) for name, a in pop.audits.items()}


def flip_agreement(
    predicted: float | None, predicted_se: float | None, flip: float, flip_se: float | None, replicates: int
) -> tuple[bool | None, float | None]:
    """Whether the predicted and the Monte Carlo flip agree within :data:`AGREEMENT_Z` combined standard errors
    ``sqrt(se_mc^2 + se_pred^2)``, and the standardised difference ``z = (flip - predicted) / se``.

    ``se_mc`` is the flip rate's standard error, or, where none was seen or every replicate flipped (an estimated
    standard error of 0), the binomial one at the predicted flip, ``sqrt(p (1 - p) / R)``. ``(None, None)``
    without a prediction (a continuous release).

    >>> flip_agreement(0.10, 0.01, 0.13, 0.015, 400)[0]
    True
    """
    if predicted is None:
        return None, None
    se_mc = _finite(flip_se) or 0.0
    if se_mc <= 0.0:
        se_mc = math.sqrt(max(predicted * (1.0 - predicted), 0.0) / max(replicates, 1))
    se = math.sqrt(se_mc**2 + (_finite(predicted_se) or 0.0) ** 2)
    diff = flip - predicted
    if se == 0.0:
        return diff == 0.0, 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    z = diff / se
    return abs(z) <= AGREEMENT_Z, z


def validation_row(
    name: str, report: dict[str, Any], *, ptq: str | None = None, selection: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One quantizer at one size and PTQ of part one: the numbers of its validation table."""
    q = report["quantizers"][name]
    n, reps, r = report["n"], report["replicates"], q["r_population"] or 0.0
    flip, flip_se = q["flip_rate"], q["flip_rate_se"]
    continuous = plots.is_continuous(q)
    predicted, predicted_se = q["flip_rate_predicted"], q.get("flip_rate_predicted_se")
    agree, z = flip_agreement(predicted, predicted_se, flip, flip_se, reps)
    reason = q.get("r_zero_reason") or ("continuous release (theory.md section 9)" if continuous else None)
    return {
        "quantizer": name,
        "ptq": ptq or report.get("ptq"),
        "n": n,
        "replicates": reps,
        "target": (selection or {}).get("target"),
        "selection_predicted": (selection or {}).get("predicted"),
        "r": r,
        "r_se": q.get("r_population_se"),
        "n_r": n * r,
        "r_zero_reason": reason if r == 0 else None,
        "events": q.get("events"),
        "continuous": continuous,
        "flip_rate": flip,
        "flip_rate_se": flip_se,
        "empirical_rate": plots.empirical_rate(q, n) if 0 < flip < 1 else None,
        "flip_rate_predicted": predicted,
        "flip_rate_predicted_se": predicted_se,
        "flip_union_bound": q["flip_union_bound"],
        "z": z,
        "agree": agree,
        "in_range": 0.02 <= flip <= 0.9,
        "swap_rate": (q.get("swap") or {}).get("rate"),
        "swap_upper": (q.get("swap") or {}).get("upper"),
        "mis_bracket": q["mis_bracket"],
        "mis_asymptotic": q["mis_asymptotic"],
        "asymptotic_regime": q["asymptotic_regime"],
        "sqrt_n_c_min": q["sqrt_n_c_min"],
    }


def study_audit(
    cfg: SyntheticConfig,
    key,
    problem,
    qs,
    *,
    n,
    replicates,
    store,
    tag,
    bar,
    ptq: str | None = None,
    attacks: Sequence[str] | None = None,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """One audit of the study, its stages stored under ``tag``; returns the report's dictionary (``ptq`` and
    ``attacks`` default to part two's)."""
    return audit(
        key,
        problem,
        qs,
        n=n,
        replicates=replicates,
        ptq=ptq or cfg.ptq,
        method=cfg.method,
        attacks=cfg.attacks if attacks is None else attacks,
        chunk_size=chunk_size,
        memory_budget=cfg.memory_budget,
        store=store.prefixed(tag + "."),
        progress=None if bar is None else (lambda stage, done: bar.set_postfix_str(f"{tag} {stage} {done}")),
    ).to_dict()


def _no_size_reason(entry: dict[str, Any], grid: Sequence[int], *, n0: float, alpha: float | None) -> str:
    """Why a quantizer got no size: continuous, ``r = 0`` at the pilot, or flips too rare / too common."""
    if entry["continuous"]:
        return "continuous release: r = 0 (theory.md section 9), no flip to predict"
    if not entry["c"]:
        return "no event at the pilot"
    lo = predicted_flip(entry["c"], grid[-1], n0=n0, alpha=alpha)
    hi = predicted_flip(entry["c"], grid[0], n0=n0, alpha=alpha)
    why = f"predicted flip {hi:.3g} at n = {grid[0]} and {lo:.3g} at n = {grid[-1]}"
    if entry["r"] == 0 and entry.get("r_zero_reason"):
        why += f"; r = 0 at the pilot: {entry['r_zero_reason']}"
    return why


def run_validation(cfg: SyntheticConfig, store: ResultStore, key: jax.Array, bar=None) -> dict[str, Any]:
    """Part one of the study (see the module docstring); returns its dictionary for ``report.json``."""
    problem = validation_problem(cfg)
    names = validation_names(cfg)
    grid = size_grid(n_min=cfg.validation_n_min, n_max=cfg.validation_n_max)
    n0 = cfg.validation_pilot_n

    def point(tag, compute):
        if bar is not None:
            bar.set_description(tag)
        return study_point(store, tag, compute)

    def population(tag, n, qnames, ptq, k):
        return point(tag, lambda: population_only(cfg, k, problem, validation_quantizer_set(cfg, qnames, n), n=n,
                                                  ptq=ptq))  # fmt: skip

    pilot, sizes, selection, no_sizes = {}, {}, {}, {}
    for ptq in cfg.validation_ptqs:
        entries = population(f"validation-pilot-{ptq}", n0, names, ptq, jax.random.fold_in(key, 0))
        pilot[ptq] = {"n": n0, "quantizers": entries}
        selection[ptq], sizes[ptq], no_sizes[ptq] = {}, {}, {}
        for name in names:
            e = entries[name]
            adaptive = name == "grid_adaptive"
            alpha = cfg.adaptive_alpha if adaptive else None

            def probe(n, name=name, ptq=ptq):
                got = population(f"validation-probe-{ptq}-{name}-n{n}", n, [name], ptq, jax.random.fold_in(key, n))
                return got[name]["c"], got[name]["flip_rate_predicted"] or 0.0

            chosen = [] if e["continuous"] else select_sizes(
                e["c"], grid=grid, targets=cfg.validation_flip_targets, n0=n0, alpha=alpha,
                probe=probe if adaptive else None,
            )  # fmt: skip
            selection[ptq][name] = chosen
            sizes[ptq][name] = [c["n"] for c in chosen]
            if not chosen:
                no_sizes[ptq][name] = _no_size_reason(e, grid, n0=n0, alpha=alpha)
    rows = []
    for ptq in cfg.validation_ptqs:
        by_size: dict[int, dict[str, dict[str, Any]]] = {}
        for name, chosen in selection[ptq].items():
            for c in chosen:
                by_size.setdefault(c["n"], {})[name] = c
        for n in sorted(by_size):
            group = by_size[n]
            reps = max(replicates_for(c["predicted"], cfg) for c in group.values())

            def compute(n=n, group=group, reps=reps, ptq=ptq):
                qs = validation_quantizer_set(cfg, list(group), n)
                return study_audit(cfg, jax.random.fold_in(key, n), problem, qs, n=n, replicates=reps, store=store,
                                   tag=f"validation-{ptq}-n{n}", bar=bar, ptq=ptq, attacks=cfg.validation_attacks,
                                   chunk_size=min(VALIDATION_CHUNK, reps))  # fmt: skip

            rep = point(f"report-validation-{ptq}-n{n}", compute)
            rows += [validation_row(name, rep, ptq=ptq, selection=group[name]) for name in group]
    rows.sort(key=lambda r: (names.index(r["quantizer"]), cfg.validation_ptqs.index(r["ptq"]), r["n"]))
    width = width_study(cfg, rows, problem, store, key, point)
    judged = [r for r in rows if r["agree"] is not None]
    star = problem.population(None) if problem.population is not None else {}  # closed form (l2 = 0)
    return {
        "problem": problem.info(),
        "theta_star": {k: np.asarray(v, np.float64).ravel().tolist() for k, v in star.items()},
        "ptqs": list(cfg.validation_ptqs),
        "targets": list(cfg.validation_flip_targets),
        "se_target": cfg.validation_se,
        "replicates": cfg.validation_replicates,
        "attacks": list(cfg.validation_attacks),
        "agreement_z": AGREEMENT_Z,
        "n_min": cfg.validation_n_min,
        "n_max": cfg.validation_n_max,
        "pilot": pilot,
        "sizes": sizes,
        "selection": selection,
        "no_sizes": no_sizes,
        "rows": rows,
        "width": width,
        "summary": {
            "points": len(rows),
            "judged": len(judged),
            "agree": sum(bool(r["agree"]) for r in judged),
            "in_range": sum(bool(r["in_range"]) for r in rows),
        },
    }


def width_study(cfg: SyntheticConfig, rows, problem, store, key, point) -> list[dict[str, Any]]:
    """The certified bracket against the replicate count (theory.md section 10: its width shrinks with R, not n):
    the first discrete quantizer under the first PTQ, at its size whose Monte Carlo flip is nearest 0.25, audited
    again with each of ``validation_width_replicates`` (other replicates), next to the point itself."""
    ptq = cfg.validation_ptqs[0]
    discrete = [r for r in rows if not r["continuous"] and r["ptq"] == ptq]
    if not discrete or not cfg.validation_width_replicates:
        return []
    first = discrete[0]["quantizer"]
    mine = [r for r in discrete if r["quantizer"] == first]
    base = min(mine, key=lambda r: abs(_logit(r["flip_rate"]) - _logit(0.25)))
    out = [base]  # the point itself, at its own replicate count
    for rr in sorted(set(cfg.validation_width_replicates) - {base["replicates"]}):

        def compute(rr=rr):
            qs = validation_quantizer_set(cfg, [first], base["n"])
            return study_audit(cfg, jax.random.fold_in(key, 1), problem, qs, n=base["n"], replicates=rr, store=store,
                               tag=f"validation-width-{ptq}-r{rr}", bar=None, ptq=ptq,
                               attacks=cfg.validation_attacks, chunk_size=min(VALIDATION_CHUNK, rr))  # fmt: skip

        out.append(validation_row(first, point(f"report-validation-width-{ptq}-r{rr}", compute), ptq=ptq))
    return sorted(out, key=lambda r: r["replicates"])


def make_problem(cfg: SyntheticConfig, model: str):
    if model == "logistic":
        return problems.logistic_mixture(dim=cfg.dim, k_modes=cfg.k_modes, seed=cfg.seed)
    return problems.mlp_mixture(dim=cfg.dim, k_modes=cfg.k_modes, hidden=cfg.hidden, seed=cfg.seed)


def estimate_bytes(cfg: SyntheticConfig) -> int:
    """Rough peak bytes of one replicate (as estimated by the audit), to refuse impossible budgets: the larger of
    part two at its largest n and part one (logistic, ``validation_dim``) at ``validation_n_max``."""
    p = cfg.dim + 1 if "mlp" not in cfg.models else (cfg.dim + 2) * cfg.hidden + 1
    need = replicate_bytes(n=max(cfg.n_values), p=p, dx=cfg.dim)
    if cfg.validation:
        need = max(need, replicate_bytes(n=cfg.validation_n_max, p=cfg.validation_dim + 1, dx=cfg.validation_dim))
    return need


def run(
    cfg: SyntheticConfig,
    out: str,
    *,
    resume: bool = False,
    progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study into directory ``out``; returns the ``report.json`` dictionary."""
    cfg = validate(cfg)
    need = estimate_bytes(cfg)
    if need > cfg.memory_budget:
        raise ValueError(
            f"one replicate needs about {need / 2**20:.3g} MiB at n = {max(cfg.n_values)} (or part one's "
            f"validation_n_max = {cfg.validation_n_max}), more than "
            f"--memory-budget {cfg.memory_budget} bytes ({cfg.memory_budget / 2**20:.3g} MiB); raise the budget or "
            "lower --n"
        )
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    config["study"] = "synthetic"
    store = ResultStore(out, config, resume=resume)
    points = [(m, n) for m in cfg.models for n in sorted(cfg.n_values)]
    bar = progress_bar(len(points) + int(cfg.validation), progress)
    runs = []
    key = jax.random.key(cfg.seed)
    validation = None
    if cfg.validation:
        validation = run_validation(cfg, store, jax.random.fold_in(key, len(MODELS)), bar)
        bar.update(1)
    models = {model: make_problem(cfg, model) for model in cfg.models}  # one object: programs compile once
    for model, n in points:
        problem = models[model]
        tag = f"{model}-n{n}"
        bar.set_description(tag)

        def compute(model=model, n=n, problem=problem, tag=tag):
            k = jax.random.fold_in(jax.random.fold_in(key, MODELS.index(model)), n)
            qs = quantizer_set(cfg, n)
            return study_audit(cfg, k, problem, qs, n=n, replicates=cfg.replicates, store=store, tag=tag, bar=bar)

        run_report = study_point(store, f"report-{tag}", compute)
        runs.append(run_report)
        if on_point is not None:
            on_point(run_report)
        bar.update(1)
    bar.close()
    return write_outputs(out, runs, config, validation=validation)


def write_outputs(
    out: str, runs: Sequence[dict[str, Any]], config: dict[str, Any], *, validation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``report.json``, ``report.md`` and the figures from finished runs (part one's ``validation`` if it ran)."""
    first_model = runs[0]["problem"]["name"]
    main = max((r for r in runs if r["problem"]["name"] == first_model), key=lambda r: r["n"])
    figures = []
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)

    def fig(name, fn, *args, **kw):
        path = os.path.join(out, "figures", name)
        fn(*args, path, **kw)
        figures.append(os.path.join("figures", name))

    fig("indicator.png", plots.plot_indicator, main)
    for pname in dict.fromkeys(r["problem"]["name"] for r in runs):
        pruns = [r for r in runs if r["problem"]["name"] == pname]
        if len(pruns) > 1:
            fig(
                f"rates_vs_n_{pname}.png",
                plots.plot_rates_vs_n,
                pruns,
                names=[
                    q
                    for q in ("grid_fixed", "grid_adaptive", "int4", "ternary", "sign", "fp32")
                    if q in pruns[0]["quantizers"]
                ],
            )
    for attack in ("lira", "loss"):
        if any(attack in q.get("attacks", {}) for q in main["quantizers"].values()):
            fig(f"roc_{attack}.png", plots.plot_roc, main, attack=attack)
    if any("lira" in q.get("attacks", {}) for q in main["quantizers"].values()):
        fig("indicator_vs_lira.png", plots.plot_indicator_vs_attack, main, attack="lira")
    fig("privacy_utility.png", plots.plot_privacy_utility, main)
    val_figures = []
    if validation is not None:
        for name, fn, arg in (
            ("validation_rates.png", plots.plot_flip_agreement, validation["rows"]),
            ("validation_bracket.png", plots.plot_validation_bracket, validation["rows"]),
            ("validation_width.png", plots.plot_bracket_width, validation["width"]),
            ("validation_pilot_indicator.png", plots.plot_validation_pilot, validation["pilot"]),
        ):
            if arg:
                fig(name, fn, arg)
                val_figures.append(figures.pop())
    report = dict(main)
    report["study"] = "synthetic"
    report["study_config"] = config
    report["study_config_hash"] = config_hash(config)
    report["environment"] = environment()
    report["diagnostics"] = study_diagnostics(main["diagnostics"])
    report["indicator_vs_lira"] = plots.indicator_attack_agreement(main, attack="lira")
    report["runs"] = list(runs)
    report["validation"] = validation
    write_json(os.path.join(out, "report.json"), report)
    md = markdown.render(
        "qmis_jax synthetic study",
        runs,
        figures=figures,
        validation=validation,
        validation_figures=val_figures,
    )
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(md)
    return report
