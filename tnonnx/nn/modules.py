"""Torch modules computing exactly what the emitted ONNX subgraphs compute."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..emit import Chain, TorchOps, run_chain


def _params(cores: dict[str, np.ndarray], dtype=torch.float32) -> nn.ParameterDict:
    return nn.ParameterDict({k: nn.Parameter(torch.as_tensor(np.asarray(v), dtype=dtype)) for k, v in cores.items()})


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
    """A factorised conv: its stage weights are rebuilt from the cores on every call."""

    def __init__(self, factorization, geometry, bias: np.ndarray | None = None):
        super().__init__()
        self.factorization = factorization
        self.cores = _params(factorization.cores)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))
        attrs = geometry.attrs
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ValueError("torch module: auto_pad SAME_* is not supported, use explicit pads")
        nsp = len(geometry.kernel)
        pads = list(attrs.get("pads", [0] * 2 * nsp))
        self.begin, self.end = pads[:nsp], pads[nsp:]
        self.stride = list(attrs.get("strides", [1] * nsp))
        self.dilation = list(attrs.get("dilations", [1] * nsp))
        self.conv = _CONV[nsp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.factorization.stage_weights(dict(self.cores))
        stages = self.factorization.stages
        for i, (w, stage) in enumerate(zip(weights, stages)):
            b = self.bias if i == len(stages) - 1 else None
            if stage.spatial:
                if self.begin != self.end:  # asymmetric pads: pad explicitly, like ONNX
                    pad = [p for pair in zip(reversed(self.begin), reversed(self.end)) for p in pair]
                    x = self.conv(F.pad(x, pad), w, b, self.stride, 0, self.dilation)
                else:
                    x = self.conv(x, w, b, self.stride, self.begin, self.dilation)
            else:
                x = self.conv(x, w, b)
        return x
