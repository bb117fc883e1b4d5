"""Two-factor low rank (truncated SVD): the baseline every other format is compared with.

Dense: W ~ U V, two MatMuls. Conv: the channel SVD of the T x (S k) unfolding, a k-sized
conv S -> r carrying the original stride/pads/dilations, then a 1x1 conv r -> T.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..emit import Chain, Core
from . import vbmf
from .base import ChainFactorization, ConvFactorization, ConvStage, RankSpec, pointwise, svd, truncation_rank

NAME = "svd"
SUPPORTS_VBMF = True  # --rank vbmf: the rank estimated from the singular spectrum
SUPPORTS_DATA = True  # --fit aware: closed form whitened by the layer's input Gram matrix


def svd_rank(s: np.ndarray, n: int, m: int, spec: RankSpec) -> int:
    if spec.rank == "vbmf":
        return max(1, vbmf.vbmf_rank_from_singular_values(s, n, m))
    if spec.tol is not None:
        return spec.aligned(truncation_rank(s, delta=spec.tol * float(np.sqrt(np.sum(s**2)))), up=True,
                            full=min(n, m))
    if spec.ratio is not None:
        return truncation_rank(s, cap=_cap(n, m, spec))
    return truncation_rank(s, cap=spec.rank)


# Weights with at least this many entries and a rank cap (--rank N, --ratio) take the Gram route.
GRAM_ABOVE = 1 << 22


def _cap(n: int, m: int, spec: RankSpec) -> int | None:
    if spec.tol is None and isinstance(spec.rank, int) and not isinstance(spec.rank, bool):
        return spec.rank
    if spec.tol is None and spec.rank is None and spec.ratio is not None:
        return spec.aligned(max(1, int(n * m / (spec.ratio * (n + m)))), up=False)
    return None


# the last SVD by content: the planner asks for one matrix at many ranks (and its error
# estimates read the same spectrum), so each SVD is computed once. Only one is kept: a
# rewrite's memory must not grow with the number of layers (tests/test_large_models.py).
_SVDS: dict = {}
_SVDS_KEPT = 1
_GRAM_EIGEN: dict = {}  # the last large weight's leading Gram eigenpairs (_gram_factors), by content


def _svd_key(a: np.ndarray) -> tuple:
    return a.shape, a.dtype.str, hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def thin_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of a (base.svd), remembered for the last matrix."""
    a = np.ascontiguousarray(a)
    key = _svd_key(a)
    if key not in _SVDS:
        if len(_SVDS) >= _SVDS_KEPT:
            _SVDS.pop(next(iter(_SVDS)))
        _SVDS[key] = svd(a)
    return _SVDS[key]


def balanced_factors(w: np.ndarray, spec: RankSpec) -> tuple[np.ndarray, np.ndarray]:
    """U (n x r), V (r x m) with U V ~ w, the singular values split evenly between them."""
    cap = _cap(*w.shape, spec)
    key = _svd_key(np.ascontiguousarray(w))  # once: hashing a large weight is not free
    known = _SVDS.get(key)  # the planner's estimates read this spectrum just before
    if known is None and cap is not None and w.size >= GRAM_ABOVE:
        return _gram_factors(w, cap, key)
    u, s, vt = known or thin_svd(w)
    r = svd_rank(s, *w.shape, spec)
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def _gram_factors(w: np.ndarray, cap: int, key: tuple) -> tuple[np.ndarray, np.ndarray]:
    """balanced_factors for a large weight and a rank cap: the top eigenvectors of the Gram
    matrix of the smaller side (as tt.leading_subspace does for wide unfoldings), several
    times faster than LAPACK's full SVD and without its n x m workspace; carrying Q^T W
    keeps it exact at full rank. Singular values below ~1e-8 of the largest lose accuracy
    (the Gram squares them), which a rank cap never keeps in preference to larger ones."""
    import scipy.linalg

    wide = w.shape[1] >= w.shape[0]
    a = w if wide else w.T
    side = a.shape[0]
    k = min(cap, side)
    known = _GRAM_EIGEN.get(key)  # `key`: w's content (_svd_key)
    if known is None or known[0].size < k:
        # the first cap's eigenpairs; a larger cap asked next (the planner's ladder) gets all of
        # them at once (LAPACK's evd: about 2x one subset, which costs a full tridiagonalisation)
        subset = None if known is not None else [side - k, side - 1]
        evals, q = scipy.linalg.eigh(a @ a.T, subset_by_index=subset, check_finite=False,
                                     driver="evr" if subset else "evd")
        _GRAM_EIGEN.clear()  # one weight's, as _SVDS
        _GRAM_EIGEN[key] = known = (evals[::-1], q[:, ::-1])
    evals, q = known[0][:k], known[1][:, :k]
    s = np.sqrt(np.clip(evals, 0.0, None))
    r = truncation_rank(s, cap=cap)
    root, q = np.sqrt(s[:r]), q[:, :r]
    left, right = q * root, (q.T @ a) / np.maximum(root, 1e-300)[:, None]
    return (left, right) if wide else (right.T, left.T)


def whitened_factors(data, spec: RankSpec) -> tuple[np.ndarray, np.ndarray]:
    """The rank-r (U, V) minimising ||A U V - B|| (ALGORITHMS.md section 11; `data` a
    tnonnx.fit.LayerData with basis A = L^T and target B): the truncated SVD of B mapped
    back through A^{-1} (and, where the outputs are weighed, B = A W C: through C^{-1} on the
    right). With a tolerance, it bounds the relative output error on the calibration inputs."""
    u, s, vt = data.target_svd()
    r = svd_rank(s, data.basis.shape[1], data.target.shape[1], spec)
    root = np.sqrt(s[:r])
    return solve_basis(data.basis, u[:, :r] * root), data.unweigh(root[:, None] * vt[:r])


def solve_basis(basis: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """basis^{-1} rhs for a Gram basis, the transposed Cholesky factor (tnonnx/fit.py): upper
    triangular, solved by substitution in O(N^2 r) instead of an O(N^3) LU decomposition
    (0.1 s per call for a 1536-wide layer, once per rank the planner tries)."""
    import scipy.linalg

    return scipy.linalg.solve_triangular(basis, rhs, lower=False, check_finite=False)


def fit_dense(weight: np.ndarray, spec: RankSpec, *, data=None, **_) -> ChainFactorization:
    """data: a tnonnx.fit.LayerData with a Gram basis, for the closed-form data-aware fit."""
    n, m = weight.shape
    if data is not None and data.basis is not None:
        u, v = whitened_factors(data, spec)
    else:
        u, v = balanced_factors(weight, spec)
    r = u.shape[1]
    chain = Chain(("n",), ("m",), {"n": n, "m": m, "r": r}, [Core("U", ("n", "r")), Core("V", ("r", "m"))])
    return ChainFactorization(NAME, chain, {"U": u, "V": v}, (r,))


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, data=None, **_) -> ConvFactorization:
    """data: as for fit_dense, on the conv's im2col patches (weight matrix S*k x T)."""
    t, s = kernel.shape[:2]
    ks = kernel.shape[2:]
    if data is not None and data.basis is not None:
        left, right = whitened_factors(data, spec)  # (S*k x r), (r x T)
        u, v = right.T, left.T
    else:
        u, v = balanced_factors(kernel.reshape(t, -1), spec)
    r = u.shape[1]
    stages = [
        ConvStage(lambda c: c["V"].reshape((c["V"].shape[0], s) + ks), spatial=True),
        ConvStage(lambda c: pointwise(c["U"], len(ks)), spatial=False),
    ]
    return ConvFactorization(NAME, stages, {"U": u, "V": v}, (r,), kernel=ks, channels=(t, s))
