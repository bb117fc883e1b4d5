"""STT: semi-tensor-product tensor train (Zhao et al. 2021; ALGORITHMS.md section 6).

Dense: every TT core G'_k (r_{k-1}, n_k/t, m_k/t, r_k) acts as G'_k (x) I_t; conv: the
kernel is K' (x) I_t on the channels and K' is a TT conv (tt.fit_conv). The definition,
the fit (projection on the STP structure, then TT-SVD of the reduced weight) and the
emission are in stp.py.
"""

from __future__ import annotations

import numpy as np

from . import tt
from .base import RankSpec
from .stp import STPChain, fit_dense_stp
from .stp_conv import STPConv, fit_conv_stp

NAME = "stt"
# fits only weights with the semi-tensor structure: not a candidate for --format auto
STRUCTURED = True


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, stp_t: int = 2,
              **_) -> STPChain:
    return fit_dense_stp(NAME, tt.fit_dense, weight, spec, t=stp_t, modes=modes, order=order)


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, stp_t: int = 2, **_) -> STPConv:
    return fit_conv_stp(NAME, tt.fit_conv, kernel, spec, t=stp_t)
