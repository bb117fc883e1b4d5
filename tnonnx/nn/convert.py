"""factorize(model, ...): the Linear and Conv layers of a torch model replaced by factorised ones."""

from __future__ import annotations

import copy
import re

from torch import nn

from ..errors import TnonnxError
from ..plan import parse_budget
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
              tol: float | None = None, budget=None, include: str | None = None, exclude: str | None = None,
              min_params: int = 0, pretrained: bool = True, inplace: bool = False, seed: int = 0,
              **options) -> nn.Module:
    """The model with its selected Linear/Conv layers factorised: fitted to their trained
    weights (`pretrained`, the rewrite's data-free fit) or drawn from scratch. The input
    model is left as it is unless `inplace`.

    `budget` (a factor such as 10 or "10x", instead of rank=/ratio=/tol=): the selected
    layers' weights together become at most 1/budget as many parameters. With trained
    weights the ranks are allocated across layers as `tnonnx rewrite --budget` allocates
    them data-free (least summed relative squared weight error, ALGORITHMS.md section 10),
    so a layer that compresses well gives up more; from scratch every layer gets
    ratio=budget."""
    if not inplace:
        model = copy.deepcopy(model)
    chosen = candidates(model, include, exclude, min_params)
    if not chosen:
        raise TnonnxError("factorize: no Linear or Conv layer selected")
    ranks = {}
    if budget is not None:
        if any(v is not None for v in (rank, ratio, tol)):
            raise TnonnxError("factorize: budget= takes the place of rank=, ratio= and tol=: give one of them")
        factor = parse_budget(budget)
        if not factor > 1:
            raise TnonnxError(f"factorize: budget={budget}: must be a reduction factor above 1")
        if pretrained:
            ranks = allocate(chosen, format, factor, options)
        else:
            ratio = factor
    for name, layer in chosen:
        if name in ranks:
            rank = ranks[name]
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


def allocate(chosen: list[tuple[str, nn.Module]], format: str, budget: float, options: dict) -> dict[str, int]:
    """Rank cap per layer name: the format's fit at each cap of the planner's ladder, then
    choose.choose under the parameter limit (the selected weights' total / budget)."""
    from ..choose import Option, Unreachable, choose
    from ..formats import RankSpec
    from ..plan import RANK_LADDER
    from .layers import fit

    trials, total = {}, 0
    for name, layer in chosen:
        weight = layer.weight.detach().double().cpu().numpy()
        conv = isinstance(layer, _CONVS)
        if not conv:
            weight = weight.T  # y = x W, as the rewrite sees a MatMul
        total += weight.size
        found = []
        for cap in RANK_LADDER:
            fact = fit(format, weight, RankSpec(rank=cap), groups=layer.groups if conv else 1, **options)
            if found and fact.params() >= weight.size:
                break  # larger caps only add parameters (the first is kept, so that every layer has one)
            found.append(Option(format, RankSpec(rank=cap), fact.params(), fact.relative_error(weight) ** 2))
        trials[name] = found
    try:
        choice = choose(trials, max_params=total / budget)
    except Unreachable as exc:
        raise TnonnxError(f"factorize: budget={budget:g}x: {exc}") from None
    return {name: option.spec.rank for name, option in choice.items()}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
