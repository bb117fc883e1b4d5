"""The torch module of a tensor-ring conv (tr.RingConvFactorization): what its ONNX
subgraph computes, the ring bond r0 folded into the batch around the spatial conv."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..nn.modules import StagedConv


class RingConv(StagedConv):
    """StagedConv's stages with the ring bond r0 moved into the batch around the spatial one."""

    def __init__(self, factorization, geometry, bias=None):
        super().__init__(factorization, geometry, bias)
        self.r0, self.rm, self.rn = factorization.bonds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.factorization.stage_weights(dict(self.cores))
        for i, (w, (pad, stride, dilation, group)) in enumerate(zip(weights, self.stage_attrs)):
            if i == 1:  # (B, r0 r_m, ...) -> (B r0, r_m, ...)
                x = x.reshape((-1, self.rm) + tuple(x.shape[2:]))
            if any(pad):
                x = F.pad(x, pad)
            x = self.conv(x, w, self.bias if i == 2 else None, stride, 0, dilation, group)
            if i == 1:  # (B r0, r_{m+1}, ...) -> (B, r0 r_{m+1}, ...)
                x = x.reshape((-1, self.r0 * self.rn) + tuple(x.shape[2:]))
            if self.activation is not None and i < 2:
                x = self.activate(x)
        return x
