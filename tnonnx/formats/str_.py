"""STR: semi-tensor-product tensor ring (Zhao et al. 2021; ALGORITHMS.md section 6).

Dense: every TR core G'_k (r_k, n_k/t, m_k/t, r_{k+1}) acts as G'_k (x) I_t; conv: the
kernel is K' (x) I_t on the channels and K' is a TR conv in the TRN layout (tr.fit_conv).
The definition, the fit (projection on the STP structure, then TR-SVD/TR-ALS of the
reduced weight) and the emission are in stp.py. (The file is str_.py so as not to shadow
the builtin; the format is "str".)
"""

from __future__ import annotations

import numpy as np

from . import tr
from .base import RankSpec
from .stp import STPChain, fit_dense_stp
from .stp_conv import STPConv, fit_conv_stp

NAME = "str"
# fits only weights with the semi-tensor structure: not a candidate for --format auto
STRUCTURED = True


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, stp_t: int = 2,
              sweeps: int = tr.ALS_SWEEPS, **_) -> STPChain:
    return fit_dense_stp(NAME, tr.fit_dense, weight, spec, t=stp_t, modes=modes, order=order, sweeps=sweeps)


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, stp_t: int = 2, sweeps: int = tr.ALS_SWEEPS, **_) -> STPConv:
    return fit_conv_stp(NAME, tr.fit_conv, kernel, spec, t=stp_t, sweeps=sweeps)
