"""STTu: semi-tensor-product Tucker (Zhao et al. 2021; ALGORITHMS.md sections 5 and 6).

Tucker factors are stored (n/t) x (R/t) and act as F (x) I_t; the core is stored whole.
Operational definition (the paper's placement of the identity is not confirmed):

- Dense: W is tensorized to 2d modes (n_1..n_d, m_1..m_d) (default d = 2: the Tucker
  core grows as R^(2d)), each mode split as n_k = n'_k t (index i'_k t + s_k). Factor
  F_k (n'_k x R'_k) acts on i'_k; the sub-index s_k passes from the input through F_k
  (F_k (x) I_t) into the core C (R'_1, t, ..., R'_d, t, Q'_1, t, ..., Q'_d, t), and the
  output sub-indices leave C through V_k (m'_k x Q'_k) the same way. In the chain engine
  s_k is a label shared by the input and C. Such a W is the partial Tucker
  decomposition, over the 2d "prime" axes only, of W reshaped to 4d axes
  (n'_1, t, ..., m'_d, t): it is fitted by HOOI (ALS on the factors, the core being the
  least squares projection) from a truncated HOSVD, over those axes. No projection is
  needed: at full rank (R'_k = n'_k) it is exact for every weight.
- Conv: Tucker-2 on the channels in the same way: K reshaped to (T', t, S', t, k...),
  factors U_T (T' x R'_out) and U_S (S' x R'_in) on the prime channel axes, core
  (R'_out t, R'_in t, k...). Emission: an STP 1x1 conv S -> R_in (U_S^T (x) I_t), the
  core conv carrying the original stride/pads/dilations, an STP 1x1 conv R_out -> T
  (stp_conv.STPConv; the core is a plain piece on all the channels). 1-D/2-D/3-D alike.
- Ranks are the stored factor widths R'_k (the Tucker ranks are R'_k t): --rank caps
  them. --tol and --ratio lower one rank at a time from the numerical ranks, the one
  losing the least energy per parameter saved, reading the exact error of each HOSVD
  truncation off the full HOSVD core: while the error stays within --tol, or until the
  parameters fit --ratio. HOOI then only lowers the error (the best iterate is kept).
"""

from __future__ import annotations

import math

import numpy as np

from ..emit import Chain, Core, best_order
from .base import (ConvFactorization, ConvStage, RankSpec, gram_left_singular, mode_project, permute, pointwise,
                   truncation_rank)
from .stp import STPChain, STPNotApplicable, _check_ratio, stp_modes
from .stp_conv import STPConv, lifted

NAME = "sttu"
# fits only weights with the semi-tensor structure: not a candidate for --format auto
STRUCTURED = True


def _project(x: np.ndarray, axes, factors, skip=None) -> np.ndarray:
    """x multiplied on each axis (but `skip`) by the transpose of its factor."""
    return mode_project(x, {ax: u for j, (ax, u) in enumerate(zip(axes, factors)) if j != skip})


def _leading(x: np.ndarray, ax: int):
    """Left singular vectors and values of the unfolding along `ax` (from its Gram
    matrix: the unfoldings are short and very wide)."""
    u, s = gram_left_singular(np.moveaxis(x, ax, 0).reshape(x.shape[ax], -1))
    return np.ascontiguousarray(u), s


def partial_tucker(x: np.ndarray, axes, spec: RankSpec, params, size: int, iters: int = 20):
    """(core, factors): orthonormal factors on `axes` of x (the other axes are kept): a
    truncated HOSVD at the ranks `choose_ranks` picks, then HOOI (the best iterate)."""
    x = np.asarray(x, dtype=np.float64)
    norm2 = float(np.sum(x * x))
    full = [_leading(x, ax) for ax in axes]
    ranks = [truncation_rank(s) for _, s in full]  # numerical ranks
    if spec.tol is not None or spec.ratio is not None:
        energy = _project(x, axes, [u[:, :r] for (u, _), r in zip(full, ranks)]) ** 2
        limit = None if spec.ratio is None else size / spec.ratio
        ranks = choose_ranks(energy, axes, ranks, params, norm2, spec.tol, limit)
    else:
        ranks = [min(spec.rank, r) for r in ranks]
    factors = [u[:, :r] for (u, _), r in zip(full, ranks)]
    core = _project(x, axes, factors)
    best = (norm2 - float(np.sum(core * core)), factors, core)
    if all(r == x.shape[ax] for ax, r in zip(axes, ranks)):
        return core, factors  # nothing truncated: exact
    for _ in range(iters):  # HOOI
        factors = list(factors)
        for j, ax in enumerate(axes):
            factors[j] = _leading(_project(x, axes, factors, skip=j), ax)[0][:, : ranks[j]]
        core = _project(x, axes, factors)
        err2 = norm2 - float(np.sum(core * core))
        if err2 >= best[0] - 1e-9 * norm2:  # converged (or worse)
            if err2 < best[0]:
                best = (err2, factors, core)
            break
        best = (err2, factors, core)
    return best[2], best[1]


def choose_ranks(energy: np.ndarray, axes, ranks, params, norm2: float, tol: float | None, limit: float | None):
    """Lower one rank at a time, the one losing the least energy per parameter saved
    (`energy`: the squared HOSVD core, whose truncations give the exact HOSVD errors):
    with a tolerance, while the error stays within it; with a limit, until within it."""
    ranks = list(ranks)

    def kept(r):
        return float(energy[tuple(slice(None, r[axes.index(a)]) if a in axes else slice(None)
                                  for a in range(energy.ndim))].sum())

    now = kept(ranks)
    while limit is None or params(ranks) > limit:
        best = None
        for j in range(len(ranks)):
            trial = ranks[:j] + [ranks[j] - 1] + ranks[j + 1:]
            if trial[j] < 1:
                continue
            after = kept(trial)
            if tol is not None and norm2 - after > (tol * tol) * norm2:
                continue
            score = (now - after) / max(params(ranks) - params(trial), 1)
            if best is None or score < best[0]:
                best = (score, trial, after)
        if best is None:
            break
        _, ranks, now = best
    return ranks


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, stp_t: int = 2,
              **_) -> STPChain:
    t, weight = stp_t, np.asarray(weight, dtype=np.float64)
    n, m = weight.shape
    ins, outs = stp_modes(n, m, t, modes=modes, order=order, default=2)
    d = len(ins)
    dims = [v // t for v in ins + outs]
    x = weight.reshape([v for p in dims for v in (p, t)])
    axes = [2 * j for j in range(2 * d)]

    def params(ranks):
        return sum(a * r for a, r in zip(dims, ranks)) + math.prod(ranks) * t ** (2 * d)

    core, factors = partial_tucker(x, axes, spec, params, weight.size)
    ranks = [f.shape[1] for f in factors]
    sizes = {f"n{k}": dims[k] for k in range(d)} | {f"m{k}": dims[d + k] for k in range(d)}
    sizes |= {f"s{k}": t for k in range(d)} | {f"z{k}": t for k in range(d)}
    sizes |= {f"p{k}": ranks[k] for k in range(d)} | {f"q{k}": ranks[d + k] for k in range(d)}
    cores = {f"F{k}": factors[k] for k in range(d)} | {f"V{k}": factors[d + k] for k in range(d)} | {"C": core}
    net = [Core(f"F{k}", (f"n{k}", f"p{k}")) for k in range(d)] + [Core(f"V{k}", (f"m{k}", f"q{k}")) for k in range(d)]
    net.append(Core("C", tuple(l for k in range(d) for l in (f"p{k}", f"s{k}"))
                    + tuple(l for k in range(d) for l in (f"q{k}", f"z{k}"))))
    ins_l = tuple(l for k in range(d) for l in (f"n{k}", f"s{k}"))
    outs_l = tuple(l for k in range(d) for l in (f"m{k}", f"z{k}"))
    chain = Chain(ins_l, outs_l, sizes, best_order(net, ins_l, outs_l, sizes))
    fact = STPChain(NAME, chain, cores, tuple(ranks), modes=(ins, outs), t=t)
    fact.decomposition_error = fact.relative_error(weight)
    _check_ratio(fact, weight.size, spec)
    return fact


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, stp_t: int = 2, **_) -> STPConv:
    t, kernel = stp_t, np.asarray(kernel, dtype=np.float64)
    n_out, n_in = kernel.shape[:2]
    ks = kernel.shape[2:]
    if n_out % t or n_in % t:
        raise STPNotApplicable(f"conv with {n_out} out / {n_in} in channels: STP needs stp_t={t} to divide both")
    dims = [n_out // t, n_in // t]
    k = math.prod(ks)

    def params(ranks):
        return dims[0] * ranks[0] + dims[1] * ranks[1] + ranks[0] * ranks[1] * t * t * k

    x = kernel.reshape((dims[0], t, dims[1], t) + ks)
    core, (u_out, u_in) = partial_tucker(x, [0, 2], spec, params, kernel.size)
    r_out, r_in = u_out.shape[1], u_in.shape[1]
    cores = {"U_in": u_in, "C": core, "U_out": u_out}
    ksp = len(ks) + 1 if lifted(len(ks)) else len(ks)  # the STP pieces' spatial rank

    def factor(key, channels):  # a 1x1 conv piece: U_in^T (S' -> R'_in) or U_out (R'_out -> T')
        build = lambda c: pointwise(permute(c[key], (1, 0)) if key == "U_in" else c[key], ksp)
        return ConvFactorization(NAME, [ConvStage(build, False)], {key: cores[key]}, (), (1,) * ksp, channels)

    pieces = [factor("U_in", (r_in, dims[1])),
              ConvStage(lambda c: c["C"].reshape((r_out * t, r_in * t) + ks), spatial=True),
              factor("U_out", (dims[0], r_out))]
    fact = STPConv(NAME, pieces, (True, False, True), cores, (r_out, r_in), ks, (n_out, n_in), t)
    fact.decomposition_error = fact.relative_error(kernel)
    _check_ratio(fact, kernel.size, spec)
    return fact
