"""Exact membership advantages for the Gaussian mean: reference values for tests and reports.

theory.md sections 1, 5 and 7. Data ``Z_i ~ N(mu, sigma^2)``, squared loss, ERM = the sample mean ``Zbar``.
Written with NumPy/SciPy in float64 (they are references, not the batched core).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate, optimize
from scipy import stats as sps
from scipy.special import ndtr

from qmis_jax._random import numpy_rng
from qmis_jax.quantizers import get as get_quantizer

__all__ = [
    "ReleaseCells",
    "gaussian_mean_fp_delta",
    "gaussian_mean_gaps",
    "gaussian_mean_mis_approximation",
    "gaussian_mean_quantized_delta",
    "gaussian_mean_release_cells",
    "gaussian_mean_release_delta",
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
