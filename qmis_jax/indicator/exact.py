"""Exact membership advantages and flip probabilities: reference values for tests and reports.

theory.md sections 1, 5 and 7. Gaussian mean: data ``Z_i ~ N(mu, sigma^2)``, squared loss, ERM = the sample mean
``Zbar``. Written with NumPy/SciPy in float64 (they are references, not the batched core).

- Quantized release on a fixed grid of step ``h`` (``R = h round(Zbar / h)``, the round-to-nearest and the
  loss-minimising release coincide for this separable quadratic): ``Delta = E_z TV(P(R = . | Z_1 = z), P(R = .))``
  with ``Zbar ~ N(mu, sigma^2 / n)`` and ``Zbar | Z_1 = z ~ N((z + (n - 1) mu) / n, (n - 1) sigma^2 / n^2)``: a sum
  over grid cells of differences of normal probabilities, integrated over ``z`` by adaptive quadrature.
- Any piecewise-constant release ``R = Q(Zbar)`` (:func:`gaussian_mean_release_delta`): the cells of ``Q``'s own
  function of ``Zbar`` are found by evaluating ``Q`` on a fine grid and refining each jump by bisection; releases
  are told apart by their codes (element and scale codes, theory.md section 9), then the same quadrature.
- Full-precision release in ``d`` dimensions (``Z ~ N(mu, I_d)``, ``R = Zbar``): ``Delta = E_z TV(N(mu + (z - mu)/n,
  (n - 1)/n^2 I), N(mu, I/n))`` by a reduced Monte Carlo: the likelihood ratio depends on three scalars only.
- :func:`gaussian_mean_mis_approximation`: the closed-form section-5 approximation ``sum_k p_k f_k`` for the
  quantized release, to compare with the exact value.
- :func:`loss_ptq_flip_exact` (any small model, ``p <= 6``, on a fixed grid): the flip probability of
  loss-minimising PTQ in the Gaussian limit, with the descent simulated on draws of the joint Gaussian of
  ``theta_hat`` and ``L_n`` at the codebook points near ``theta*`` (theory.md sections 2, 3(a) and 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from scipy import integrate, optimize
from scipy import stats as sps
from scipy.linalg import lapack
from scipy.special import ndtr

from qmis_jax._checks import check_key
from qmis_jax._random import numpy_rng
from qmis_jax.quantizers import get as get_quantizer

from .ptq import _check_sweeps

__all__ = [
    "LossPtqFlip",
    "ReleaseCells",
    "gaussian_mean_fp_delta",
    "gaussian_mean_gaps",
    "gaussian_mean_mis_approximation",
    "gaussian_mean_quantized_delta",
    "gaussian_mean_release_cells",
    "gaussian_mean_release_delta",
    "loss_ptq_flip_exact",
]


def _check_positive(name: str, value, *, integer: bool = False) -> float:
    ok_type = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value <= 0:
        kind = "a positive int" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {name}={value!r}")
    return float(value)


def _cdf_gap(x: np.ndarray, m_a: float, s_a: float, m_b: float, s_b: float) -> np.ndarray:
    """``F_a(x) - F_b(x)`` for two normal laws, accurate in both tails (lower tail by cdf, upper by sf)."""
    lower = x < 0.5 * (m_a + m_b)
    za, zb = (x - m_a) / s_a, (x - m_b) / s_b
    return np.where(lower, ndtr(za) - ndtr(zb), ndtr(-zb) - ndtr(-za))


def _cells(mu: float, sd: float, step: float, spread: float) -> np.ndarray:
    """Grid points ``r = h k`` whose cell ``[r - h/2, r + h/2)`` meets ``mu +- spread sd``."""
    lo = math.floor((mu - spread * sd) / step - 0.5) - 1
    hi = math.ceil((mu + spread * sd) / step + 0.5) + 1
    return step * np.arange(lo, hi + 1, dtype=np.float64)


def gaussian_mean_quantized_delta(
    n: int, *, mu: float, sigma: float = 1.0, step: float = 1.0, epsrel: float = 1e-8
) -> float:
    """Exact ``Delta`` of the grid-quantized sample mean (theory.md sections 1, 5 and 7).

    ``R = h round(Zbar / h)`` with ``Z_i ~ N(mu, sigma^2)`` i.i.d. For a grid point ``r`` with cell
    ``[r - h/2, r + h/2)``, ``P(R = r) = F_0(r + h/2) - F_0(r - h/2)`` with ``F_0`` the cdf of ``N(mu, sigma^2 / n)``
    and ``P(R = r | Z_1 = z)`` the same with ``N((z + (n - 1) mu) / n, (n - 1) sigma^2 / n^2)``. Then
    ``Delta = integral phi_sigma(z - mu) (1/2) sum_r |P(R = r | z) - P(R = r)| dz``, each cell difference formed
    from tail-accurate cdf differences, integrated over ``mu +- 12 sigma`` by adaptive quadrature
    (``scipy.integrate.quad``, relative tolerance ``epsrel``) between the kinks where a cell difference changes
    sign. Accurate to many digits even when ``Delta`` is ``1e-11`` (``n = 1000`` in section 5).

    Args:
      n: training-set size (>= 2).
      mu: mean of the data law. sigma: its standard deviation (> 0). step: grid step ``h`` (> 0).
      epsrel: relative tolerance of the quadrature.

    Returns:
      ``Delta`` (a float in ``[0, 1]``); the MIS is ``1 - Delta``.

    >>> round(gaussian_mean_quantized_delta(100, mu=0.3) * 1e3, 3)
    4.308
    """
    n = int(_check_positive("n", n, integer=True))
    if n < 2:
        raise ValueError(f"n must be >= 2, got n={n}")
    sigma = _check_positive("sigma", sigma)
    step = _check_positive("step", step)
    mu = float(mu)
    s0 = sigma / math.sqrt(n)
    s1 = sigma * math.sqrt(n - 1) / n
    half = 0.5 * step
    cells = _cells(mu, s0, step, 12.0 + 12.0 / math.sqrt(n))

    def cell_gaps(z):
        m1 = (z + (n - 1) * mu) / n
        return _cdf_gap(cells + half, m1, s1, mu, s0) - _cdf_gap(cells - half, m1, s1, mu, s0)

    return _integrate_cell_gaps(cell_gaps, cells.size, mu, sigma, epsrel)


def _integrate_cell_gaps(cell_gaps: Callable[[float], np.ndarray], n_cells: int, mu: float, sigma: float, epsrel):
    """``integral phi_sigma(z - mu) (1/2) sum_c |gap_c(z)| dz`` over ``mu +- 12 sigma``, split at the kinks where a
    cell gap changes sign (located on a grid, refined by brentq), each smooth piece by adaptive quadrature."""

    def integrand(z: float) -> float:
        tv = 0.5 * np.sum(np.abs(cell_gaps(z)))
        return tv * math.exp(-0.5 * ((z - mu) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))

    lo, hi = mu - 12 * sigma, mu + 12 * sigma
    grid = np.linspace(lo, hi, 4001)
    gaps = np.stack([cell_gaps(z) for z in grid])
    kinks = []
    for j in range(n_cells):
        g = gaps[:, j]
        for i in np.nonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0)[0]:
            kinks.append(optimize.brentq(lambda z, j=j: cell_gaps(z)[j], grid[i], grid[i + 1], xtol=1e-14))
    edges = np.unique(np.concatenate([[lo, hi], kinks]))
    val = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        val += integrate.quad(integrand, a, b, epsabs=1e-18, epsrel=epsrel, limit=200)[0]
    return float(val)


class ReleaseCells(NamedTuple):
    """The cells of a piecewise-constant release ``Q(theta_hat)`` of a scalar ``theta_hat``.

    Attributes:
      edges: ``(J,)`` increasing jump points (cell boundaries) inside the searched range.
      codes: ``(J + 1, ...)`` the release's codes on each cell, left to right (cell ``c`` is
        ``[edges[c - 1], edges[c])``, unbounded at both ends).
    """

    edges: np.ndarray
    codes: np.ndarray


def _release_codes_fn(q) -> Callable[[np.ndarray], np.ndarray]:
    """Codes (element and scale codes, packed) of the release of each scalar in a batch, as a one-element leaf."""
    if callable(q) and not hasattr(q, "codes"):
        return lambda t: np.asarray(q(np.asarray(t)))
    q = get_quantizer(q)

    @jax.jit
    def codes(t):
        def one(ti):
            w = ti[None]
            return q.codes(q(w), w)[0]

        return jax.vmap(one)(t)

    return lambda t: np.asarray(codes(jnp.asarray(t, jnp.result_type(float))))


def gaussian_mean_release_cells(q, *, lo: float, hi: float, num: int = 20001, iters: int = 60) -> ReleaseCells:
    """Cells of the release ``Q(theta_hat)`` of a scalar mean over ``[lo, hi]``: grid scan, then bisection.

    ``Q`` is evaluated on ``num`` grid points (a jump narrower than the grid spacing that returns to the same code
    would be missed: choose ``num`` so the spacing is below the narrowest cell); every change of code between
    neighbours is refined by ``iters`` bisection steps (to the floating-point resolution of the quantizer).

    Args:
      q: a quantizer or preset name (applied to a one-element leaf; its codes, scale codes included, tell
        releases apart), or a vectorised function ``theta -> code``.
      lo, hi: the search range.
      num: grid points. iters: bisection steps per jump.

    Returns:
      :class:`ReleaseCells`.

    >>> cells = gaussian_mean_release_cells("sign@e8m0", lo=0.1, hi=3.0)
    >>> [round(e, 6) for e in cells.edges.tolist()]  # 2^(k + 1/2): the E8M0 rounding boundaries of |theta|
    [0.176777, 0.353553, 0.707107, 1.414214, 2.828427]
    """
    codes_of = _release_codes_fn(q)
    grid = np.linspace(float(lo), float(hi), int(num))
    c = codes_of(grid)
    jumps = np.nonzero(np.any((c[1:] != c[:-1]).reshape(len(grid) - 1, -1), axis=1))[0]
    a, b = grid[jumps], grid[jumps + 1]
    ca = c[jumps]
    for _ in range(int(iters)):
        mid = 0.5 * (a + b)
        if mid.size == 0:
            break
        same = np.all((codes_of(mid) == ca).reshape(mid.size, -1), axis=1)
        a, b = np.where(same, mid, a), np.where(same, b, mid)
    cell_codes = np.concatenate([c[:1], c[jumps + 1]])
    return ReleaseCells(edges=0.5 * (a + b), codes=cell_codes)


def gaussian_mean_release_delta(
    n: int, q, *, mu: float, sigma: float = 1.0, epsrel: float = 1e-8, spread: float = 14.0, num: int = 20001
) -> tuple[float, float, float]:
    """Exact ``Delta`` of any piecewise-constant release of the Gaussian mean (theory.md sections 1, 5, 7, 9).

    ``R = Q(Zbar)`` with ``Z_i ~ N(mu, sigma^2)``: the cells of ``Q`` come from :func:`gaussian_mean_release_cells`
    over ``mu +- spread sigma / sqrt(n)`` (beyond, the probability is below ``1e-40``), cells with equal codes are
    one release value, and ``Delta = integral phi_sigma(z - mu) (1/2) sum_r |P(R = r | Z_1 = z) - P(R = r)| dz``
    as in :func:`gaussian_mean_quantized_delta`.

    Args:
      n: training-set size (>= 2).
      q: a quantizer or preset name (or a vectorised ``theta -> code`` function).
      mu: mean of the data law. sigma: its standard deviation (> 0).
      epsrel: relative tolerance of the quadrature. spread: search half-width in standard errors. num: grid
        points of the cell search.

    Returns:
      ``(delta, flip, rate)``: ``Delta``; the probability ``P(R != Q(mu))`` that a release differs from the one
      at ``mu`` (the Monte Carlo flip rate's target); and the exact rate ``d^2 / (2 sigma^2)`` with ``d`` the
      distance from ``mu`` to the nearest cell boundary (``-log P(flip) / n -> rate``).

    >>> delta, flip, rate = gaussian_mean_release_delta(100, "sign@e8m0", mu=1.3)
    >>> round(rate, 5), bool(0 < delta < flip < 1)
    (0.00652, True)
    """
    n = int(_check_positive("n", n, integer=True))
    if n < 2:
        raise ValueError(f"n must be >= 2, got n={n}")
    sigma = _check_positive("sigma", sigma)
    mu = float(mu)
    s0 = sigma / math.sqrt(n)
    s1 = sigma * math.sqrt(n - 1) / n
    cells = gaussian_mean_release_cells(q, lo=mu - spread * s0, hi=mu + spread * s0, num=num)
    edges = cells.edges
    lower = np.concatenate([[-np.inf], edges])
    upper = np.concatenate([edges, [np.inf]])
    flat = cells.codes.reshape(len(cells.codes), -1)
    _, group = np.unique(flat, axis=0, return_inverse=True)
    group = np.asarray(group).ravel()
    n_groups = int(group.max()) + 1
    onehot = np.zeros((len(group), n_groups))
    onehot[np.arange(len(group)), group] = 1.0

    def cell_gaps(z):
        m1 = (z + (n - 1) * mu) / n
        per_cell = _cdf_gap(upper, m1, s1, mu, s0) - _cdf_gap(lower, m1, s1, mu, s0)
        return per_cell @ onehot

    delta = _integrate_cell_gaps(cell_gaps, n_groups, mu, sigma, epsrel)
    home = int(np.searchsorted(edges, mu, side="right"))
    same = group == group[home]
    p_same = float(np.sum((ndtr((upper - mu) / s0) - ndtr((lower - mu) / s0))[same]))
    flip = 1.0 - p_same
    if edges.size:
        dist = float(np.min(np.abs(edges - mu)))
        rate = dist**2 / (2 * sigma**2)
    else:
        rate = math.inf
    return delta, flip, rate


def gaussian_mean_gaps(*, mu: float, sigma: float = 1.0, step: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Population gaps of the grid release of the Gaussian mean (theory.md sections 3(a) and 4).

    The release is the grid point ``r0`` nearest ``mu``; its competitors ``r0 -/+ h`` have loss differences
    ``D_-/+(z) = h^2 / 2 -/+ h (r0 - z)`` per unit ``sigma^2`` of the loss ``(theta - z)^2 / (2 sigma^2)``, i.e.
    ``delta_-/+ = (h^2 / 2 -/+ h (r0 - mu)) / sigma^2`` and ``sigma_-/+ = h / sigma``. For ``mu = 0.3``, ``h = 1``:
    ``c_+ = 0.2``, ``r = 0.02``.

    Args:
      mu: mean. sigma: standard deviation. step: grid step ``h``.

    Returns:
      ``(delta, sd)``: ``(2,)`` arrays, move down then move up.
    """
    sigma = _check_positive("sigma", sigma)
    step = _check_positive("step", step)
    r0 = step * round(float(mu) / step)
    delta = np.array([0.5 * step**2 + step * (float(mu) - r0), 0.5 * step**2 - step * (float(mu) - r0)]) / sigma**2
    return delta, np.full(2, step / sigma)


def gaussian_mean_mis_approximation(n: int, *, mu: float, sigma: float = 1.0, step: float = 1.0) -> float:
    """Section-5 approximation ``sum_k p_k f_k`` of ``Delta`` for the grid-quantized Gaussian mean.

    ``c_k = delta_k / sigma_k`` from :func:`gaussian_mean_gaps`, ``p_k = Phi(-sqrt(n) c_k)``,
    ``f_k = 4 Phi(c_k / 2) - 2`` (exact Gaussian loss differences, so the two methods of section 5 coincide).

    Args:
      n: training-set size. mu, sigma, step: as in :func:`gaussian_mean_quantized_delta`.

    Returns:
      The approximation of ``Delta = 1 - MIS``.

    >>> round(gaussian_mean_mis_approximation(100, mu=0.3) / gaussian_mean_quantized_delta(100, mu=0.3), 2)
    0.84
    """
    n = _check_positive("n", n, integer=True)
    delta, sd = gaussian_mean_gaps(mu=mu, sigma=sigma, step=step)
    c = delta / sd
    return float(np.sum(sps.norm.cdf(-math.sqrt(n) * c) * (4.0 * sps.norm.cdf(c / 2.0) - 2.0)))


def gaussian_mean_fp_delta(
    key: jax.Array, n: int, d: int, *, num_samples: int = 1_000_000, batch: int = 250_000
) -> tuple[float, float]:
    """``Delta`` of the full-precision Gaussian mean in ``d`` dimensions by reduced Monte Carlo (section 7).

    ``Z ~ N(mu, I_d)``, ``R = Zbar``. Given ``Z_1 = z`` write ``u = z - mu``; then ``P_z = N(mu + u / n, s1^2 I)``
    with ``s1^2 = (n - 1) / n^2`` and ``Q = law(R) = N(mu, s0^2 I)``, ``s0^2 = 1 / n``, and
    ``Delta = E_u TV(P_z, Q) = E_{u, R ~ P_z} (1 - dQ/dP_z(R))_+``. With ``R = mu + u / n + s1 xi``,
    ``log dQ/dP_z = d log(s1 / s0) + |xi|^2 / 2 - |u / n + s1 xi|^2 / (2 s0^2)`` depends only on
    ``a = |u|^2 ~ chi2_d``, ``b = xi . u / |u| ~ N(0, 1)`` and ``c = |xi|^2 - b^2 ~ chi2_{d - 1}`` (independent,
    by rotation invariance): ``|u/n + s1 xi|^2 = a / n^2 + 2 s1 b sqrt(a) / n + s1^2 (b^2 + c)``. The estimate is
    the sample mean of ``(1 - exp(log dQ/dP))_+`` over ``num_samples`` draws of ``(a, b, c)``; the result does not
    depend on ``mu``.

    Args:
      key: JAX PRNG key of the Monte Carlo draws (a NumPy generator derived from it, host-side).
      n: training-set size (>= 2). d: dimension (>= 1).
      num_samples: Monte Carlo draws. batch: draws per batch (memory).

    Returns:
      ``(delta, standard_error)``.
    """
    rng = numpy_rng(key)
    n = int(_check_positive("n", n, integer=True))
    d = int(_check_positive("d", d, integer=True))
    num_samples = int(_check_positive("num_samples", num_samples, integer=True))
    batch = int(_check_positive("batch", batch, integer=True))
    if n < 2:
        raise ValueError(f"n must be >= 2, got n={n}")
    s0sq = 1.0 / n
    s1sq = (n - 1) / n**2
    s1 = math.sqrt(s1sq)
    const = 0.5 * d * math.log(s1sq / s0sq)
    total, total_sq, done = 0.0, 0.0, 0
    while done < num_samples:
        k = min(batch, num_samples - done)
        a = rng.chisquare(d, size=k)
        b = rng.standard_normal(k)
        c = rng.chisquare(d - 1, size=k) if d > 1 else np.zeros(k)
        dist_q = a / n**2 + 2.0 * s1 * b * np.sqrt(a) / n + s1sq * (b**2 + c)
        log_ratio = const + 0.5 * (b**2 + c) - dist_q / (2.0 * s0sq)
        vals = -np.expm1(np.minimum(log_ratio, 0.0))
        total += float(np.sum(vals))
        total_sq += float(np.sum(vals**2))
        done += k
    mean = total / num_samples
    var = max(total_sq / num_samples - mean**2, 0.0)
    return mean, math.sqrt(var / num_samples)


# ----------------------------------------------------------------------------------------------------------------
# Loss-minimising PTQ on a fixed grid: the flip probability in the Gaussian limit, simulated exactly
# ----------------------------------------------------------------------------------------------------------------

MAX_EXACT_PARAMS = 6
MAX_EXACT_POINTS = 4096


class LossPtqFlip(NamedTuple):
    """Result of :func:`loss_ptq_flip_exact`.

    Attributes:
      flip: ``P(release != theta_0)`` for loss-minimising PTQ, with every draw whose descent needed a codebook
        point outside the box counted as a flip (an upper bound; ``flip - left_box`` is a lower bound; both are
        the exact value of the Gaussian limit when ``left_box == 0``).
      se: Monte Carlo standard error of ``flip``, ``sqrt(flip (1 - flip) / draws)`` (the error of the population
        means estimated on ``sample_size`` points is not included).
      flip_rtn: ``P(Q(theta_hat) != Q(theta*))``, the same draws released by round-to-nearest.
      se_rtn: its Monte Carlo standard error.
      left_box: fraction of draws whose descent wanted a codebook point outside the enumerated box (start cell
        included); when it is not 0 the answer is not exact (raise ``box``).
      release: ``(p,)`` the population release ``theta_0`` (flat, ``ravel_pytree`` order, ``theta_star``'s float
        dtype): the descent of the population loss from the population start.
      release_rtn: ``(p,)`` the population round-to-nearest release ``Q(theta*)`` (the population start).
      points: number of codebook points enumerated, ``M = (2 box - 1)^p + 2 p (2 box - 1)^(p - 1)``.
      draws: number of Gaussian draws.
      sweeps_capped: fraction of draws whose descent was stopped by ``max_sweeps`` while still moving.
    """

    flip: float
    se: float
    flip_rtn: float
    se_rtn: float
    left_box: float
    release: np.ndarray
    release_rtn: np.ndarray
    points: int
    draws: int
    sweeps_capped: float


def _fixed_grid_step(q) -> float:
    """The step ``h`` of a fixed-step, round-to-nearest uniform grid, else a ValueError naming ``q``."""
    try:
        q = get_quantizer(q)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"q must be a quantizer, got q={q!r}") from err
    if getattr(q, "family", None) != "uniform" or getattr(q, "step", None) is None:
        raise ValueError(
            f"q must be a fixed-step grid (uniform(step=h) or size_adaptive(...)), whose codebook does not depend "
            f"on theta_hat; got q={getattr(q, 'name', q)!r} (family {getattr(q, 'family', None)!r})"
        )
    if q.stochastic:
        raise ValueError(f"q must round to nearest (a deterministic start), got q={q.name!r} with stochastic rounding")
    return float(q.step)


class _Box(NamedTuple):
    """The enumerated codebook points around the centre cell, as integer offsets, and a lookup table.

    ``offsets`` ``(M, p)``: the points of the cube ``{-box..box}^p`` that a descent staying inside it can evaluate:
    every position with all ``|k_j| <= box - 1`` and its single-coordinate neighbours, i.e. the offsets with at
    most one coordinate at ``+-box``. ``(2 box - 1)^p + 2 p (2 box - 1)^(p - 1)`` points (81 of the 125 of
    ``{-2..2}^3``): a position on the face of the cube needs trial points beyond it, so the left-out corners are
    never needed. ``lookup``: ``((2 box + 1)^p,)`` point number of each cube offset (row-major, the last coordinate
    fastest), ``-1`` where left out. ``strides``: ``(p,)`` row-major strides of the cube.
    """

    offsets: np.ndarray
    lookup: np.ndarray
    strides: np.ndarray
    box: int


def _box_points(p: int, box: int) -> _Box:
    width = 2 * box + 1
    axes = np.meshgrid(*([np.arange(-box, box + 1)] * p), indexing="ij")
    cube = np.stack([a.ravel() for a in axes], axis=1).astype(np.int64)
    kept = np.sum(np.abs(cube) == box, axis=1) <= 1
    lookup = np.full(cube.shape[0], -1, np.int64)
    lookup[kept] = np.arange(int(kept.sum()))
    strides = width ** np.arange(p - 1, -1, -1, dtype=np.int64)
    return _Box(cube[kept], lookup, strides, box)


def _box_size(p: int, box: int) -> int:
    return (2 * box - 1) ** p + 2 * p * (2 * box - 1) ** (p - 1)


def _sample_moments(problem, theta, unravel, points, x, y, chunk):
    """Per-sample ``(grad l(theta*, z), l(a_1, z), ..., l(a_M, z))`` over the sample, streamed in chunks.

    Returns ``(mean, cov, hessian)`` in float64: the mean and covariance of that vector and the mean Hessian of
    ``l`` at ``theta*``."""

    def flat_loss(t, xi, yi):
        return problem.loss(unravel(t), xi, yi)

    glm = problem.design is not None and problem.margin_loss is not None
    penalty_term = None
    if glm and problem.penalty is not None:
        pen = jnp.asarray(problem.penalty, points.dtype)
        penalty_term = 0.5 * jnp.sum(pen[None, :] * points * points, axis=1)

    @jax.jit
    def block(xc, yc, keep, shift):
        """Sums over one chunk (rows with ``keep`` false left out): of ``w - shift``, of its outer products and of
        the Hessians, ``w`` the per-sample vector."""
        grads = jax.vmap(jax.grad(flat_loss), in_axes=(None, 0, 0))(theta, xc, yc)
        hess = jax.vmap(jax.hessian(flat_loss), in_axes=(None, 0, 0))(theta, xc, yc)
        weight = keep.astype(grads.dtype)
        if glm:
            eta = problem.design(xc) @ points.T
            losses = problem.margin_loss(eta, jnp.broadcast_to(yc[:, None], eta.shape))
            if penalty_term is not None:
                losses = losses + penalty_term[None, :]
        else:
            per_point = jax.vmap(flat_loss, in_axes=(0, None, None))
            losses = jax.vmap(lambda xi, yi: per_point(points, xi, yi))(xc, yc)
        w = jnp.concatenate([grads, losses.astype(grads.dtype)], axis=1)
        wc = (w - shift.astype(w.dtype)[None, :]) * weight[:, None]
        return jnp.sum(wc, axis=0), wc.T @ wc, jnp.einsum("i,ijk->jk", weight, hess)

    total = x.shape[0]

    def chunks():
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            xc, yc = x[start:stop], y[start:stop]
            pad = chunk - (stop - start)
            if pad:  # one compiled shape: pad with copies of the first rows, left out of every sum
                xc = jnp.concatenate([xc, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))], axis=0)
                yc = jnp.concatenate([yc, jnp.broadcast_to(y[:1], (pad,))], axis=0)
            yield xc, yc, jnp.arange(chunk) < stop - start, stop - start

    # a pilot mean (of the first chunk) against cancellation in the second moments
    xc, yc, keep, count = next(chunks())
    dim = theta.size + points.shape[0]
    shift = np.asarray(block(xc, yc, keep, jnp.zeros(dim))[0], np.float64) / count
    s1 = np.zeros(dim)
    s2 = np.zeros((dim, dim))
    hess_sum = np.zeros((theta.size, theta.size))
    for xc, yc, keep, _ in chunks():
        a, b, c = block(xc, yc, keep, jnp.asarray(shift))
        s1 += np.asarray(a, np.float64)
        s2 += np.asarray(b, np.float64)
        hess_sum += np.asarray(c, np.float64)
    m1 = s1 / total
    cov = s2 / total - np.outer(m1, m1)
    return shift + m1, 0.5 * (cov + cov.T), hess_sum / total


def _psd_factor(cov: np.ndarray) -> np.ndarray:
    """``F`` ``(m, r)`` with ``F F^T = cov`` for a positive semidefinite ``cov``: the pivoted Cholesky factorisation
    (LAPACK ``dpstrf``), stopped at the numerical rank ``r`` (remaining pivots below ``m eps max(diag)``), so a
    singular or slightly indefinite estimate is clipped to its positive part."""
    m = cov.shape[0]
    if m == 0 or not np.any(np.diag(cov) > 0):
        return np.zeros((m, 0))
    c, piv, rank, info = lapack.dpstrf(0.5 * (cov + cov.T), lower=1)
    if info < 0:
        raise ValueError(f"the covariance could not be factorised (dpstrf info={info})")
    factor = np.empty((m, rank))
    factor[piv - 1] = np.tril(c)[:, :rank]
    return factor


def _descend(values: np.ndarray, start: np.ndarray, grid: _Box, max_sweeps: int):
    """Loss-PTQ descents on the enumerated points, vectorised over draws (the rules of ``ptq_loss``).

    Args:
      values: ``(D, M)`` the mean losses ``L_n(a_j)`` of each draw at the enumerated points.
      start: ``(D, p)`` integer offsets of the round-to-nearest starts from the centre cell.
      grid: the enumerated points. max_sweeps: bound on the sweeps.

    Returns:
      ``(final, left, capped)``: ``(D, p)`` final offsets, ``(D,)`` whether the descent needed a point that is not
      enumerated (it stops there, its final offsets are then not a release), ``(D,)`` whether ``max_sweeps``
      stopped it while still moving.
    """
    d, p = start.shape
    box, strides, lookup = grid.box, grid.strides, grid.lookup
    rows = np.arange(d)
    k = start.astype(np.int64).copy()
    left = np.zeros(d, bool)
    active = np.ones(d, bool)

    def point(offsets):
        """Point numbers of ``(D, p)`` offsets, ``-1`` outside the enumerated set."""
        inside = np.all(np.abs(offsets) <= box, axis=1)
        cell = np.where(inside, (np.clip(offsets, -box, box) + box) @ strides, 0)
        return np.where(inside, lookup[cell], -1)

    for _ in range(max_sweeps):
        if not active.any():
            break
        moved = np.zeros(d, bool)
        for j in range(p):
            unit = np.zeros(p, np.int64)
            unit[j] = 1
            here, lo, up = point(k), point(k - unit[None, :]), point(k + unit[None, :])
            out = active & ((here < 0) | (lo < 0) | (up < 0))
            left |= out
            active &= ~out
            v_here = values[rows, np.maximum(here, 0)]
            d_lo = values[rows, np.maximum(lo, 0)] - v_here
            d_up = values[rows, np.maximum(up, 0)] - v_here
            up_wins = d_up < d_lo  # ties go to the lower level, as in ptq_loss
            accept = active & (np.minimum(d_lo, d_up) < 0)
            k[:, j] += np.where(accept, np.where(up_wins, 1, -1), 0)
            moved |= accept
        active &= moved
    return k, left, active


def loss_ptq_flip_exact(
    key: jax.Array,
    problem,
    q,
    theta_star,
    *,
    n: int,
    draws: int = 20_000,
    box: int = 2,
    sample_size: int = 200_000,
    max_sweeps: int | None = None,
    chunk_size: int = 8192,
) -> LossPtqFlip:
    """The flip probability of loss-minimising PTQ on a fixed grid in the Gaussian limit, simulated exactly.

    theory.md section 3(a): the loss-PTQ release (:func:`~qmis_jax.indicator.ptq_loss`) is a deterministic function
    of the round-to-nearest start cell of ``theta_hat`` and of the signs of the comparisons ``L_n(b) - L_n(a)``
    between codebook points that its descent makes. With a codebook that does not depend on ``theta_hat`` (a
    fixed grid ``uniform(step=h)`` or ``size_adaptive``) all of them are functions of one Gaussian vector:

    - Points: the grid points ``a_1..a_M`` of the box ``round(theta*/h) + {-box..box}^p`` that a descent staying
      in the box can evaluate (positions in ``{-(box-1)..box-1}^p`` and their single-coordinate neighbours:
      ``M = (2 box - 1)^p + 2 p (2 box - 1)^(p - 1)``, 81 of the 125 points of ``{-2..2}^3``; the corners left
      out are never needed, so the result is that of the full box).
    - Per sample ``V(z) = (psi(z), l(a_1, z), ..., l(a_M, z))`` with the influence
      ``psi(z) = -H^-1 grad l(theta*, z)`` (``H`` the mean Hessian at ``theta*``), so
      ``theta_hat - theta* ~ mean_i psi(Z_i)`` (section 2). By the CLT for ``mean_i V(Z_i)``,
      ``(theta_hat - theta*, L_n(a_1), ..., L_n(a_M))`` is jointly Gaussian with mean ``(0, L(a_1), ..., L(a_M))``
      and covariance ``Cov V / n``: the joint law of every start event and path decision of section 3(a), whose
      one-event Gaussian tails are the ``p_k = Phi(-sqrt(n) c_k)`` of section 5.
    - ``Cov V`` and ``L(a_j)`` come from ``sample_size`` fresh points. ``E grad l(theta*, Z) = 0`` serves as a
      control variate: ``L(a_j)`` is the sample mean of ``l(a_j, Z)`` minus its regression on the sample mean of
      the gradient, which removes the first-order sampling error of the gaps ``L(a) - L(b)`` (exactly, for a
      quadratic loss). What is left is of order ``sqrt(n / sample_size)`` times the second-order part of each
      decision's standard deviation; ``theta_star`` must be the population optimum (an estimate's error enters
      the gaps at first order).
    - ``draws`` draws of the vector (pivoted Cholesky factor of the covariance, clipped at its numerical rank).
      Each starts at ``Q(theta_hat)`` computed by ``q`` itself (rounding ties as in the release) and runs the
      descent of ``ptq_loss`` on its drawn ``L_n``: coordinates ``0..p-1`` in order, lower and upper adjacent
      levels tried, the upper taken only if its change is strictly smaller (ties go to the lower), the move
      accepted if that change is negative; sweeps until one moves nothing or ``max_sweeps`` are done. The
      population release ``theta_0`` is the same descent of ``L(a_j)`` from ``Q(theta*)``; ``flip`` is the
      fraction of draws released elsewhere, ``flip_rtn`` the fraction whose start differs from ``Q(theta*)``.

    A draw whose descent needs a point that is not enumerated (a start, position or trial beyond the box) is
    flagged and stops: ``left_box`` is their fraction, counted as flips, so ``flip`` is exact (up to ``se``) only
    when ``left_box`` is 0 (raise ``box`` otherwise). Cost: ``sample_size * (p + M)^2`` for the covariance,
    ``draws * (p + M) * rank`` for the draws; ``M`` is limited to 4096 (``p = 6`` with ``box = 2``: 3645 points,
    about a minute on a CPU at ``sample_size = 100_000``).

    Args:
      key: PRNG key (required): the fresh sample and the Gaussian draws.
      problem: a :class:`~qmis_jax.problems.Problem`: its ``sample`` and per-example ``loss``
        (``design``/``margin_loss``/``penalty`` give a fast path for GLMs).
      q: a fixed-step round-to-nearest grid (``uniform(step=h)``, ``size_adaptive(...)``); a quantizer whose
        codebook depends on the weights (absmax, absmean, fp8...) or that rounds stochastically is a ValueError.
      theta_star: the population optimum ``theta*`` (a parameter pytree of one model), 1 to 6 parameters.
      n: training-set size.
      draws: Gaussian draws. box: half-width of the box of grid points (>= 1; >= 2 to allow any move).
      sample_size: fresh points for the population means and the covariance.
      max_sweeps: bound on the descent's sweeps (default 16, as ``ptq_loss``).
      chunk_size: sample points per compiled block (memory: ``chunk_size * (p + M)`` values).

    Returns:
      :class:`LossPtqFlip`: ``flip``, ``se``, ``flip_rtn``, ``se_rtn``, ``left_box``, ``release`` (``theta_0``),
      ``release_rtn`` (``Q(theta*)``), ``points`` (``M``), ``draws``, ``sweeps_capped``.

    Raises:
      ValueError: a bad argument (named), a quantizer outside the fixed grids, ``p > 6``, more than 4096 points,
        a singular Hessian, or a population descent that leaves the box.
    """
    check_key(key)
    k_sample, k_draw = jax.random.split(key)
    rng = numpy_rng(k_draw)
    step = _fixed_grid_step(q)
    q = get_quantizer(q)
    n = int(_check_positive("n", n, integer=True))
    draws = int(_check_positive("draws", draws, integer=True))
    box = int(_check_positive("box", box, integer=True))
    sample_size = int(_check_positive("sample_size", sample_size, integer=True))
    chunk_size = int(_check_positive("chunk_size", chunk_size, integer=True))
    max_sweeps = _check_sweeps(max_sweeps)
    if not hasattr(problem, "sample") or not hasattr(problem, "loss"):
        raise ValueError(f"problem must be a qmis_jax Problem (sample, loss), got problem={problem!r}")
    theta, unravel = ravel_pytree(theta_star)
    p = int(theta.size)
    if p == 0 or p > MAX_EXACT_PARAMS:
        raise ValueError(f"theta_star must have 1..{MAX_EXACT_PARAMS} parameters for the exact check, got p={p}")
    theta = theta.astype(jnp.result_type(theta, jnp.float32))
    if not bool(jnp.all(jnp.isfinite(theta))):
        raise ValueError(f"theta_star must be finite, got {np.asarray(theta).tolist()}")
    m_points = _box_size(p, box)
    if m_points > MAX_EXACT_POINTS:
        raise ValueError(
            f"box={box} with p={p} parameters needs {m_points} codebook points, above {MAX_EXACT_POINTS}: lower box"
        )
    grid = _box_points(p, box)
    if sample_size <= p + m_points:
        raise ValueError(f"sample_size must exceed p + M = {p + m_points}, got sample_size={sample_size}")

    dtype = theta.dtype
    h = jnp.asarray(step, dtype)

    @jax.jit
    def grid_index(t):  # the release of q on flat vectors, as integer grid indices
        return jnp.round(jax.vmap(q)(t) / h)

    x, y = problem.sample(k_sample, sample_size)
    centre_idx = np.asarray(grid_index(theta[None, :]), np.int64)[0]
    points = h * jnp.asarray(centre_idx[None, :] + grid.offsets, dtype)
    mean, cov, hess = _sample_moments(problem, theta, unravel, points, x, y, min(chunk_size, sample_size))

    # the population gradient at theta* is 0: a control variate for the sample means of the losses
    grad_mean, cov_gg, cov_lg = mean[:p], cov[:p, :p], cov[p:, :p]
    loss_mean = mean[p:] - cov_lg @ (np.linalg.pinv(cov_gg, hermitian=True) @ grad_mean)
    # psi = -H^-1 grad l: transform the gradient block
    try:
        h_inv = np.linalg.inv(hess)
    except np.linalg.LinAlgError as err:
        raise ValueError("the mean Hessian at theta_star is singular: no Gaussian limit for theta_hat") from err
    if not np.all(np.isfinite(h_inv)):
        raise ValueError("the mean Hessian at theta_star is not invertible: no Gaussian limit for theta_hat")
    cov[:p, :] = -h_inv @ cov[:p, :]
    cov[:, :p] = cov[:, :p] @ -h_inv.T
    factor = _psd_factor(cov) / math.sqrt(n)  # (p + M, rank): factor @ factor.T = cov / n
    mean = np.concatenate([np.zeros(p), loss_mean])

    theta64 = np.asarray(theta, np.float64)
    start0 = np.asarray(grid_index(theta[None, :]), np.int64) - centre_idx[None, :]
    final0, left0, _ = _descend(loss_mean[None, :], start0, grid, max_sweeps)
    if left0[0]:
        raise ValueError(f"the population descent leaves the box of half-width box={box} around theta_star: raise box")
    release0 = final0[0]

    flips = flips_rtn = lefts = capped = 0
    per_chunk = max(1, min(draws, (64 << 20) // (8 * (p + m_points))))
    done = 0
    while done < draws:
        size = min(per_chunk, draws - done)
        g = mean[None, :] + rng.standard_normal((size, factor.shape[1])) @ factor.T
        theta_hat = jnp.asarray(theta64[None, :] + g[:, :p], dtype)
        start = np.asarray(grid_index(theta_hat), np.int64) - centre_idx[None, :]
        final, left, still = _descend(g[:, p:], start, grid, max_sweeps)
        flips += int(np.sum(left | np.any(final != release0[None, :], axis=1)))
        flips_rtn += int(np.sum(np.any(start != start0, axis=1)))
        lefts += int(np.sum(left))
        capped += int(np.sum(still))
        done += size

    flip, flip_rtn = flips / draws, flips_rtn / draws
    return LossPtqFlip(
        flip=flip,
        se=math.sqrt(flip * (1.0 - flip) / draws),
        flip_rtn=flip_rtn,
        se_rtn=math.sqrt(flip_rtn * (1.0 - flip_rtn) / draws),
        left_box=lefts / draws,
        release=np.asarray(h * jnp.asarray(centre_idx + release0, dtype)),
        release_rtn=np.asarray(h * jnp.asarray(centre_idx + start0[0], dtype)),
        points=m_points,
        draws=draws,
        sweeps_capped=capped / draws,
    )
