"""The torch module of an STP conv (stp.STPConv): the same pieces, channel layouts and
order as its ONNX emission (kept apart so that importing the formats does not import
torch)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..nn.modules import _CONV, _params, _torch_attrs
from .stp_conv import s_major


class STPConvModule(nn.Module):
    def __init__(self, fact, geometry, bias: np.ndarray | None = None):
        super().__init__()
        self.fact = fact
        self.nsp = len(geometry.kernel)
        owned = {k for p, s in zip(fact.pieces, fact.stp) if s for k in p.cores}
        self.cores = _params({k: v for k, v in fact.cores.items() if k not in owned})  # the plain stages'
        self.pieces = nn.ModuleList([p.torch_module(fact.piece_geometry(geometry)) if s else nn.Identity()
                                     for p, s in zip(fact.pieces, fact.stp)])
        self.attrs = [None if s else _torch_attrs(p.conv_attrs(geometry), self.nsp) for p, s in zip(fact.pieces, fact.stp)]
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fact, t = self.fact, self.fact.t
        n_out, n_in = fact.channels
        lifted, split, c = fact.lifted, False, n_in
        if not lifted:
            x = _regroup(x, n_in // t, t)
        for piece, module, s, attrs in zip(fact.pieces, self.pieces, fact.stp, self.attrs):
            if s != split:
                x = _layout(x, c, t, s, lifted)
                split = s
            if s:
                x = module(x)
                c = piece.channels[0] * t
            else:
                w = piece.build(dict(self.cores))
                w = w if lifted else s_major(w, t)
                pad, stride, dilation, group = attrs
                x = _CONV[self.nsp](F.pad(x, pad) if any(pad) else x, w, None, stride, 0, dilation, group)
                c = w.shape[0]
        if split:
            x = _layout(x, c, t, False, lifted)
        if not lifted:
            x = _regroup(x, t, n_out // t)
        return x if self.bias is None else x + self.bias.reshape((-1,) + (1,) * self.nsp)


def _layout(x: torch.Tensor, c: int, t: int, split: bool, lifted: bool) -> torch.Tensor:
    """Between the layouts of plain stages (full channels c) and STP pieces (c / t)."""
    if lifted:
        if split:
            return x.reshape((x.shape[0], c // t, t) + x.shape[2:])
        return x.reshape((x.shape[0], c) + x.shape[3:])
    return x.reshape((-1, c // t if split else c) + x.shape[2:])


def _regroup(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Channels (a, b) -> (b, a): interleaved <-> s-major."""
    spatial = x.shape[2:]
    return x.reshape((x.shape[0], a, b) + spatial).transpose(1, 2).reshape((x.shape[0], a * b) + spatial)
