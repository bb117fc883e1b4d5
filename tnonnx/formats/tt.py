"""Tensor train: TT-matrix for dense layers, TT over channel modes for convolutions.

TT-SVD (Oseledets 2011) with a rank cap and/or a relative tolerance eps: each of the d-1
unfoldings is truncated at delta = eps ||W|| / sqrt(d-1), which guarantees
||W - W_tt|| <= eps ||W||. See ALGORITHMS.md section 2.
"""

from __future__ import annotations

import math

import numpy as np

from ..emit import Chain, Core, best_order
from ..tensorize import choose_modes, factor_dims
from .base import (ChainFactorization, ConvFactorization, ConvStage, RankSpec, gram_left_singular, merge_train,
                   permute, pointwise, svd, truncation_rank)

NAME = "tt"
GRAM_ROWS = 512  # unfoldings with at least this many rows (and as many columns) go through their Gram matrix


def tt_svd(tensor: np.ndarray, *, cap: int | None = None, tol: float | None = None) -> list[np.ndarray]:
    """Cores (r_{k-1}, n_k, r_k) of a d-way tensor, r_0 = r_d = 1."""
    dims = tensor.shape
    d = len(dims)
    delta = tol * np.linalg.norm(tensor) / math.sqrt(d - 1) if tol and d > 1 else 0.0
    cores, r, rest = [], 1, np.asarray(tensor, dtype=np.float64)
    for k in range(d - 1):
        u, s, rest = leading_subspace(rest.reshape(r * dims[k], -1), cap=cap, delta=delta)
        rk = u.shape[1]
        cores.append(u.reshape(r, dims[k], rk))
        r = rk
    cores.append(rest.reshape(r, dims[-1], 1))
    return cores


def leading_subspace(mat: np.ndarray, *, cap: int | None, delta: float):
    """(U_r, singular values, U_r^T mat) for the truncation rank of `mat`.

    A wide unfolding (e.g. 64 x 262144 for a 4096 x 4096 weight), or a large one with at
    least as many columns as rows (2704 x 4368 inside a 30522 x 384 embedding table), takes
    its left vectors from the eigenvectors of the Gram matrix of its rows: some 50x faster
    than a full SVD at the first shape, 10x at the second; carrying U_r^T mat (not S V^T)
    keeps it an orthogonal projection, so the result stays exact at full rank and the
    tolerance bound holds. Small unfoldings keep the SVD (cheap there), and with it the
    signs of their vectors, which the nonlinear chains started from a TT depend on."""
    rows, cols = mat.shape
    if cols > 4 * rows or (cols >= rows and rows >= GRAM_ROWS):
        u, s = gram_left_singular(mat)
        rk = truncation_rank(s, cap=cap, delta=delta)
        return u[:, :rk], s, u[:, :rk].T @ mat
    u, s, vt = svd(mat)
    rk = truncation_rank(s, cap=cap, delta=delta)
    return u[:, :rk], s, s[:rk, None] * vt[:rk]


def capped_ranks(dims: list[int], cap: int) -> list[int]:
    """Bond ranks r_1..r_{d-1} TT-SVD reaches with a cap (the unfolding sizes bound them)."""
    d = len(dims)
    return [min(cap, math.prod(dims[: k + 1]), math.prod(dims[k + 1:])) for k in range(d - 1)]


def train_params(dims: list[int], ranks: list[int]) -> int:
    full = [1] + list(ranks) + [1]
    return sum(full[k] * dims[k] * full[k + 1] for k in range(len(dims)))


def cap_for_ratio(dims: list[int], ratio: float) -> int:
    """The largest uniform cap whose train has at most prod(dims)/ratio parameters (>= 1)."""
    budget = math.prod(dims) / ratio
    best = 1
    for cap in range(1, max(dims) ** 2 + 1):
        ranks = capped_ranks(dims, cap)
        if train_params(dims, ranks) > budget:
            break
        best = cap
        if not ranks or max(ranks) < cap:  # ranks saturated (or one core): a larger cap changes nothing
            break
    return best


def decompose(tensor: np.ndarray, spec: RankSpec) -> list[np.ndarray]:
    if spec.tol is not None:
        return tt_svd(tensor, tol=spec.tol)
    cap = cap_for_ratio(list(tensor.shape), spec.ratio) if spec.ratio is not None else spec.rank
    return tt_svd(tensor, cap=cap)


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, **_) -> ChainFactorization:
    n, m = weight.shape
    ins, outs = modes if modes else choose_modes(n, m, order)
    d = len(ins)
    # (n_1..n_d, m_1..m_d) -> (n_1 m_1, ..., n_d m_d)
    t = weight.reshape(ins + outs).transpose([i for k in range(d) for i in (k, d + k)])
    cores3 = decompose(t.reshape([ins[k] * outs[k] for k in range(d)]), spec)
    ranks = [c.shape[2] for c in cores3[:-1]]
    sizes = {f"n{k}": ins[k] for k in range(d)} | {f"m{k}": outs[k] for k in range(d)}
    sizes |= {f"r{k + 1}": ranks[k] for k in range(d - 1)}
    cores, chain_cores = {}, []
    for k, c in enumerate(cores3):  # drop the size-1 outer bonds
        shape, labels = [ins[k], outs[k]], [f"n{k}", f"m{k}"]
        if k > 0:
            shape, labels = [c.shape[0]] + shape, [f"r{k}"] + labels
        if k < d - 1:
            shape, labels = shape + [c.shape[2]], labels + [f"r{k + 1}"]
        cores[f"G{k}"] = c.reshape(shape)
        chain_cores.append(Core(f"G{k}", tuple(labels)))
    in_labels, out_labels = tuple(f"n{k}" for k in range(d)), tuple(f"m{k}" for k in range(d))
    chain = Chain(in_labels, out_labels, sizes, best_order(chain_cores, in_labels, out_labels, sizes))
    return ChainFactorization(NAME, chain, cores, tuple(ranks), modes=(tuple(ins), tuple(outs)))


def channel_modes(c: int) -> tuple[int, ...]:
    """Channel counts of 16 and more are split in two modes, smaller ones stay whole."""
    return factor_dims(c, 2) if c >= 16 else (c,)


def fit_conv(kernel: np.ndarray, spec: RankSpec, **_) -> ConvFactorization:
    """TT over (t_1..t_a, kernel, s_1..s_b): the layout of the ADMM-TT code."""
    t, s = kernel.shape[:2]
    ks = kernel.shape[2:]
    k = math.prod(ks)
    tm, sm = channel_modes(t), channel_modes(s)
    a = len(tm)
    tensor = kernel.reshape(t, s, k).transpose(0, 2, 1).reshape(tm + (k,) + sm)
    cores3 = decompose(tensor, spec)
    cores = {f"G{i}": c for i, c in enumerate(cores3)}
    out_keys = [f"G{i}" for i in range(a)]
    mid_key = f"G{a}"
    in_keys = [f"G{i}" for i in range(a + 1, len(cores3))]
    nsp = len(ks)

    def input_stage(c):  # (r_b, s_1..s_b) -> 1x1 conv S -> r_b
        m = merge_train([c[key] for key in in_keys])
        return pointwise(m.reshape(m.shape[0], s), nsp)

    def spatial_stage(c):  # (r_a, k, r_b) -> conv r_b -> r_a with the original kernel
        g = c[mid_key]
        return permute(g, (0, 2, 1)).reshape((g.shape[0], g.shape[2]) + ks)

    def output_stage(c):  # (t_1..t_a, r_a) -> 1x1 conv r_a -> T
        m = merge_train([c[key] for key in out_keys])
        return pointwise(m.reshape(t, m.shape[2]), nsp)

    stages = [ConvStage(input_stage, False, tuple(in_keys)), ConvStage(spatial_stage, True),
              ConvStage(output_stage, False, tuple(out_keys))]
    ranks = tuple(c.shape[2] for c in cores3[:-1])
    return ConvFactorization(NAME, stages, cores, ranks, kernel=ks, channels=(t, s))
