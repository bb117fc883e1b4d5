"""Torch modules computing exactly what the emitted ONNX subgraphs compute."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..emit import Chain, TorchOps, run_chain


def _params(cores: dict[str, np.ndarray], dtype=torch.float32) -> nn.ParameterDict:
    # copies: training must not write into the arrays given (a format may keep them cached)
    return nn.ParameterDict({k: nn.Parameter(torch.tensor(np.ascontiguousarray(v), dtype=dtype)) for k, v in cores.items()})


class ChainLinear(nn.Module):
    """y = x W through a chain of cores, in the chain's absorption order."""

    def __init__(self, chain: Chain, cores: dict[str, np.ndarray], bias: np.ndarray | None = None):
        super().__init__()
        self.chain = chain
        self.cores = _params(cores)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = run_chain(TorchOps(batch_rank=x.dim() - 1), x, self.chain, dict(self.cores))
        return y if self.bias is None else y + self.bias


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class StagedConv(nn.Module):
    """A factorised conv: its stage weights are rebuilt from the cores on every call, and
    each stage is a torch conv with the attributes (pads, strides, groups) of its ONNX Conv,
    followed (all but the last) by the factorisation's activation, if it has one."""

    def __init__(self, factorization, geometry, bias: np.ndarray | None = None):
        super().__init__()
        self.factorization = factorization
        self.cores = _params(factorization.cores)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))
        self.conv = _CONV[len(geometry.kernel)]
        self.stage_attrs = [_torch_attrs(stage.conv_attrs(geometry), len(geometry.kernel))
                            for stage in factorization.stages]
        self.activation = getattr(factorization, "activation", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.factorization.stage_weights(dict(self.cores))
        for i, (w, attrs) in enumerate(zip(weights, self.stage_attrs)):
            b = self.bias if i == len(weights) - 1 else None
            pad, stride, dilation, group = attrs
            if any(pad):  # ONNX pads may be asymmetric: pad explicitly
                x = F.pad(x, pad)
            x = self.conv(x, w, b, stride, 0, dilation, group)
            if self.activation is not None and i < len(weights) - 1:
                x = self.activate(x)
        return x

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return TorchOps(batch_rank=0).activation(x, self.activation)


def _torch_attrs(attrs: dict, nsp: int):
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("torch module: auto_pad SAME_* is not supported, use explicit pads")
    pads = list(attrs.get("pads", [0] * 2 * nsp)) if attrs.get("auto_pad", "NOTSET") != "VALID" else [0] * 2 * nsp
    begin, end = pads[:nsp], pads[nsp:]
    torch_pad = [p for pair in zip(reversed(begin), reversed(end)) for p in pair]  # last axis first
    return (torch_pad, list(attrs.get("strides", [1] * nsp)), list(attrs.get("dilations", [1] * nsp)),
            attrs.get("group", 1))


class GroupedConv(nn.Module):
    """Input channels split into equal groups, one factorised conv per group, concatenated."""

    def __init__(self, groups: list[nn.Module]):
        super().__init__()
        self.groups = nn.ModuleList(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, len(self.groups), dim=1)
        return torch.cat([g(p) for g, p in zip(self.groups, parts)], dim=1)
