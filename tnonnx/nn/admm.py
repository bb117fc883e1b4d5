"""ADMM rank-constrained training (Yin et al., CVPR 2021; ALGORITHMS.md section 9).

The network trains in its dense form on loss(W) + rho/2 sum_layers ||W - Z + U||^2 (the
user adds `admm.penalty()` to the loss); `admm.step()`, once per epoch as in the authors'
code, projects Z <- Pi(W + U), Pi being the format's truncation at the given rank rule
(the same fit `tnonnx rewrite` uses, rebuilt to a dense weight), then U <- U + W - Z.
Z starts at Pi(W) and U at zero. Afterwards `admm.factorize()` decomposes the weights,
now close to the rank set, into factorised layers to fine-tune.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..errors import TnonnxError
from ..formats import is_nonlinear
from .convert import candidates, factorize
from .layers import check_format, fit, rank_spec

RHO = 1e-3


class Pull:
    """The ADMM state over named weights: Z (the projection targets) and U (the scaled
    duals). `project(name, tensor)` is the truncation to the rank set; `scales` weights each
    layer's term (1 by default; the ONNX path divides by the layer's initial squared norm)."""

    def __init__(self, weights: dict, project, rho: float, scales: dict | None = None):
        if not rho > 0:
            raise TnonnxError(f"rho={rho}: must be > 0")
        self.rho, self._project = rho, project
        self.scales = scales or {name: 1.0 for name in weights}
        self.Z = {name: project(name, w.detach()) for name, w in weights.items()}
        self.U = {name: torch.zeros_like(z) for name, z in self.Z.items()}

    def penalty_of(self, weights: dict) -> torch.Tensor:
        """rho/2 sum scale ||W - Z + U||^2, differentiable in the weights."""
        terms = [self.scales[n] * ((weights[n] - self.Z[n] + self.U[n]) ** 2).sum() for n in self.Z]
        return self.rho / 2 * torch.stack(terms).sum()

    @torch.no_grad()
    def step_of(self, weights: dict) -> None:
        """Z <- Pi(W + U), U <- U + W - Z."""
        for name in self.Z:
            w = weights[name].detach()
            self.Z[name] = self._project(name, w + self.U[name])
            self.U[name] = self.U[name] + w - self.Z[name]

    @torch.no_grad()
    def distance_of(self, weights: dict) -> dict[str, float]:
        """Per weight, ||W - Pi(W)|| / ||W||: how far each is from its rank set."""
        out = {}
        for name in self.Z:
            w = weights[name].detach()
            out[name] = float((w - self._project(name, w)).norm() / w.norm().clamp_min(1e-30))
        return out


class ADMM(Pull):
    """ADMM(model, format="tt", rank=8 | ratio=10, rho=1e-3, include=, exclude=, min_params=):
    the model's Linear and Conv layers (as `factorize` selects them) pulled towards the
    format's rank set. Format options (modes, order, ...) as for factorize."""

    def __init__(self, model: nn.Module, *, format: str = "tt", rank=None, ratio: float | None = None,
                 rho: float = RHO, include: str | None = None, exclude: str | None = None, min_params: int = 0,
                 **options):
        if is_nonlinear(check_format(format)):
            raise TnonnxError(f"ADMM: {format} has no dense weight to project on; use a linear format")
        self.model, self.format = model, format
        self.spec = rank_spec(rank, ratio)
        self.rank, self.ratio, self.options = rank, ratio, options
        self.selection = dict(include=include, exclude=exclude, min_params=min_params)
        self.layers = dict(candidates(model, **self.selection))
        if not self.layers:
            raise TnonnxError("ADMM: no Linear or Conv layer selected")
        super().__init__(self._weights(), lambda name, w: self.project(w, _groups(self.layers[name])), rho)

    def _weights(self) -> dict:
        return {name: layer.weight for name, layer in self.layers.items()}

    def project(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The format's truncation of a weight in torch's layout ((out, in) or a conv kernel
        of a conv with `groups` groups)."""
        w = weight.detach().double().cpu().numpy()
        if w.ndim == 2:
            dense = fit(self.format, w.T, self.spec, **self.options).to_dense().T
        else:
            dense = fit(self.format, w, self.spec, groups=groups, **self.options).to_dense()
        return torch.as_tensor(np.ascontiguousarray(dense), dtype=weight.dtype, device=weight.device)

    def penalty(self) -> torch.Tensor:
        """rho/2 sum ||W - Z + U||^2, differentiable in the weights."""
        return self.penalty_of(self._weights())

    def step(self) -> None:
        """Z <- Pi(W + U), U <- U + W - Z (call once per epoch)."""
        self.step_of(self._weights())

    def distance(self) -> dict[str, float]:
        """Per layer, ||W - Pi(W)|| / ||W||: how far each weight is from its rank set."""
        return self.distance_of(self._weights())

    def factorize(self, model: nn.Module | None = None) -> nn.Module:
        """A copy of the model with the selected layers factorised from their current weights;
        given `model` (a copy of this one, with other layers already factorised by another
        ADMM's factorize, as when each layer group has its own format or ratio), that model,
        factorised in place."""
        model = copy.deepcopy(self.model) if model is None else model
        return factorize(model, format=self.format, rank=self.rank, ratio=self.ratio, inplace=True,
                         **self.selection, **self.options)


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)
