"""The hybrid policy of Wu et al. 2020: hierarchical Tucker for MatMul/Gemm weights (large
mode pairs n_k m_k, where HT's leaves cost only r each) and tensor train for conv kernels
(small modes, where HT's transfer tensors cost r^3). See ALGORITHMS.md section 4."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import ht, tt
from .base import ChainFactorization, ConvFactorization, RankSpec

NAME = "hybrid"


def fit_dense(weight: np.ndarray, spec: RankSpec, **kwargs) -> ChainFactorization:
    return replace(ht.fit_dense(weight, spec, **kwargs), format=NAME)


def fit_conv(kernel: np.ndarray, spec: RankSpec, **kwargs) -> ConvFactorization:
    return replace(tt.fit_conv(kernel, spec, **kwargs), format=NAME)
