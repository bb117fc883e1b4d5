"""formats.base.svd: where LAPACK's divide-and-conquer SVD (numpy's gesdd) does not converge,
the QR-iteration driver answers instead, so a fit never fails on a well-conditioned matrix."""

import numpy as np

from tnonnx.formats import FORMATS, RankSpec
from tnonnx.formats import base


def test_falls_back_to_gesvd_when_gesdd_does_not_converge(monkeypatch):
    a = np.random.default_rng(0).standard_normal((30, 50))
    want_u, want_s, want_vt = np.linalg.svd(a, full_matrices=False)

    def refuses(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(base.np.linalg, "svd", refuses)
    u, s, vt = base.svd(a)
    np.testing.assert_allclose(s, want_s, rtol=1e-12)
    np.testing.assert_allclose((u * s) @ vt, a, atol=1e-12)
    assert u.shape == want_u.shape and vt.shape == want_vt.shape
    np.testing.assert_allclose(base.svd(a, compute_uv=False), want_s, rtol=1e-12)


def test_tucker2_of_a_random_256_channel_kernel_at_rank_32():
    # The rank-32 rung extends the rank-24 factors by the leading directions of the residual
    # unfolding; on numpy 2.4's OpenBLAS 0.3.31 gesdd fails on that 256 x 2304 matrix for
    # this kernel (it raised "SVD did not converge" before the fallback).
    rng = np.random.default_rng(0)
    kernel = [rng.standard_normal((256, 256, 3, 3)) / np.sqrt(256 * 9) for _ in range(4)][3]
    fact = FORMATS["tucker"].fit_conv(kernel, RankSpec(rank=32))
    assert fact.ranks == (32, 32)
    err = np.linalg.norm(fact.to_dense() - kernel) / np.linalg.norm(kernel)
    assert 0 < err < 1


def test_left_singular_through_the_gram_matrix_and_back_to_the_svd_when_rank_deficient():
    from tnonnx.formats.base import left_singular, svd, truncation_rank

    g = np.random.default_rng(0)
    wide = g.standard_normal((12, 200))
    u, s = left_singular(wide)
    ref_u, ref_s, _ = svd(wide)
    np.testing.assert_allclose(s, ref_s, rtol=1e-10)
    np.testing.assert_allclose(np.abs(u.T @ ref_u), np.eye(12), atol=1e-8)  # same vectors up to sign
    low = g.standard_normal((12, 3)) @ g.standard_normal((3, 200))  # the Gram would blur its zeros
    assert truncation_rank(left_singular(low)[1]) == 3
