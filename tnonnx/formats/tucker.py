"""Tucker: a core tensor with one orthonormal factor matrix per mode.

Dense: Tucker of the tensorized matrix (modes n_1..n_d, m_1..m_d), a Chain: factors
(n_k, p_k), the core (p..., q...), factors (m_k, q_k). Conv: Tucker-2 (Kim et al. 2016),
factors on the two channel modes only: 1x1 Conv S -> R_in, the k-sized Conv R_in -> R_out
with the original stride/pads/dilations, 1x1 Conv R_out -> T with the bias.
See ALGORITHMS.md section 5.

Fitting: truncated HOSVD, refined by HOOI (tensorly `partial_tucker`); the better of the
two is kept. A mode kept at full size needs no factor (an orthogonal square factor can be
absorbed in the core), so it is not stored and, at full rank, the layer is its own core.
- `--rank R` caps every mode rank. Caps are walked up a ladder (1, 2, 3, 4, 6, 8, ...): the
  fit at cap R also tries HOOI from the fit at the rung below with its factors extended
  (nested subspaces, so never worse), which keeps the error non-increasing in R.
- `--tol eps`: each of the D modes is truncated at delta = eps ||W|| / sqrt(D); truncated
  HOSVD guarantees ||W - W_hosvd|| <= sqrt(sum of discarded energies) <= eps ||W||, and
  HOOI is kept only when it is better.
- `--ratio`: the largest uniform cap that fits, then single-mode increments (largest
  singular energy gained per parameter first) while the budget allows.
- `--rank vbmf` (RankSpec(rank="vbmf")): EVBMF on each mode unfolding (Kim et al.).
"""

from __future__ import annotations

import math

import numpy as np
from tensorly.decomposition import partial_tucker
from tensorly.tenalg import multi_mode_dot

from ..emit import Chain, Core, best_order
from ..tensorize import choose_modes
from .base import ChainFactorization, ConvFactorization, ConvStage, RankSpec, pointwise, truncation_rank

NAME = "tucker"
SUPPORTS_VBMF = True
HOOI_ITERS = 50


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def ladder(cap: int) -> list[int]:
    """Rungs 1, 2, 3, 4, 6, 8, 12, ... (2^j and 3 2^j) below `cap`, then `cap`."""
    rungs = sorted({1, 2} | {b << j for b in (2, 3) for j in range(max(1, cap.bit_length()))})
    return [r for r in rungs if r < cap] + [cap]


class Tucker:
    """Tucker fits of one tensor over a subset of its modes (all: Tucker; [0, 1]: Tucker-2)."""

    def __init__(self, tensor: np.ndarray, modes: list[int]):
        self.tensor = np.asarray(tensor, dtype=np.float64)
        self.modes = modes
        self.svds = [np.linalg.svd(unfold(self.tensor, k), full_matrices=False)[:2] for k in modes]
        self.numerical = [truncation_rank(s) for _, s in self.svds]
        self.norm2 = float(np.sum(self.tensor**2))

    def ranks_for(self, spec: RankSpec, budget_params) -> list[int]:
        """Per-mode ranks (same order as self.modes) under a rank rule."""
        if spec.tol is not None:
            delta = spec.tol * math.sqrt(self.norm2) / math.sqrt(len(self.modes))
            uniform = [truncation_rank(s, delta=delta) for _, s in self.svds]
            return min(uniform, self.ranks_for_energy(spec.tol**2 * self.norm2, budget_params), key=budget_params)
        if spec.rank == "vbmf":
            from .vbmf import vbmf_rank_from_singular_values

            return [min(vbmf_rank_from_singular_values(s, self.tensor.shape[k], self.tensor.size // self.tensor.shape[k]),
                        n) for (_, s), k, n in zip(self.svds, self.modes, self.numerical)]
        if spec.ratio is not None:
            return self.ranks_for_budget(self.tensor.size / spec.ratio, budget_params)
        return [min(spec.rank, n) for n in self.numerical]

    def ranks_for_budget(self, budget: float, params) -> list[int]:
        """The largest uniform cap within `budget` parameters, then greedy single-mode steps."""
        ranks = [1] * len(self.modes)
        for cap in range(2, max(self.numerical) + 1):
            trial = [min(cap, n) for n in self.numerical]
            if params(trial) > budget:
                break
            ranks = trial
        while True:
            steps = []
            for i, (r, (_, s)) in enumerate(zip(ranks, self.svds)):
                if r < self.numerical[i]:
                    trial = ranks[:i] + [r + 1] + ranks[i + 1:]
                    cost = params(trial)
                    if cost <= budget:
                        steps.append((s[r] ** 2 / max(cost - params(ranks), 1), i))
            if not steps:
                return ranks
            ranks[max(steps)[1]] += 1

    def ranks_for_energy(self, allowed: float, params) -> list[int]:
        """Greedy: drop the singular direction saving the most parameters per unit of energy
        while the discarded energies sum to at most `allowed` (the HOSVD error bound)."""
        ranks = list(self.numerical)
        spent = sum(float(np.sum(s[n:] ** 2)) for (_, s), n in zip(self.svds, ranks))
        while True:
            steps = []
            for i, (r, (_, s)) in enumerate(zip(ranks, self.svds)):
                if r > 1 and spent + s[r - 1] ** 2 <= allowed:
                    trial = ranks[:i] + [r - 1] + ranks[i + 1:]
                    steps.append(((params(ranks) - params(trial)) / max(s[r - 1] ** 2, 1e-300), i))
            if not steps:
                return ranks
            i = max(steps)[1]
            spent += self.svds[i][1][ranks[i] - 1] ** 2
            ranks[i] -= 1

    def fit(self, ranks: list[int], warm: dict | None = None) -> tuple[dict, float]:
        """({mode: factor} for the modes kept below full size, squared error): the best of
        truncated HOSVD, HOOI from it, and HOOI from `warm` factors extended to `ranks`."""
        dims = self.tensor.shape
        modes = [k for k, r in zip(self.modes, ranks) if r < dims[k]]
        rank_of = dict(zip(self.modes, ranks))
        hosvd = {k: u[:, : rank_of[k]] for k, (u, _) in zip(self.modes, self.svds) if k in modes}
        fits = [(hosvd, self.error2(hosvd))]
        if not modes:
            return fits[0]
        inits = [hosvd]
        if warm is not None:
            start = self.extend(warm, rank_of)
            inits.append(start)
            fits.append((start, self.error2(start)))
        for init in inits:
            (_, factors), _ = partial_tucker(self.tensor, [rank_of[k] for k in modes], modes=modes,
                                             init=[init[k] for k in modes], n_iter_max=HOOI_ITERS, tol=1e-10)
            f = dict(zip(modes, factors))
            fits.append((f, self.error2(f)))
        return min(fits, key=lambda fe: fe[1])

    def extend(self, warm: dict, rank_of: dict) -> dict:
        """Each warm factor completed by the leading directions of the unfolding outside it."""
        out = {}
        for k, (u, _) in zip(self.modes, self.svds):
            r = rank_of[k]
            if r >= self.tensor.shape[k]:
                continue
            base = warm.get(k, np.zeros((self.tensor.shape[k], 0)))[:, :r]
            if base.shape[1] < r:
                a = unfold(self.tensor, k)
                rest = np.linalg.svd(a - base @ (base.T @ a), full_matrices=False)[0][:, : r - base.shape[1]]
                base = np.linalg.qr(np.hstack([base, rest]))[0]
            out[k] = base
        return out

    def core(self, factors: dict) -> np.ndarray:
        if not factors:
            return self.tensor
        keys = sorted(factors)
        return multi_mode_dot(self.tensor, [factors[k] for k in keys], modes=keys, transpose=True)

    def error2(self, factors: dict) -> float:
        """||T - T~||^2 = ||T||^2 - ||core||^2 (orthonormal factors), exactly when small."""
        c = self.core(factors)
        err2 = self.norm2 - float(np.sum(c**2))
        if err2 < 1e-8 * self.norm2:
            keys = sorted(factors)
            approx = multi_mode_dot(c, [factors[k] for k in keys], modes=keys) if keys else c
            err2 = float(np.sum((self.tensor - approx) ** 2))
        return max(err2, 0.0)

    def decompose(self, spec: RankSpec, budget_params) -> tuple[dict, np.ndarray]:
        """(factors, core) under `spec`."""
        if spec.tol is None and spec.ratio is None and spec.rank != "vbmf":
            best = None
            top = max(self.numerical)
            for cap in ladder(top if spec.rank is None else min(int(spec.rank), top)):
                best = self.fit([min(cap, n) for n in self.numerical], None if best is None else best[0])
        else:
            best = self.fit(self.ranks_for(spec, budget_params))
        return best[0], self.core(best[0])


# ------------------------------------------------------------------ dense


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, **_) -> ChainFactorization:
    n, m = weight.shape
    ins, outs = modes if modes else choose_modes(n, m, order)
    ins = tuple(v for v in ins if v > 1) or (1,)  # a size-1 mode carries nothing
    outs = tuple(v for v in outs if v > 1) or (1,)
    dims = ins + outs
    tucker = Tucker(np.asarray(weight, dtype=np.float64).reshape(dims), list(range(len(dims))))

    def params(ranks):
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks) if r < d)

    factors, core = tucker.decompose(spec, params)
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
    k = math.prod(ks)
    tucker = Tucker(np.asarray(kernel, dtype=np.float64), [0, 1])

    def params(ranks):
        r_out, r_in = ranks
        return r_in * r_out * k + (t * r_out if r_out < t else 0) + (s * r_in if r_in < s else 0)

    factors, core = tucker.decompose(spec, params)
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
