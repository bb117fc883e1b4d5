"""CP (canonical polyadic): a sum of R rank-one terms, one factor matrix per mode.

Dense: CP of the tensorized matrix (modes n_1..n_d, m_1..m_d), a Chain whose rank label is
shared by every factor (a hyperedge, kept open as a batched MatMul). Conv: CP-4 (Lebedev et
al. 2015: 1x1 S -> R, kh x 1 and 1 x kw convs with group=R, 1x1 R -> T) for 2-D kernels,
CP-3 (1x1, one depthwise k-sized conv, 1x1) for any kernel; `conv_layout="cp4"|"cp3"`.
See ALGORITHMS.md section 5.

Fitting is ALS (own implementation, see `als`), which alone guarantees nothing across
ranks. The rules that make the format behave like the others:
- ranks are walked up a ladder (1, 2, 3, 4, 6, 8, 12, ...): the fit at rank R starts from
  the fit at the rung below plus new components (zero in the first factor, so the start
  is exactly the lower rung's approximation) and keeps the better of that start and its
  ALS result, so the error never grows along the ladder (rungs are cached, so walking the
  ladder costs about 2-3 fits at the final rank). Seeds are fixed: fits are reproducible.
- a rank >= prod(dims) / max(dims) (the slice bound, an upper bound on the CP rank of any
  tensor of that shape) returns the exact slice decomposition: one term per fibre along
  the largest mode. `--rank` huge therefore means exact (with more parameters than dense).
  A tensor built at CP rank R is recovered to round-off by ALS at rank R.
- `--ratio`: the largest rank within the budget, at most `cp_max_rank` (ALS cost).
- `--tol`: the ladder is searched, then bisected, up to the last rank with fewer
  parameters than dense (and `cp_max_rank`); the smallest rank whose ALS fit meets the
  tolerance is returned, or NotApplicable (the layer is left alone with that reason).
- `--rank vbmf` (RankSpec(rank="vbmf")): the EVBMF rank of the matrix (dense) or the larger
  of the two channel-unfolding ranks (conv): a lower bound on the CP rank of the signal.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..emit import Chain, Core, best_order
from ..errors import NotApplicable, TnonnxError
from ..tensorize import choose_modes
from .base import ConvFactorization, ConvStage, RankSpec, ChainFactorization, pointwise, svd

NAME = "cp"
SUPPORTS_VBMF = True
DEFAULT_ORDER = 2  # (n1, n2, m1, m2): measured better than 3-4 mode pairs at equal parameters


# ------------------------------------------------------------------ fitting


def ladder(rank: int) -> list[int]:
    """Rungs 1, 2, 3, 4, 6, 8, 12, ... (2^j and 3 2^j) below `rank`, then `rank`."""
    rungs = sorted({1, 2} | {b << j for b in (2, 3) for j in range(max(1, rank.bit_length()))})
    return [r for r in rungs if r < rank] + [rank]


def slice_bound(dims) -> int:
    return math.prod(dims) // max(dims)


def slice_cp(tensor: np.ndarray) -> list[np.ndarray]:
    """Exact CP: one rank-one term per fibre along the largest mode (one-hot elsewhere)."""
    dims = tensor.shape
    j = int(np.argmax(dims))
    others = [l for l in range(len(dims)) if l != j]
    rank = slice_bound(dims)
    index = np.unravel_index(np.arange(rank), [dims[l] for l in others])
    factors = []
    for l in range(len(dims)):
        if l == j:
            factors.append(np.moveaxis(tensor, j, -1).reshape(rank, dims[j]).T.copy())
        else:
            f = np.zeros((dims[l], rank))
            f[index[others.index(l)], np.arange(rank)] = 1.0
            factors.append(f)
    return factors


def khatri_rao(mats: list[np.ndarray]) -> np.ndarray:
    """Row (i_1..i_k) in C order, column r: prod_l mats[l][i_l, r]."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, m.shape[1])
    return out


def reconstruct(factors: list[np.ndarray]) -> np.ndarray:
    h = max(1, len(factors) // 2)
    left, right = khatri_rao(factors[:h]), khatri_rao(factors[h:])
    return (left @ right.T).reshape([f.shape[0] for f in factors])


def cp_error(tensor: np.ndarray, factors: list[np.ndarray]) -> float:
    return float(np.linalg.norm(tensor - reconstruct(factors)))


@dataclass(frozen=True)
class ALSOptions:
    """`format_options` of this format: cp_iters (ALS sweeps per rung), cp_restarts (extra
    SVD/random-initialised runs per rung), cp_max_rank (largest rank --ratio, --tol and
    vbmf may choose: ALS costs about R^3 + R * size per sweep; an explicit --rank is obeyed),
    cp_l2 (ridge on every solve, relative to the Gram's mean diagonal: damps degenerate,
    mutually cancelling terms at some cost in error; 0 keeps exact recovery)."""

    iters: int = 200
    restarts: int = 0
    max_rank: int = 256
    l2: float = 0.0

    @classmethod
    def from_options(cls, options: dict) -> "ALSOptions":
        names = ("iters", "restarts", "max_rank", "l2")
        return cls(**{name: options.get(f"cp_{name}", getattr(cls, name)) for name in names})


def als(tensor: np.ndarray, factors: list[np.ndarray], iters: int, l2: float = 0.0, rtol: float = 1e-6
        ) -> list[np.ndarray]:
    """Alternating least squares (with l2 = 0 each step is an exact least-squares solve, so
    the error never grows; the caller keeps the best start anyway). The modes are split in
    two halves: the MTTKRPs of a half all come from one GEMM of the unfolded tensor with
    the Khatri-Rao product of the other half's factors (tensorly's parafac forms one
    Khatri-Rao product per mode: 7x slower on a 4-way, 100x on an 8-way tensor, rank 64)."""
    dims, d = tensor.shape, tensor.ndim
    h = max(1, d // 2)
    halves = [list(range(h)), list(range(h, d))]
    mat = tensor.reshape(math.prod(dims[:h]), -1)
    factors = [f.copy() for f in factors]
    grams = [f.T @ f for f in factors]
    norm2, last = float(np.sum(tensor**2)), None
    for _ in range(iters):
        for side, other in (halves, halves[::-1]):
            y = (mat if side[0] == 0 else mat.T) @ khatri_rao([factors[l] for l in other])
            y = y.reshape([dims[l] for l in side] + [-1])
            gram_other = np.prod([grams[l] for l in other], axis=0)
            for k in side:
                z = y
                for l in reversed([l for l in side if l != k]):  # contract the rest of this half
                    z = np.sum(np.moveaxis(z, side.index(l), -2) * factors[l], axis=-2)
                z = z.reshape(dims[k], -1)
                v = gram_other * np.prod([grams[l] for l in side if l != k] or [1.0], axis=0)
                factors[k] = _solve(v + (l2 * np.trace(v) / len(v)) * np.eye(len(v)) if l2 else v, z)
                grams[k] = factors[k].T @ factors[k]
        # after the last solve: ||T - T~||^2 = ||T||^2 - 2 <T, T~> + ||T~||^2
        err2 = norm2 - 2 * np.sum(factors[k] * z) + np.sum(v * grams[k])
        if err2 < 1e-10 * norm2:  # near exact: the formula above is all cancellation
            err2 = cp_error(tensor, factors) ** 2
        if last is not None and last - err2 <= rtol * last:
            break
        last = err2
    return factors


def _solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """rhs @ gram^-1 for a symmetric positive semi-definite gram (Cholesky; lstsq if singular)."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(gram, check_finite=False), rhs.T,
                                      check_finite=False).T
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T


def hosvd_init(tensor: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Leading left singular vectors of each unfolding, random columns beyond the mode size."""
    out = []
    for k, n in enumerate(tensor.shape):
        u = svd(np.moveaxis(tensor, k, 0).reshape(n, -1))[0][:, :rank]
        out.append(np.hstack([u, rng.standard_normal((n, rank - u.shape[1])) / math.sqrt(n)]))
    return out


_CACHE: OrderedDict = OrderedDict()  # (tensor digest, options, rank) -> (factors, error)


def fit_rank(tensor: np.ndarray, rank: int, opts: ALSOptions = ALSOptions()) -> tuple[list[np.ndarray], float]:
    """(factors, absolute error) at `rank`: continuation up the ladder, every rung the best
    of its start (the rung below plus new components, zero in the first factor) and ALS
    from it (and from `restarts` SVD/random starts). Rungs are cached across calls."""
    tensor = np.asarray(tensor, dtype=np.float64)
    if rank >= slice_bound(tensor.shape):
        return slice_cp(tensor), 0.0
    digest = hashlib.blake2b(np.ascontiguousarray(tensor).tobytes(), digest_size=16).hexdigest()
    best = None
    for r in ladder(rank):
        key = (digest, tensor.shape, opts, r)
        if key not in _CACHE:
            rng = np.random.default_rng(r)
            inits = [hosvd_init(tensor, r, rng) if i == 0 else [rng.standard_normal((n, r)) for n in tensor.shape]
                     for i in range(opts.restarts + (best is None))]
            fits = []
            if best is not None:
                new = r - best[0][0].shape[1]
                start = [np.hstack([f, rng.standard_normal((f.shape[0], new)) * (k > 0)])
                         for k, f in enumerate(best[0])]
                inits, fits = [start] + inits, [(start, best[1])]
            for init in inits:
                f = als(tensor, init, opts.iters, opts.l2)
                fits.append((f, cp_error(tensor, f)))
            _CACHE[key] = min(fits, key=lambda fe: fe[1])
            while len(_CACHE) > 256:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        best = _CACHE[key]
    return best


def balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Unit-norm columns scaled by lambda^(1/D): the same magnitude in every factor."""
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    scale = np.prod(norms, axis=0) ** (1.0 / len(factors))
    return [f / np.where(n > 0, n, 1) * scale for f, n in zip(factors, norms)]


def decompose(tensor: np.ndarray, spec: RankSpec, vbmf_rank, opts: ALSOptions) -> list[np.ndarray]:
    """Balanced factors of `tensor` under `spec` (see the module notes for the rules)."""
    tensor = np.asarray(tensor, dtype=np.float64)
    dims, bound = tensor.shape, slice_bound(tensor.shape)
    if spec.tol is None:
        if spec.rank == "vbmf":
            rank = min(vbmf_rank(), opts.max_rank)
        elif spec.ratio is not None:
            rank = min(int(math.prod(dims) / (spec.ratio * sum(dims))), opts.max_rank)
            if rank < 1:
                raise NotApplicable(f"cp: ratio {spec.ratio:g}x out of reach (rank 1 keeps {sum(dims)} of "
                                    f"{math.prod(dims)} parameters)")
        else:
            rank = bound if spec.rank is None else int(spec.rank)
        return balance(fit_rank(tensor, min(rank, bound), opts)[0])
    target = spec.tol * float(np.linalg.norm(tensor))
    limit = min(bound - 1, opts.max_rank, (math.prod(dims) - 1) // sum(dims))  # below: fewer params than dense
    lo = 0
    for r in ladder(limit) if limit >= 1 else []:
        if fit_rank(tensor, r, opts)[1] <= target:
            hi = r
            while hi - lo > 1:  # bisect between the failing rung below and this one
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fit_rank(tensor, mid, opts)[1] <= target else (mid, hi)
            return balance(fit_rank(tensor, hi, opts)[0])
        lo = r
    raise NotApplicable(f"cp: --tol {spec.tol:g} not reached by ALS with fewer parameters than the dense "
                        f"weight (tried ranks up to {limit}, cp_max_rank {opts.max_rank})")


# ------------------------------------------------------------------ dense


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, **options
              ) -> ChainFactorization:
    n, m = weight.shape
    ins, outs = modes if modes else choose_modes(n, m, order or DEFAULT_ORDER)
    ins = tuple(v for v in ins if v > 1) or (1,)  # CP pairs no in-mode with an out-mode:
    outs = tuple(v for v in outs if v > 1) or (1,)  # size-1 modes are simply dropped
    factors = decompose(np.asarray(weight, dtype=np.float64).reshape(ins + outs), spec,
                        lambda: _vbmf(weight), ALSOptions.from_options(options))
    r = factors[0].shape[1]
    d = len(ins)
    sizes = {f"n{k}": v for k, v in enumerate(ins)} | {f"m{k}": v for k, v in enumerate(outs)} | {"r": r}
    cores = [Core(f"A{k}", (f"n{k}", "r")) for k in range(d)]
    cores += [Core(f"B{k}", (f"m{k}", "r")) for k in range(len(outs))]
    arrays = {c.key: f for c, f in zip(cores, factors)}
    in_labels, out_labels = tuple(f"n{k}" for k in range(d)), tuple(f"m{k}" for k in range(len(outs)))
    chain = Chain(in_labels, out_labels, sizes, best_order(cores, in_labels, out_labels, sizes))
    return ChainFactorization(NAME, chain, arrays, (r,), modes=(ins, outs))


def _vbmf(matrix):
    from .vbmf import vbmf_rank_for_matrix

    return vbmf_rank_for_matrix(matrix)  # the matrix rank: a lower bound on the CP rank


# ------------------------------------------------------------------ conv


class CPConv(ConvFactorization):
    """A conv in CP form: its dense kernel is the sum of the rank-one terms."""

    def to_dense(self) -> np.ndarray:
        factors = [self.cores[k] for k in sorted(self.cores)]  # A (T), B (S), C0, C1... (kernel)
        dense = reconstruct(factors)
        t, s = self.channels
        return dense.reshape((t, s) + tuple(self.kernel))


def _split_attrs(axis: int, nsp: int):
    """Conv attributes of the 1-D depthwise stage along `axis` of a 2-D kernel (CP-4)."""

    def attrs(geometry) -> dict:
        a = geometry.attrs
        one = lambda key, default: [v if i == axis else default for i, v in  # noqa: E731
                                    enumerate(a.get(key, [default] * nsp))]
        out = {"kernel_shape": [k if i == axis else 1 for i, k in enumerate(geometry.kernel)],
               "strides": one("strides", 1), "dilations": one("dilations", 1)}
        if a.get("auto_pad", "NOTSET") != "NOTSET":  # SAME/VALID pad each axis on its own
            out["auto_pad"] = a["auto_pad"]
        else:
            pads = a.get("pads", [0] * 2 * nsp)
            out["pads"] = [pads[i] if i % nsp == axis else 0 for i in range(2 * nsp)]
        return out

    return attrs


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, conv_layout: str | None = None, transposed: bool = False,
             **options) -> ConvFactorization:
    """transposed: for a ConvTranspose layer, whose one spatial stage cp3 keeps (the default there)."""
    t, s = kernel.shape[:2]
    ks = tuple(kernel.shape[2:])
    nsp = len(ks)
    layout = conv_layout or ("cp4" if nsp == 2 and not transposed else "cp3")
    if layout not in ("cp3", "cp4"):
        raise TnonnxError(f"cp: conv_layout {layout!r}: choose 'cp4' (2-D kernels) or 'cp3'")
    if layout == "cp4" and nsp != 2:
        raise NotApplicable(f"cp: conv_layout cp4 needs a 2-D kernel, this one is {nsp}-D (use cp3)")
    k = np.asarray(kernel, dtype=np.float64)
    tensor = k if layout == "cp4" else k.reshape(t, s, math.prod(ks))

    def vbmf_rank():
        from .vbmf import vbmf_ranks_for_conv

        return max(vbmf_ranks_for_conv(k))  # each multilinear rank bounds the CP rank below

    factors = decompose(tensor, spec, vbmf_rank, ALSOptions.from_options(options))
    r = factors[0].shape[1]
    cores = {"A": factors[0], "B": factors[1]} | {f"C{i}": f for i, f in enumerate(factors[2:])}
    first = ConvStage(lambda c: pointwise(c["B"].T, nsp), spatial=False)
    last = ConvStage(lambda c: pointwise(c["A"], nsp), spatial=False)
    if layout == "cp3":
        middle = [ConvStage(lambda c: c["C0"].T.reshape((c["C0"].shape[1], 1) + ks), spatial=True, group=r)]
    else:
        middle = [ConvStage(lambda c, i=i: c[f"C{i}"].T.reshape((c[f"C{i}"].shape[1], 1)
                                                                  + tuple(ks[i] if j == i else 1 for j in range(2))),
                            spatial=True, group=r, attrs=_split_attrs(i, 2)) for i in range(2)]
    return CPConv(NAME, [first] + middle + [last], cores, (r,), kernel=ks, channels=(t, s))
