"""Nonlinear tensor ring (NTR, ALGORITHMS.md section 7; Li, Liu, So 2021): tr's ring with
an activation after every contraction but the last, fitted like ntt (see ntt.py: start
points, distillation, options act/iters/samples).

Dense: tr.fit_dense's TR-matrix chain in its contraction order (the ring bond stays open
from the first absorbed core to the last) with `Chain.activation` set.
Conv: tr's TRN layout (1x1 conv S -> r0 r_m, the kernel-sized conv on the batch folded with
the ring bond, 1x1 conv r0 r_{m+1} -> T) with the activation after the first two Convs;
the fold and unfold are reshapes, which commute with an elementwise activation.
"""

from __future__ import annotations

import numpy as np

from ..emit import onnx_activation
from . import tr
from .base import RankSpec, _no_dense_weight
from .ntt import ITERATIONS, nonlinear_conv, nonlinear_dense, unfitted

NAME = "ntr"
NEEDS_DATA = True
NONLINEAR = True


def fit_dense(weight: np.ndarray, spec: RankSpec, *, modes=None, order: int | None = None, data=None,
              act: str = "relu", iters: int = ITERATIONS, samples: int | None = None, **options):
    return nonlinear_dense(tr, NAME, weight, spec, modes=modes, order=order, data=data, act=act, iters=iters,
                           samples=samples, **options)


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, data=None, act: str = "relu", iters: int = ITERATIONS,
             samples: int | None = None, **options):
    return nonlinear_conv(tr, NAME, kernel, spec, data=data, act=act, iters=iters, samples=samples,
                          factory=NonlinearRingConvFactorization, **options)


def start(weight: np.ndarray, spec: RankSpec, **options):
    """The structure without fitting (tnonnx.nn trains it from scratch)."""
    return unfitted(tr, NAME, weight, spec, factory=NonlinearRingConvFactorization, **options)


class NonlinearRingConvFactorization(tr.RingConvFactorization):
    """tr's three ring Convs with the activation after the first two."""

    def to_dense(self) -> np.ndarray:
        if self.activation is not None:
            raise _no_dense_weight(self, self.activation)
        return super().to_dense()

    def emit(self, builder, x, geometry, bias, output):
        return super().emit(_ActivatedConvs(builder, self.activation), x, geometry, bias, output)

    def torch_module(self, geometry, bias: np.ndarray | None = None):
        from .tr_torch import RingConv

        return RingConv(self, geometry, bias)


class _ActivatedConvs:
    """A view of a Builder that follows every Conv node by the activation, except the Conv
    writing a given output (the layer's last)."""

    def __init__(self, builder, activation: str):
        self._builder, self._activation = builder, activation

    def __getattr__(self, name):
        return getattr(self._builder, name)

    def op(self, op_type, inputs, hint, output=None, **attrs):
        out = self._builder.op(op_type, inputs, hint, output=output, **attrs)
        if op_type == "Conv" and output is None:
            out = onnx_activation(self._builder, out, self._activation)
        return out
