"""Rank estimation by analytic empirical variational Bayesian matrix factorisation (EVBMF).

Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 2013, with the noise-variance estimation
of Nakajima et al., "Condition for perfect dimensionality recovery by VBPCA", 2015. Kim et
al. 2016 run it on the two channel unfoldings of a conv kernel to pick Tucker-2 ranks.

For an L x M matrix (L <= M, alpha = L/M) observed as signal + Gaussian noise of variance
sigma^2, the EVB estimator keeps exactly the singular components with

    s_h > gamma = sigma * sqrt(M * (1 + tau) * (1 + alpha / tau)),

tau the unique zero of Psi(t) = log(t + 1) + alpha * log(t / alpha + 1) - t on t > sqrt(alpha)
(solved numerically here; the common 2.5129 * sqrt(alpha) is its value at alpha = 1 and an
approximation elsewhere). sigma^2, when unknown, minimises the EVB free energy over the
interval where the solution can lie; the rank is the number of components kept.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from .base import svd


def _tau_bar(alpha: float) -> float:
    """Zero of Psi(t) = log(t+1) + alpha log(t/alpha + 1) - t above sqrt(alpha)."""
    psi = lambda t: math.log1p(t) + alpha * math.log1p(t / alpha) - t  # noqa: E731
    lo, hi = math.sqrt(alpha), 4.0 + 4.0 * math.sqrt(alpha)
    while psi(hi) > 0:
        hi *= 2
    return brentq(psi, lo, hi, xtol=1e-14)


def _free_energy(sigma2: float, s2: np.ndarray, l: int, m: int, residual: float, x_bar: float) -> float:
    """EVB free energy (up to constants, times 2/M) as a function of the noise variance."""
    alpha = l / m
    x = s2 / (m * sigma2)
    kept, dropped = x[x > x_bar], x[x <= x_bar]
    tau = 0.5 * (kept - (1 + alpha) + np.sqrt((kept - (1 + alpha)) ** 2 - 4 * alpha))
    dropped = np.maximum(dropped, np.finfo(float).tiny)
    return float(np.sum(dropped - np.log(dropped)) + np.sum(kept - tau) + np.sum(np.log((tau + 1) / kept))
                 + alpha * np.sum(np.log(tau / alpha + 1)) + residual / (m * sigma2)
                 + (l - s2.size) * math.log(sigma2))


def evbmf(s: np.ndarray, shape: tuple[int, int], sigma2: float | None = None) -> tuple[int, float, float]:
    """(rank, noise variance, threshold) from the singular values `s` of a matrix of `shape`.

    `s` may be truncated (the H largest values); the energy of the others is then unknown
    and treated as zero (pass the full spectrum for a full-matrix estimate)."""
    s = np.sort(np.abs(np.asarray(s, dtype=np.float64)))[::-1]
    l, m = sorted(int(v) for v in shape)
    s = s[:l]
    h = s.size
    if h == 0 or s[0] == 0:
        return 0, 0.0, 0.0
    alpha = l / m
    tau = _tau_bar(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    s2 = s**2
    if sigma2 is None:
        residual = 0.0  # with the full spectrum nothing is left over
        upper = (np.sum(s2) + residual) / (l * m)
        h_ub = min(math.ceil(l / (1 + alpha)) - 1, h) - 1  # largest rank EVB can keep (0-based)
        tail = s2[h_ub + 1:] if h_ub + 1 < h else s2[-1:]
        lower = max(tail[0] / (m * x_bar), float(np.mean(tail)) / m)
        if not lower < upper:  # degenerate spectra (e.g. all equal): noise is everything
            sigma2 = upper
        else:
            res = minimize_scalar(_free_energy, args=(s2, l, m, residual, x_bar), bounds=(lower, upper),
                                  method="bounded", options={"xatol": 1e-12 * upper})
            sigma2 = float(res.x)
    threshold = math.sqrt(m * sigma2 * x_bar)
    return int(np.count_nonzero(s > threshold)), float(sigma2), threshold


def vbmf_rank(matrix: np.ndarray, sigma2: float | None = None) -> int:
    """The EVBMF rank estimate of a matrix (0 when nothing stands out of the noise)."""
    a = np.asarray(matrix, dtype=np.float64)
    return evbmf(svd(a, compute_uv=False), a.shape, sigma2)[0]


def vbmf_rank_from_singular_values(s: np.ndarray, n: int, m: int) -> int:
    """A usable rank (>= 1) from a full singular spectrum of an n x m matrix."""
    return max(1, evbmf(s, (n, m))[0])


def vbmf_rank_for_matrix(matrix: np.ndarray) -> int:
    """A usable rank (>= 1) for a dense weight: EVBMF on the matrix itself."""
    return max(1, vbmf_rank(matrix))


def vbmf_ranks_for_conv(kernel: np.ndarray) -> tuple[int, int]:
    """Tucker-2 ranks (r_out, r_in) of a T x S x k... kernel (Kim et al. 2016): EVBMF on the
    mode-0 unfolding (T x S k) and the mode-1 unfolding (S x T k), each at least 1."""
    k = np.asarray(kernel, dtype=np.float64)
    t, s = k.shape[:2]
    return vbmf_rank_for_matrix(k.reshape(t, -1)), vbmf_rank_for_matrix(np.moveaxis(k, 1, 0).reshape(s, -1))
