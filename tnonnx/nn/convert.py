"""factorize(model, ...): the Linear and Conv layers of a torch model replaced by factorised ones."""

from __future__ import annotations

import copy
import re

from torch import nn

from ..errors import TnonnxError
from .layers import FactorizedConv, FactorizedLinear

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def candidates(model: nn.Module, include: str | None = None, exclude: str | None = None,
               min_params: int = 0) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the Linear and zero-padded Conv layers selected by the
    regexes (matched with re.search on the qualified name, as --include/--exclude on node names)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, _CONVS):
            if module.padding_mode != "zeros":
                continue
        elif not isinstance(module, nn.Linear):
            continue
        if include is not None and not re.search(include, name):
            continue
        if exclude is not None and re.search(exclude, name):
            continue
        if module.weight.numel() < min_params:
            continue
        out.append((name, module))
    return out


def factorize(model: nn.Module, *, format: str = "tt", rank=None, ratio: float | None = None,
              tol: float | None = None, include: str | None = None, exclude: str | None = None,
              min_params: int = 0, pretrained: bool = True, inplace: bool = False, seed: int = 0,
              **options) -> nn.Module:
    """The model with its selected Linear/Conv layers factorised: fitted to their trained
    weights (`pretrained`, the rewrite's data-free fit) or drawn from scratch. The input
    model is left as it is unless `inplace`."""
    if not inplace:
        model = copy.deepcopy(model)
    chosen = candidates(model, include, exclude, min_params)
    if not chosen:
        raise TnonnxError("factorize: no Linear or Conv layer selected")
    for name, layer in chosen:
        if pretrained:
            new = (FactorizedConv.from_conv(layer, format=format, rank=rank, ratio=ratio, tol=tol, **options)
                   if isinstance(layer, _CONVS) else
                   FactorizedLinear.from_linear(layer, format=format, rank=rank, ratio=ratio, tol=tol, **options))
        elif tol is not None:
            raise TnonnxError("factorize: tol= needs pretrained=True")
        elif isinstance(layer, _CONVS):
            new = FactorizedConv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                 layer.padding, layer.dilation, layer.groups, layer.bias is not None, format=format,
                                 rank=rank, ratio=ratio, seed=seed, **options)
        else:
            new = FactorizedLinear(layer.in_features, layer.out_features, layer.bias is not None, format=format,
                                   rank=rank, ratio=ratio, seed=seed, **options)
        set_submodule(model, name, new.to(layer.weight.device))
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
