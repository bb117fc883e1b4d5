"""Cheap error estimates for the planner: what a candidate costs in error, found before (or
instead of) fitting it, so that `--format auto` and `--budget` fit only what can still win.

- svd: one SVD of the layer's matrix (data-free) or of its whitened target B (data-aware,
  tnonnx/fit.py) gives the error of the truncation at every rank exactly: the squared
  relative error at rank r is the spectrum's energy beyond r over its total, and the error
  on held-out calibration samples follows from cumulative sums (_held_out_errors).
- formats slow to fit (tr's ALS, cp's ALS: SLOW_FIT with a PROXY format) are fitted at a
  rank cap only where their fast proxy at the same cap (tt for tr) came within SLOW_MARGIN
  of the best candidate at its parameter count: a ring is a train with one more bond, so
  where the train is far from the front the ring does not reach it either.
"""

from __future__ import annotations

import numpy as np

from .formats import FORMATS, RankSpec
from .formats.svd import solve_basis, svd_rank, thin_svd
from .graph import Layer

# a slow format's proxy whose squared error is within this factor of the best candidate
# with at most its parameters may still be beaten by the slow format: that one is fitted
SLOW_MARGIN = 2.0


def svd_estimates(layer: Layer, data, specs: list[RankSpec]) -> list[tuple[RankSpec, int, float]] | None:
    """(spec, parameters, squared relative error) of svd at each rank rule, from one SVD;
    exactly what Fitter.fit's svd factorisations would measure. None where it would not be
    exact: grouped convs, data without a Gram basis (errors then measured on samples)."""
    if layer.kind == "conv" and layer.groups > 1:
        return None
    if hasattr(data, "counts"):  # an embedding table's index counts
        return _table_estimates(layer, data, specs)
    if data is not None and data.basis is None:
        return None
    weight = layer.weight
    matrix = weight if layer.kind == "dense" else weight.reshape(weight.shape[0], -1)
    if data is not None:
        matrix = data.target
        u, s, vt = data.target_svd()
    else:
        u, s, vt = thin_svd(matrix)
    energy = s.astype(np.float64) ** 2
    total = float(energy.sum())
    if total <= 0:
        return None
    if data is not None and data.held_basis is not None:
        errors = _held_out_errors(data, u, s, vt)
    else:  # errors[r] = sum_{i>=r} s_i^2 / total
        errors = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]) / total
    n, m = matrix.shape
    out = []
    for spec in specs:
        r = svd_rank(s, n, m, spec)
        out.append((spec, r * (n + m), float(errors[r])))
    return out


def _table_estimates(layer: Layer, data, specs: list[RankSpec]) -> list[tuple[RankSpec, int, float]]:
    """svd_estimates of an embedding table fitted to its index counts (embedding.fit: the SVD
    of the table with each row scaled by scale_i, U divided back): its error weighs row i's
    residual by count_i, i.e. the scaled residual by a_i = count_i / scale_i^2, so that the
    error of rank r is sum_{j >= r} s_j^2 sum_i a_i u_ij^2 (V's rows orthonormal) over
    sum_i count_i |w_i|^2 (EmbeddingData.output_error)."""
    weight, scale = layer.weight, data.row_weights
    u, s, _ = thin_svd(weight * scale[:, None])
    counts = data.counts.astype(np.float64)
    per = s.astype(np.float64) ** 2 * ((counts / scale**2) @ u**2)
    total = float(np.sum(counts[:, None] * weight**2))
    if total <= 0:
        return None
    errors = np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]]) / total
    n, m = weight.shape
    return [(spec, svd_rank(s, n, m, spec) * (n + m), float(errors[svd_rank(s, n, m, spec)])) for spec in specs]


def _held_out_errors(data, u, s, vt) -> np.ndarray:
    """errors[r]: the squared relative held-out error of the whitened svd at rank r. Its
    factors map a held-out row set A_h to A_h A^-1 u_i s_i vt_i summed over i < r =: M_r Vt_r,
    and with Vt's rows orthonormal ||M_r Vt_r - B_h||^2 = ||B_h||^2 - 2 sum_i m_i.(B_h vt_i)
    + sum_i ||m_i||^2: cumulative sums over i, all ranks from one pass."""
    m = data.held_basis @ solve_basis(data.basis, u * s)
    cross = np.einsum("ni,ni->i", m, data.held_target @ vt.T)
    total = float(np.sum(data.held_target**2))
    if total <= 0:
        return np.zeros(len(s) + 1)
    steps = np.concatenate([[0.0], np.cumsum(np.sum(m**2, axis=0) - 2 * cross)])
    return np.maximum(total + steps, 0.0) / total


def slow(fmt: str) -> str | None:
    """The proxy format of a format slow to fit, or None for a fast one."""
    return getattr(FORMATS[fmt], "PROXY", None) if getattr(FORMATS[fmt], "SLOW_FIT", False) else None


def may_win(params: int, error: float, others) -> bool:
    """Whether a candidate of `params` and squared `error` is within SLOW_MARGIN of the best
    of `others` ((params, error) pairs) that use at most as many parameters."""
    best = min((e for p, e in others if p <= params), default=None)
    return best is None or error <= SLOW_MARGIN * best
