"""The torch side of ADTN (adtn.py): modules decoding the weight on every call, and the
fit of the gates to a trained weight (kept apart so that importing the formats does not
import torch)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..nn.modules import _CONV, _params, _torch_attrs
from .adtn import LEARNING_RATE, decode


class DecodedLinear(nn.Module):
    """y = x W, W decoded from the gates (what the emitted MatMul computes)."""

    def __init__(self, fact):
        super().__init__()
        self.fact = fact
        self.cores = _params(fact.cores)

    def weight(self) -> torch.Tensor:
        f = self.fact
        return decode(dict(self.cores), f.shape, f.depth, f.qubits, f.act, f.layout, f.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight()


class DecodedConv(DecodedLinear):
    """The layer's Conv with the decoded kernel."""

    def __init__(self, fact, geometry, bias: np.ndarray | None = None):
        super().__init__(fact)
        nsp = len(fact.kernel)
        self.conv = _CONV[nsp]
        self.pad, self.stride, self.dilation, self.group = _torch_attrs(geometry.spatial_attrs(), nsp)
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return self.conv(x, self.weight(), self.bias, self.stride, 0, self.dilation, self.group)


def fit_cores(fact, weight: np.ndarray, iters: int) -> dict[str, np.ndarray]:
    """Adam (float64, cosine-annealed rate) on ||decode - W||^2 / ||W||^2 from the
    factorisation's cores; the best iterate's cores."""
    cores = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in fact.cores.items()}
    target = torch.as_tensor(weight, dtype=torch.float64)
    norm = target.pow(2).sum().clamp_min(1e-300)
    opt = torch.optim.Adam(cores.values(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
    best, kept = float("inf"), fact.cores
    for _ in range(iters + 1):
        opt.zero_grad()
        decoded = decode(cores, fact.shape, fact.depth, fact.qubits, fact.act, fact.layout, fact.perm)
        loss = (decoded - target).pow(2).sum() / norm
        if float(loss.detach()) < best:
            best, kept = float(loss.detach()), {k: v.detach().numpy().copy() for k, v in cores.items()}
        loss.backward()
        opt.step()
        schedule.step()
    return kept
