"""Tensor-ring numerics for the `tr` format (tr.py): fitting a ring to a d-way tensor.

A ring of 3-way cores G_k (r_k, n_k, r_{k+1}), r_d = r_0, over the modes of the tensorized
weight; W = trace(G_1[i_1] ... G_d[i_d]). Ranks are reported as (r_0, ..., r_{d-1}), bond k
joining core k-1 to core k (bond 0 closes the ring). Two fits, the better one is kept:

A. TR-SVD (Zhao et al. 2016) started at mode s: the truncated SVD of the mode-s unfolding
   gives p = r_s r_{s+1} columns, split as evenly as possible (ring_split), then a TT-SVD
   sweep round the ring with r_s riding along. Its d-1 truncations each discard at most
   delta^2, delta = eps ||W|| / sqrt(d-1), so ||W - W_tr|| <= eps ||W|| (the TT-SVD bound:
   every step is an orthogonal projection). Exact when nothing is truncated ("full rank";
   a ring bond of 1 makes it a TT). TR-SVD cannot give every bond the cap (r_s r_{s+1} is
   at most n_s, and the other bonds inherit that), hence B.
B. TR-ALS: the TR-SVD cores at cap u, zero-padded to ranks ~u (1e-3 noise in the padding,
   which touches the tensor only at second order), then ALS sweeps (exact least squares per
   core via the normal equations, the Gram from 2-core transfer matrices). The true error
   of every iterate is measured and the best kept, so B never loses to its start. Only for
   u <= ALS_MAX_RANK (Gram u^2 x u^2, cost ~u^6 per core update) and for rings no larger
   than the dense tensor or the exact TR-SVD ring.

--rank r: A at cap r, started at the largest mode (where r_s r_{s+1} <= n_s binds least);
          unless exact, also B at uniform u = min(r, limit). All ranks <= r.
--ratio:  A at the largest cap whose (predicted) parameters fit dense/ratio, and B at the
          largest uniform u that fits, some bonds raised to u+1 while it still fits.
--tol:    A from every start, the smallest ring kept (guaranteed), then ALS at its own
          ranks (error only decreases) when the Gram is small enough; p is not rounded up
          to make the ring bond >= 2 (fewest parameters first).
Last, the cores are re-gauged (QR round the ring, equal norms): same tensor, no huge or
tiny cores for float32.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from threadpoolctl import threadpool_limits

from .base import RankSpec, merge_train, truncation_rank
from .tt import leading_subspace

ALS_MAX_RANK = 32  # uniform ALS ranks: Gram u^2 x u^2 and transfer products u^6 per step
ALS_SWEEPS = 10
EXACT = 1e-12  # relative error below which a fit counts as exact (no ALS)


# ------------------------------------------------------------------ numerics on a d-way tensor


def ring_split(p_need: int, p_max: int, cap: int | None, round_up: bool = True) -> tuple[int, int]:
    """(r0, r1), r0 <= r1 <= cap, r0 r1 = p: the smallest p in [p_need, p_max] (only p_need
    itself when not round_up) with a ring bond r0 >= 2, else p_need as (1, p_need), else (cap
    too small for that) the largest p < p_need."""
    def splits(p):
        return [(a, p // a) for a in range(math.isqrt(p), 0, -1) if p % a == 0 and (cap is None or p // a <= cap)]
    if p_need > 1:
        for p in range(p_need, (p_max if round_up else p_need) + 1):
            if splits(p) and splits(p)[0][0] >= 2:
                return splits(p)[0]
    for p in range(min(p_need, p_max), 0, -1):
        if splits(p):
            return splits(p)[0]
    return 1, 1


def _rotation(d: int, start: int) -> list[int]:
    return list(range(start, d)) + list(range(start))


def tr_svd(tensor: np.ndarray, *, cap: int | None = None, tol: float | None = None,
           start: int | None = None) -> list[np.ndarray]:
    """TR-SVD cores (r_k, n_k, r_{k+1}) in ring order, started at mode `start` (default:
    the largest, where r_s r_{s+1} <= n_s binds least)."""
    return _tr_svd(tensor, cap=cap, tol=tol, start=start)[0]


def tr_svd_measured(tensor: np.ndarray, *, cap: int | None = None) -> tuple[list[np.ndarray], float]:
    """tr_svd's cores and their relative error. Every step is an orthogonal projection and
    every core but the last an isometry, so ||W - W_tr||^2 = ||W||^2 - ||last core||^2: no
    pass over the dense ring, unless the difference is too small to trust."""
    cores, last = _tr_svd(tensor, cap=cap)
    norm2 = float(np.sum(tensor**2))
    err2 = norm2 - float(np.sum(last**2))
    return cores, math.sqrt(err2 / norm2) if err2 > 1e-8 * norm2 else ring_error(tensor, cores)


def _tr_svd(tensor: np.ndarray, *, cap: int | None = None, tol: float | None = None,
            start: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(tr_svd's cores, the last core: the only one that is not an isometry)."""
    dims, d = tensor.shape, tensor.ndim
    if d == 1:
        return [tensor.reshape(1, -1, 1)], tensor
    start = int(np.argmax(dims)) if start is None else start
    order = _rotation(d, start)
    n = [dims[i] for i in order]
    delta = tol * np.linalg.norm(tensor) / math.sqrt(d - 1) if tol else 0.0
    # tt.leading_subspace: wide unfoldings through their rows' Gram matrix, U^T A carried on
    u, s, proj = leading_subspace(np.transpose(tensor, order).reshape(n[0], -1), cap=None, delta=0.0)
    p_need = truncation_rank(s, cap=None if cap is None else cap * cap, delta=delta)
    r0, r = ring_split(p_need, u.shape[1], cap, round_up=not tol)  # --tol: fewest parameters
    cores = [u[:, :r0 * r].reshape(n[0], r0, r).transpose(1, 0, 2)]
    rest = proj[:r0 * r].reshape(r0, r, -1).transpose(1, 2, 0)  # (r1, rest, r0)
    for k in range(1, d - 1):
        u, _, rest = leading_subspace(rest.reshape(r * n[k], -1), cap=cap, delta=delta)
        rk = u.shape[1]
        cores.append(u.reshape(r, n[k], rk))
        r = rk
    cores.append(rest.reshape(r, n[-1], r0))
    return [cores[order.index(i)] for i in range(d)], rest


def svd_params(dims: list[int], cap: int) -> int:
    """Parameters tr_svd reaches with a cap on a tensor of full numerical ranks."""
    d = len(dims)
    if d == 1:
        return dims[0]
    n = [dims[i] for i in _rotation(d, int(np.argmax(dims)))]
    p_max = min(n[0], math.prod(n[1:]))
    r0, r = ring_split(min(cap * cap, p_max), p_max, cap)
    total = r0 * n[0] * r
    for k in range(1, d - 1):
        rk = min(cap, r * n[k], math.prod(n[k + 1:]) * r0)
        total, r = total + r * n[k] * rk, rk
    return total + r * n[-1] * r0


def ring_dense(cores: list[np.ndarray]) -> np.ndarray:
    """The full tensor, one ring index at a time (memory ~ size x r, not size x r^2)."""
    if len(cores) == 1:
        return np.trace(cores[0], axis1=0, axis2=2)
    out = 0
    for a in range(cores[0].shape[0]):
        out = out + merge_train([cores[0][a:a + 1]] + cores[1:-1] + [cores[-1][:, :, a:a + 1]])
    return np.reshape(out, [c.shape[1] for c in cores])


def ring_error(tensor: np.ndarray, cores: list[np.ndarray]) -> float:
    return float(np.linalg.norm(tensor - ring_dense(cores)) / max(np.linalg.norm(tensor), 1e-300))


def _transfer(c: np.ndarray) -> np.ndarray:
    """E[(a a'), (b b')] = sum_i c[a, i, b] c[a', i, b']: one factor of a ring's Gram."""
    a, n, b = c.shape
    x = np.transpose(c, (0, 2, 1)).reshape(a * b, n)
    return (x @ x.T).reshape(a, b, a, b).transpose(0, 2, 1, 3).reshape(a * a, b * b)


def tr_als(tensor: np.ndarray, cores: list[np.ndarray], sweeps: int = ALS_SWEEPS) -> tuple[list[np.ndarray], float]:
    """ALS sweeps from `cores`; returns the best iterate (the start included) and its error."""
    d = tensor.ndim
    cores = [np.array(c, dtype=np.float64) for c in cores]
    best, best_err = list(cores), ring_error(tensor, cores)
    if d < 2:
        return best, best_err
    norm2 = float(np.sum(tensor**2))
    unfold = [np.transpose(tensor, _rotation(d, k)) for k in range(d)]
    transfers = [_transfer(c) for c in cores]
    for _ in range(sweeps):
        for k in range(d):
            others = _rotation(d, k)[1:]
            a, n, b = cores[k].shape
            env = transfers[others[0]]
            for j in others[1:]:
                env = env @ transfers[j]
            gram = env.reshape(b, b, a, a).transpose(2, 0, 3, 1).reshape(a * b, a * b)
            if d == 2:  # rhs[i, a, b] = sum_J T[i, J] G[b, J, a]
                rhs = np.einsum("iJ,bJa->iab", unfold[k], cores[others[0]])
            else:  # through the merged middle cores, the last one contracted apart
                pre, last = merge_train([cores[j] for j in others[:-1]]), cores[others[-1]]
                t = unfold[k].reshape(n, -1, last.shape[1])
                z = np.einsum("iJl,bJc->ilbc", t, pre, optimize=True)
                rhs = np.einsum("ilbc,cla->iab", z, last)
            ridge = 1e-13 * max(np.trace(gram), 1e-300) / (a * b)
            rhs = rhs.reshape(n, a * b).T
            sol = np.linalg.solve(gram + ridge * np.eye(a * b), rhs)
            cores[k] = sol.T.reshape(n, a, b).transpose(1, 0, 2)
            transfers[k] = _transfer(cores[k])
        # ||T - R||^2 = ||T||^2 - 2 <T, R> + ||R||^2 from the last core's system, which the
        # other cores have not changed since: no pass over the dense tensor, unless the
        # difference is too small to trust
        err2 = norm2 - 2 * float(np.sum(sol * rhs)) + float(np.sum(sol * (gram @ sol)))
        err = math.sqrt(max(err2, 0.0) / max(norm2, 1e-300)) if err2 > 1e-8 * norm2 else ring_error(tensor, cores)
        if err >= best_err * (1 - 1e-4):
            if err < best_err:
                best, best_err = list(cores), err
            break
        best, best_err = list(cores), err
    return best, best_err


def balance(cores: list[np.ndarray]) -> list[np.ndarray]:
    """The same ring, every core but the last left-orthonormal (QR round the ring), then
    all at the same Frobenius norm: float32 friendlier than raw ALS cores."""
    cores = list(cores)
    for k in range(len(cores) - 1):
        a, n, b = cores[k].shape
        q, r = np.linalg.qr(cores[k].reshape(a * n, b))
        cores[k] = q.reshape(a, n, q.shape[1])
        cores[k + 1] = np.tensordot(r, cores[k + 1], axes=1)
    norms = [float(np.linalg.norm(c)) for c in cores]
    if min(norms) == 0:
        return cores
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [c * (mean / n) for c, n in zip(cores, norms)]


def pad_ring(cores: list[np.ndarray], ranks: list[int], seed: int = 0) -> list[np.ndarray]:
    """Zero-pad bond k to ranks[k] (same tensor), with small noise in the padding so that
    ALS can use it (the noise enters the tensor only at second order)."""
    rng, d = np.random.default_rng(seed), len(cores)
    out = []
    for k, c in enumerate(cores):
        a, n, b = c.shape
        scale = 1e-3 * np.linalg.norm(c) / math.sqrt(c.size)
        z = scale * rng.standard_normal((max(a, ranks[k]), n, max(b, ranks[(k + 1) % d])))
        z[:a, :, :b] = c
        out.append(z)
    return out


def ring_params(dims: list[int], ranks: list[int]) -> int:
    d = len(dims)
    return sum(ranks[k] * dims[k] * ranks[(k + 1) % d] for k in range(d))


def fill_ranks(dims: list[int], rank: int, budget: float, limit: int) -> list[int]:
    """Uniform `rank`, then bonds raised to rank + 1 (cheapest first) while the ring fits."""
    ranks = [rank] * len(dims)
    while rank < limit:
        trials = [ranks[:k] + [rank + 1] + ranks[k + 1:] for k in range(len(dims)) if ranks[k] == rank]
        best = min(trials, key=lambda r: ring_params(dims, r), default=None)
        if best is None or ring_params(dims, best) > budget:
            break
        ranks = best
    return ranks


_MEMO: dict = {}


def ring_als(tensor: np.ndarray, ranks: list[int], sweeps: int = ALS_SWEEPS) -> tuple[list[np.ndarray], float]:
    """B: TR-SVD at cap min(ranks), padded to `ranks`, then ALS; memoised by content (the
    budget allocator asks for every cap, and every cap above ALS_MAX_RANK lands here alike)."""
    key = (hashlib.sha1(np.ascontiguousarray(tensor).tobytes()).hexdigest(), tensor.shape, tuple(ranks), sweeps)
    if key not in _MEMO:
        start, err = tr_svd_measured(tensor, cap=min(ranks))
        _MEMO[key] = (start, err) if err <= EXACT else tr_als(tensor, pad_ring(start, ranks), sweeps)
        while len(_MEMO) > 64:
            _MEMO.pop(next(iter(_MEMO)))
    return _MEMO[key]


def fit_ring(tensor: np.ndarray, spec: RankSpec, sweeps: int = ALS_SWEEPS) -> list[np.ndarray]:
    """Ring cores for `tensor` under the rank rule (see the module docstring)."""
    with threadpool_limits(1, user_api="blas"):  # small SVDs and solves: far faster on one thread
        return balance(_fit_ring(tensor, spec, sweeps))


def _fit_ring(tensor: np.ndarray, spec: RankSpec, sweeps: int) -> list[np.ndarray]:
    tensor = np.asarray(tensor, dtype=np.float64)
    dims = list(tensor.shape)
    if spec.tol is not None:  # every start meets the tolerance: take the smallest ring
        cores = min((tr_svd(tensor, tol=spec.tol, start=k) for k in range(len(dims))),
                    key=lambda cs: sum(c.size for c in cs))
        if max(c.shape[0] * c.shape[2] for c in cores) <= ALS_MAX_RANK ** 2 and ring_error(tensor, cores) > EXACT:
            cores = tr_als(tensor, cores, sweeps)[0]
        return cores
    # a uniform ring larger than the dense tensor (or the exact TR-SVD ring) is never worth fitting
    worth = min(tensor.size, svd_params(dims, tensor.size))
    uni_max = min(ALS_MAX_RANK, max(1, math.isqrt(worth // sum(dims))))
    if spec.ratio is not None:
        budget = tensor.size / spec.ratio
        cap = 1
        while cap <= math.isqrt(tensor.size) and svd_params(dims, cap + 1) <= budget:
            cap += 1
        uni = min(uni_max, math.isqrt(int(budget // sum(dims))))
        ranks = fill_ranks(dims, uni, budget, uni_max)
    else:
        cap = spec.rank
        uni = min(cap, uni_max)
        ranks = [uni] * len(dims)
    cores, err = tr_svd_measured(tensor, cap=cap)
    if err <= EXACT or uni < 1 or len(dims) < 2:
        return cores
    als_cores, als_err = ring_als(tensor, ranks, sweeps)
    return cores if err <= als_err else als_cores
