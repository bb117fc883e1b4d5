"""The torch module of a tensor-ring conv (tr.RingConvFactorization): what its ONNX
subgraph computes, the ring bond r0 folded into the batch around the spatial conv."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..emit import TorchOps
from ..nn.modules import _CONV, _params, _torch_attrs


class RingConv(nn.Module):
    def __init__(self, factorization, geometry, bias=None):
        super().__init__()
        self.factorization = factorization
        self.cores = _params(factorization.cores)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))
        self.conv = _CONV[len(geometry.kernel)]
        self.stage_attrs = [_torch_attrs(stage.conv_attrs(geometry), len(geometry.kernel))
                            for stage in factorization.stages]
        self.r0, self.rm, self.rn = factorization.bonds
        self.activation = getattr(factorization, "activation", None)  # ntr: after the first two convs

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

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return TorchOps(batch_rank=0).activation(x, self.activation)
