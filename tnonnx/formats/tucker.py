"""Tucker: a core tensor with one orthonormal factor matrix per mode.

Dense: Tucker of the tensorized matrix (modes n_1..n_d, m_1..m_d), a Chain: factors
(n_k, p_k), the core (p..., q...), factors (m_k, q_k). Conv: Tucker-2 (Kim et al. 2016),
factors on the two channel modes only: 1x1 Conv S -> R_in, the k-sized Conv R_in -> R_out
with the original stride/pads/dilations, 1x1 Conv R_out -> T with the bias.
See ALGORITHMS.md section 5.

Fitting: truncated HOSVD, refined by HOOI (Tucker.hooi); the better of the
two is kept. A mode kept at full size needs no factor (an orthogonal square factor can be
absorbed in the core), so it is not stored and, at full rank, the layer is its own core.
- `--rank R` caps every mode rank. Caps are walked up a ladder (1, 2, 3, 4, 6, 8, 12, ...,
  shared with cp): the fit at cap R also tries HOOI from the fit at the rung below with its
  factors extended (nested subspaces, so never worse), and keeps the best, so the error
  never grows along the ladder nor from any cap to the rungs below it (rungs are cached).
- `--tol eps`: truncated HOSVD guarantees ||W - W_hosvd||^2 <= the energy of the singular
  directions dropped in all D modes. The ranks are the fewest parameters whose dropped
  energy is at most eps^2 ||W||^2 (never more than the textbook per-mode rule delta =
  eps ||W|| / sqrt(D)); HOOI is kept only when it is better, so the error is <= eps ||W||.
- `--ratio`: the dropped energy is a loose proxy when several modes are cut, so two
  candidates within the parameter budget are compared by their actual HOSVD error: the
  largest uniform cap that fits grown one mode step at a time (most energy per parameter),
  and the ranks of least dropped energy.
  Both searches over rank tuples are exhaustive when there are at most 2^21 tuples (always
  for Tucker-2 and order-2 dense layers up to ~2048 x 2048), greedy otherwise.
- `--rank vbmf` (RankSpec(rank="vbmf")): EVBMF on each mode unfolding (Kim et al.).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np
from tensorly.tenalg import multi_mode_dot

from ..emit import Chain, Core, best_order
from ..errors import NotApplicable
from ..tensorize import choose_modes
from .base import (ChainFactorization, ConvFactorization, ConvStage, RankSpec, gram_left_singular, left_singular,
                   mode_project, pointwise, truncation_rank)
from .cp import ladder

NAME = "tucker"
SUPPORTS_VBMF = True
DEFAULT_ORDER = 2  # (n1, n2, m1, m2): the core of 3-4 small mode pairs costs more than it gives
HOOI_ITERS = 25
HOOI_TOL = 1e-7  # stop when the relative error moves less than this in a sweep
_CACHE: OrderedDict = OrderedDict()  # (tensor digest, shape, modes, cap) -> (factors, squared error)
# (tensor digest, shape, mode) -> (u, s) of the mode unfolding: the planner fits one weight at
# every rung of the ladder, and each fit starts from the same unfoldings' SVDs
_MODE_SVDS: OrderedDict = OrderedDict()
_MODE_SVDS_KEPT = 16


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


class Tucker:
    """Tucker fits of one tensor over a subset of its modes (all: Tucker; [0, 1]: Tucker-2)."""

    def __init__(self, tensor: np.ndarray, modes: list[int]):
        self.tensor = np.asarray(tensor, dtype=np.float64)
        self.digest = hashlib.blake2b(np.ascontiguousarray(self.tensor).tobytes(), digest_size=16).hexdigest()
        self.modes = modes
        self.dims = [self.tensor.shape[k] for k in modes]
        self.rest = self.tensor.size // math.prod(self.dims)  # core axes never factored (conv kernel)
        self.svds = [self._mode_svd(k) for k in modes]
        self.numerical = [truncation_rank(s) for _, s in self.svds]
        self.norm2 = float(np.sum(self.tensor**2))

    def _mode_svd(self, mode: int) -> tuple[np.ndarray, np.ndarray]:
        key = (self.digest, self.tensor.shape, mode)
        if key not in _MODE_SVDS:
            _MODE_SVDS[key] = left_singular(unfold(self.tensor, mode))
            while len(_MODE_SVDS) > _MODE_SVDS_KEPT:
                _MODE_SVDS.popitem(last=False)
        _MODE_SVDS.move_to_end(key)
        return _MODE_SVDS[key]

    def params(self, ranks) -> int:
        """Core plus the factors of the modes kept below full size (full ones need none)."""
        return self.rest * math.prod(ranks) + sum(d * r for d, r in zip(self.dims, ranks) if r < d)

    def discarded(self, ranks) -> float:
        """The truncated-HOSVD error bound: the energy of the dropped singular directions."""
        return sum(float(np.sum(s[r:] ** 2)) for (_, s), r in zip(self.svds, ranks))

    def ranks_for(self, spec: RankSpec) -> list[int]:
        """Per-mode ranks (in the order of self.modes) under a tol, ratio or vbmf rule."""
        if spec.rank == "vbmf":
            from .vbmf import vbmf_rank_from_singular_values

            return [min(vbmf_rank_from_singular_values(s, d, self.tensor.size // d), n)
                    for (_, s), d, n in zip(self.svds, self.dims, self.numerical)]
        if spec.tol is not None:
            allowed = spec.tol**2 * self.norm2
            delta = spec.tol * math.sqrt(self.norm2 / len(self.modes))
            uniform = [truncation_rank(s, delta=delta) for _, s in self.svds]  # the textbook rule
            return min(uniform, self.search(allowed=allowed) or uniform, key=self.params)
        budget = self.tensor.size / spec.ratio
        candidates = [r for r in (self.grow(budget), self.search(budget=budget)) if r and self.params(r) <= budget]
        if not candidates:
            raise NotApplicable(f"tucker: ratio {spec.ratio:g}x out of reach (rank 1 everywhere keeps "
                                f"{self.params([1] * len(self.modes))} of {self.tensor.size} parameters)")
        return min(candidates, key=lambda r: self.error2(self.hosvd(r)))  # the bound alone misleads

    def grow(self, budget: float) -> list[int]:
        """The largest uniform cap within `budget`, then single-mode steps (most singular
        energy per added parameter first) while they fit."""
        ranks = [1] * len(self.modes)
        for cap in range(2, max(self.numerical) + 1):
            if self.params([min(cap, n) for n in self.numerical]) > budget:
                break
            ranks = [min(cap, n) for n in self.numerical]
        while True:
            steps = [(s[r] ** 2 / max(self.params(t) - self.params(ranks), 1), i, t)
                     for i, (r, (_, s)) in enumerate(zip(ranks, self.svds))
                     if r < self.numerical[i] and self.params(t := ranks[:i] + [r + 1] + ranks[i + 1:]) <= budget]
            if not steps:
                return ranks
            ranks = max(steps)[2]

    def hosvd(self, ranks) -> dict:
        return {k: u[:, :r] for k, (u, _), r, d in zip(self.modes, self.svds, ranks, self.dims) if r < d}

    def search(self, *, budget: float | None = None, allowed: float | None = None) -> list[int] | None:
        """With `budget`: the ranks of least discarded energy within `budget` parameters; with
        `allowed`: the fewest parameters discarding at most `allowed`. Exhaustive over all
        rank tuples when there are at most 2^21 of them; beyond, greedy for `allowed` and
        None for `budget`."""
        if math.prod(self.numerical) <= 2**21:
            grids = np.meshgrid(*[np.arange(1, n + 1) for n in self.numerical], indexing="ij", sparse=True)
            params = self.rest * math.prod(grids) + sum(np.where(g < d, d * g, 0) for g, d in zip(grids, self.dims))
            tails = [np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]]) for _, s in self.svds]
            energy = sum(tail[g] for g, tail in zip(grids, tails))
            ok = params <= budget if budget is not None else energy <= allowed
            if not ok.any():
                return None
            score = np.where(ok, energy if budget is not None else params, np.inf)
            return [int(i) + 1 for i in np.unravel_index(np.argmin(score), score.shape)]
        if budget is not None:
            return None  # grow() covers large grids
        ranks = list(self.numerical)
        while True:  # greedy: drop the direction saving most parameters per unit of energy
            steps = [((self.params(ranks) - self.params(t)) / max(s[r - 1] ** 2, 1e-300), i, t)
                     for i, (r, (_, s)) in enumerate(zip(ranks, self.svds))
                     if r > 1 and self.discarded(t := ranks[:i] + [r - 1] + ranks[i + 1:]) <= allowed]
            if not steps:
                return ranks
            ranks = max(steps)[2]

    def fit(self, ranks: list[int], warm: dict | None = None) -> tuple[dict, float]:
        """({mode: factor} for the modes kept below full size, squared error): the best of
        truncated HOSVD, `warm` factors extended to `ranks`, and HOOI from the better of them."""
        dims = self.tensor.shape
        modes = [k for k, r in zip(self.modes, ranks) if r < dims[k]]
        rank_of = dict(zip(self.modes, ranks))
        hosvd = self.hosvd(ranks)
        fits = [(hosvd, self.error2(hosvd))]
        if not modes:
            return fits[0]
        if warm is not None:
            start = self.extend(warm, rank_of)
            fits.append((start, self.error2(start)))
        hooi = self.hooi(min(fits, key=lambda fe: fe[1])[0])  # from the better start
        fits.append((hooi, self.error2(hooi)))
        return min(fits, key=lambda fe: fe[1])

    def hooi(self, factors: dict) -> dict:
        """HOOI (De Lathauwer et al. 2000) from `factors`: each factor in turn becomes the
        leading eigenvectors of the Gram matrix of the tensor's unfolding projected on the
        other factors (the left singular vectors of that unfolding, without its SVD), until
        the relative error moves by less than HOOI_TOL in a sweep (tensorly's partial_tucker
        rule) or HOOI_ITERS sweeps. The modes are updated in two halves: the tensor projected
        on one half's factors serves every mode of the other half, which halves the passes
        over the whole tensor."""
        factors, previous = dict(factors), None
        keys = sorted(factors)
        halves = [keys[:(len(keys) + 1) // 2], keys[(len(keys) + 1) // 2:]]
        for _ in range(HOOI_ITERS if factors else 0):
            for half, other in (halves, halves[::-1]):
                shared = mode_project(self.tensor, {j: factors[j] for j in other})
                for k in half:
                    y = unfold(mode_project(shared, {j: factors[j] for j in half if j != k}), k)  # small now
                    u, s = gram_left_singular(y)
                    r = factors[k].shape[1]
                    factors[k] = u[:, :r]
            kept = float(np.sum(s[:r] ** 2))  # ||core||^2 after the last update
            error = math.sqrt(abs(self.norm2 - kept) / max(self.norm2, 1e-300))
            if previous is not None and abs(previous - error) < HOOI_TOL:
                break
            previous = error
        return factors

    def extend(self, warm: dict, rank_of: dict) -> dict:
        """Each warm factor completed by the leading directions of the unfolding outside it:
        the left singular vectors of P A (P the projector off the warm factor), found as the
        eigenvectors of P (A A^T) P, with A A^T = U S^2 U^T from the mode's SVD (n_k x n_k,
        instead of an SVD of the whole residual unfolding)."""
        out = {}
        for k, (u, s) in zip(self.modes, self.svds):
            r = rank_of[k]
            if r >= self.tensor.shape[k]:
                continue
            base = warm.get(k, np.zeros((self.tensor.shape[k], 0)))[:, :r]
            if base.shape[1] < r:
                off = np.eye(base.shape[0]) - base @ base.T
                gram = off @ ((u * s**2) @ u.T) @ off
                rest = off @ np.linalg.eigh((gram + gram.T) / 2)[1][:, ::-1][:, : r - base.shape[1]]
                base = np.linalg.qr(np.hstack([base, rest]))[0]
            out[k] = base
        return out

    def core(self, factors: dict) -> np.ndarray:
        return mode_project(self.tensor, factors)

    def error2(self, factors: dict) -> float:
        """||T - T~||^2 = ||T||^2 - ||core||^2 (orthonormal factors), exactly when small."""
        c = self.core(factors)
        err2 = self.norm2 - float(np.sum(c**2))
        if err2 < 1e-8 * self.norm2:
            keys = sorted(factors)
            approx = multi_mode_dot(c, [factors[k] for k in keys], modes=keys) if keys else c
            err2 = float(np.sum((self.tensor - approx) ** 2))
        return max(err2, 0.0)

    def decompose(self, spec: RankSpec) -> tuple[dict, np.ndarray]:
        """(factors, core) under `spec`."""
        if spec.tol is None and spec.ratio is None and spec.rank != "vbmf":
            best, top = None, max(self.numerical)
            for cap in ladder(top if spec.rank is None else min(int(spec.rank), top)):
                key = (self.digest, self.tensor.shape, tuple(self.modes), cap)
                if key not in _CACHE:  # a rung depends only on the tensor and the rungs below it
                    _CACHE[key] = self.fit([min(cap, n) for n in self.numerical], None if best is None else best[0])
                    while len(_CACHE) > 256:
                        _CACHE.popitem(last=False)
                _CACHE.move_to_end(key)
                best = _CACHE[key]
        else:
            best = self.fit(self.ranks_for(spec))
        return best[0], self.core(best[0])


# ------------------------------------------------------------------ dense


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, **_) -> ChainFactorization:
    n, m = weight.shape
    ins, outs = modes if modes else choose_modes(n, m, order or DEFAULT_ORDER)
    ins = tuple(v for v in ins if v > 1) or (1,)  # a size-1 mode carries nothing
    outs = tuple(v for v in outs if v > 1) or (1,)
    dims = ins + outs
    tucker = Tucker(np.asarray(weight, dtype=np.float64).reshape(dims), list(range(len(dims))))
    factors, core = tucker.decompose(spec)
    d = len(ins)
    names = [f"n{k}" for k in range(d)] + [f"m{k}" for k in range(len(outs))]
    bonds = [f"p{k}" for k in range(d)] + [f"q{k}" for k in range(len(outs))]
    sizes = dict(zip(names, dims))
    arrays, cores, core_labels = {"C": core}, [], []
    for k, (name, bond) in enumerate(zip(names, bonds)):
        if k in factors:
            key = f"U{k}" if k < d else f"V{k - d}"
            sizes[bond] = factors[k].shape[1]
            arrays[key] = factors[k]
            cores.append(Core(key, (name, bond)))
            core_labels.append(bond)
        else:
            core_labels.append(name)
    cores.append(Core("C", tuple(core_labels)))
    in_labels, out_labels = tuple(names[:d]), tuple(names[d:])
    chain = Chain(in_labels, out_labels, sizes, best_order(cores, in_labels, out_labels, sizes))
    return ChainFactorization(NAME, chain, arrays, tuple(core.shape), modes=(ins, outs))


# ------------------------------------------------------------------ conv


def fit_conv(kernel: np.ndarray, spec: RankSpec, **_) -> ConvFactorization:
    t, s = kernel.shape[:2]
    ks = tuple(kernel.shape[2:])
    factors, core = Tucker(np.asarray(kernel, dtype=np.float64), [0, 1]).decompose(spec)
    nsp = len(ks)
    cores, stages = {"C": core}, []
    if 1 in factors:
        cores["U_in"] = factors[1]
        stages.append(ConvStage(lambda c: pointwise(c["U_in"].T, nsp), spatial=False))
    stages.append(ConvStage(lambda c: c["C"], spatial=True))
    if 0 in factors:
        cores["U_out"] = factors[0]
        stages.append(ConvStage(lambda c: pointwise(c["U_out"], nsp), spatial=False))
    return ConvFactorization(NAME, stages, cores, tuple(core.shape[:2]), kernel=ks, channels=(t, s))
