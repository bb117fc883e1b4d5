"""Two-factor low rank (truncated SVD): the baseline every other format is compared with.

Dense: W ~ U V, two MatMuls. Conv: the channel SVD of the T x (S k) unfolding, a k-sized
conv S -> r carrying the original stride/pads/dilations, then a 1x1 conv r -> T.
"""

from __future__ import annotations

import numpy as np

from ..emit import Chain, Core
from . import vbmf
from .base import ChainFactorization, ConvFactorization, ConvStage, RankSpec, pointwise, truncation_rank

NAME = "svd"
SUPPORTS_VBMF = True  # --rank vbmf: the rank estimated from the singular spectrum
SUPPORTS_GRAM = True  # --fit aware: whitened by the layer's input Gram matrix


def svd_rank(s: np.ndarray, n: int, m: int, spec: RankSpec) -> int:
    if spec.rank == "vbmf":
        return max(1, vbmf.vbmf_rank_from_singular_values(s, n, m))
    if spec.tol is not None:
        return truncation_rank(s, delta=spec.tol * float(np.sqrt(np.sum(s**2))))
    if spec.ratio is not None:
        return truncation_rank(s, cap=max(1, int(n * m / (spec.ratio * (n + m)))))
    return truncation_rank(s, cap=spec.rank)


def balanced_factors(w: np.ndarray, spec: RankSpec) -> tuple[np.ndarray, np.ndarray]:
    """U (n x r), V (r x m) with U V ~ w, the singular values split evenly between them."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    r = svd_rank(s, *w.shape, spec)
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def whitened_factors(w: np.ndarray, spec: RankSpec, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rank-r factors minimising ||X W - X U V|| for inputs X with X^T X = gram
    (ALGORITHMS.md section 11): with gram = L L^T, the truncated SVD of L^T W mapped back
    through L^{-T}. A small ridge keeps L invertible when some input directions are unused.
    With a tolerance, it bounds the relative output error on the calibration inputs."""
    n = gram.shape[0]
    ridge = 1e-6 * max(np.trace(gram) / n, 1e-30)
    chol = np.linalg.cholesky(gram + ridge * np.eye(n))
    u, s, vt = np.linalg.svd(chol.T @ w, full_matrices=False)
    r = svd_rank(s, *w.shape, spec)
    root = np.sqrt(s[:r])
    left = np.linalg.solve(chol.T, u[:, :r] * root)
    return left, root[:, None] * vt[:r]


def fit_dense(weight: np.ndarray, spec: RankSpec, *, gram: np.ndarray | None = None, **_) -> ChainFactorization:
    n, m = weight.shape
    u, v = balanced_factors(weight, spec) if gram is None else whitened_factors(weight, spec, gram)
    r = u.shape[1]
    chain = Chain(("n",), ("m",), {"n": n, "m": m, "r": r}, [Core("U", ("n", "r")), Core("V", ("r", "m"))])
    return ChainFactorization(NAME, chain, {"U": u, "V": v}, (r,))


def fit_conv(kernel: np.ndarray, spec: RankSpec, **_) -> ConvFactorization:
    t, s = kernel.shape[:2]
    ks = kernel.shape[2:]
    u, v = balanced_factors(kernel.reshape(t, -1), spec)
    r = u.shape[1]
    stages = [
        ConvStage(lambda c: c["V"].reshape((c["V"].shape[0], s) + ks), spatial=True),
        ConvStage(lambda c: pointwise(c["U"], len(ks)), spatial=False),
    ]
    return ConvFactorization(NAME, stages, {"U": u, "V": v}, (r,), kernel=ks, channels=(t, s))
