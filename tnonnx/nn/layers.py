"""FactorizedLinear and FactorizedConv: trainable layers of every format, in the conventions
of tensorly-torch.

A layer holds a Factorization (tnonnx/formats) as its structure and the format's own torch
module (fact.torch_module()) as its computation, the cores being that module's parameters:
what it computes is what `tnonnx rewrite` emits for the same cores (tests check it). Built
from scratch, the structure (modes, ranks) comes from the rewrite's fitting code applied to
a seeded Gaussian weight of the layer's shape, so that rank, ratio, modes and order mean
what they mean on the command line; the cores are then redrawn (LeCun scale, below).
`from_linear` / `from_conv` fit a trained layer's weight with the same code.

Initialisation from scratch: every core Gaussian, all scaled by one common factor such that
the layer's output keeps the variance of a unit-variance input (the dense weight's entries
have variance 1/fan_in, LeCun's rule, for the linear formats; the measured output variance
on a seeded Gaussian probe for the nonlinear ones). A layer is multilinear in its cores, so
one factor c scales it by c^K (K cores); the rule is applied a few times for the formats
where that holds only approximately (tanh between the cores).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..errors import TnonnxError
from ..formats import FORMATS, ConvGeometry, RankSpec
from ..formats.base import GroupedConvFactorization

INIT_ROUNDS = 6
PROBE_ROWS = 256


def rank_spec(rank=None, ratio=None, tol=None, *, scratch: bool = False) -> RankSpec:
    given = [v is not None for v in (rank, ratio, tol)]
    if sum(given) != 1:
        raise TnonnxError("give exactly one of rank=, ratio=, tol=")
    if scratch and (tol is not None or rank == "vbmf"):
        raise TnonnxError("tol= and rank='vbmf' need a trained weight: use from_linear/from_conv")
    if ratio is not None and not ratio > 0:
        raise TnonnxError(f"ratio={ratio}: must be > 0")
    return RankSpec(rank=rank, tol=tol, ratio=ratio)


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise TnonnxError(f"format '{format}': choose from {', '.join(FORMATS)}")
    return format


def fit(format: str, weight: np.ndarray, spec: RankSpec, *, groups: int = 1, modes=None, order=None,
        fitted: bool = True, **options):
    from ..plan import fit_weight

    return fit_weight(check_format(format), np.asarray(weight, dtype=np.float64), spec, groups=groups,
                      modes=modes, order=order, options=options, fitted=fitted)


def cores_of(module: nn.Module) -> dict:
    """The cores of a format's torch module by key: those of every submodule holding some
    (StagedConv, ChainLinear, the pieces of an STP conv); a GroupedConv's as the grouped
    factorisation names them (g<i>.<key>)."""
    if isinstance(getattr(module, "groups", None), nn.ModuleList):
        return {f"g{i}.{k}": v for i, g in enumerate(module.groups) for k, v in cores_of(g).items()}
    return {k: v for m in module.modules() if isinstance(getattr(m, "cores", None), nn.ParameterDict)
            for k, v in m.cores.items()}


def with_cores(fact, cores: dict):
    """`fact` with its cores (and those of its groups or pieces) replaced."""
    if isinstance(fact, GroupedConvFactorization):
        groups = [with_cores(g, {k.split(".", 1)[1]: v for k, v in cores.items() if k.startswith(f"g{i}.")})
                  for i, g in enumerate(fact.groups)]
        return replace(fact, groups=groups)
    changes = {"cores": {k: cores[k] for k in fact.cores}}
    if hasattr(fact, "pieces"):
        changes["pieces"] = [with_cores(p, cores) if hasattr(p, "cores") else p for p in fact.pieces]
    return replace(fact, **changes)


def _own_init(fact, rng: np.random.Generator, rms: float) -> dict | None:
    if isinstance(fact, GroupedConvFactorization):
        parts = [_own_init(g, rng, rms) for g in fact.groups]
        return None if parts[0] is None else {f"g{i}.{k}": v for i, p in enumerate(parts) for k, v in p.items()}
    return fact.init_cores(rng, rms) if hasattr(fact, "init_cores") else None


class _Factorized(nn.Module):
    """What the linear and conv layers share: the structure, the cores, the bias."""

    def _setup(self, fact, module: nn.Module, bias: np.ndarray | torch.Tensor | None, out: int, use_bias: bool):
        self.format = fact.format
        self.ranks = tuple(fact.ranks)
        self._fact = fact  # structure; its cores are kept as fitted, `factorization()` has the trained ones
        self.layer = module
        if use_bias:
            b = torch.zeros(out) if bias is None else torch.as_tensor(bias, dtype=torch.float32).detach().clone()
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    def factorization(self):
        """The Factorization with the current (trained) cores, as `tnonnx rewrite` would emit it."""
        return with_cores(self._fact, {k: v.detach().double().cpu().numpy() for k, v in cores_of(self.layer).items()})

    def core_params(self) -> int:
        return sum(p.numel() for p in cores_of(self.layer).values())

    def _init_cores(self, fan_in: int, probe: torch.Tensor, generator: torch.Generator) -> None:
        cores = list(cores_of(self.layer).values())
        own = _own_init(self._fact, np.random.default_rng(generator.initial_seed()), 1 / math.sqrt(fan_in))
        if own is not None:  # a format with an initialisation of its own (adtn)
            with torch.no_grad():
                for k, p in cores_of(self.layer).items():
                    p.copy_(torch.as_tensor(own[k]))
            return
        with torch.no_grad():
            for p in cores:
                p.copy_(torch.randn(p.shape, generator=generator))
            linear = self._fact.linear
            for _ in range(INIT_ROUNDS):
                if linear:
                    std, want = float(torch.as_tensor(self.factorization().to_dense()).std()), 1 / math.sqrt(fan_in)
                else:
                    std, want = float(self.layer(probe).std()), 1.0
                if not math.isfinite(std) or std == 0:
                    break
                c = (want / std) ** (1 / len(cores))
                for p in cores:
                    p.mul_(c)
                if linear and abs(std / want - 1) < 1e-3:
                    break

    def extra_repr(self) -> str:
        return f"format={self.format}, ranks={self.ranks}, params={self.core_params()}"


class FactorizedLinear(_Factorized):
    """y = x A^T + b with A in a factorised format (torch.nn.Linear's convention).

    FactorizedLinear(in_features, out_features, format="tt", rank=8) or ratio=10; format
    options as on the command line (modes=((4, 4), (8, 2)), order=3, act="tanh" for ntt/ntr,
    depth for adtn)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, format: str = "tt",
                 rank=None, ratio: float | None = None, modes=None, order: int | None = None, seed: int = 0,
                 _fact=None, _bias=None, **options):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        scratch = _fact is None
        if scratch:
            spec = rank_spec(options.get("depth", rank) if ratio is None else rank, ratio, scratch=True)
            gaussian = np.random.default_rng(seed).standard_normal((in_features, out_features))
            _fact = fit(format, gaussian, spec, modes=modes, order=order, fitted=False, **options)
        self._setup(_fact, _fact.torch_module(), _bias, out_features, bias)
        if scratch:
            g = torch.Generator().manual_seed(seed)
            self._init_cores(in_features, torch.randn(PROBE_ROWS, in_features, generator=g), g)

    @classmethod
    def from_linear(cls, layer: nn.Linear, *, format: str = "tt", rank=None, ratio: float | None = None,
                    tol: float | None = None, modes=None, order: int | None = None, **options) -> "FactorizedLinear":
        """The trained layer's weight fitted by `tnonnx rewrite`'s code (data-free)."""
        spec = rank_spec(rank, ratio, tol)
        weight = layer.weight.detach().double().cpu().numpy().T  # y = x W
        fact = fit(format, weight, spec, modes=modes, order=order, **options)
        bias = None if layer.bias is None else layer.bias.detach()
        return cls(layer.in_features, layer.out_features, layer.bias is not None, format=format, _fact=fact,
                   _bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y if self.bias is None else y + self.bias


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def onnx_conv_attrs(kernel, stride, padding, dilation) -> dict:
    """torch Conv arguments as the ONNX Conv attributes tnonnx's formats take."""
    n = len(kernel)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    if padding == "valid":
        pads = [0] * 2 * n
    elif padding == "same":  # torch pads the extra one at the end
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _tuple(padding, n)
        pads = list(p) + list(p)
    return {"strides": list(stride), "pads": pads, "dilations": list(dilation)}


class FactorizedConv(_Factorized):
    """A factorised Conv1d/2d/3d (the dimension from a kernel_size tuple; for an int
    kernel_size `dim`, default 2): FactorizedConv(in_channels, out_channels, kernel_size, stride=, padding=,
    dilation=, groups=, bias=, format=, rank=/ratio=, ...). Zero padding only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, dim: int | None = None, format: str = "tt", rank=None,
                 ratio: float | None = None, seed: int = 0, _fact=None, _bias=None, **options):
        super().__init__()
        if isinstance(kernel_size, (tuple, list)):
            dim = len(kernel_size)
        elif dim is None:
            dim = 2
        if dim not in (1, 2, 3):
            raise TnonnxError("FactorizedConv: give a kernel_size tuple of 1 to 3 sizes, or dim=1, 2 or 3")
        kernel = _tuple(kernel_size, dim)
        if in_channels % groups or out_channels % groups:
            raise TnonnxError(f"groups={groups}: must divide in_channels and out_channels")
        self.in_channels, self.out_channels, self.kernel_size, self.groups = in_channels, out_channels, kernel, groups
        self.stride, self.padding, self.dilation = _tuple(stride, dim), padding, _tuple(dilation, dim)
        self.geometry = ConvGeometry(kernel, onnx_conv_attrs(kernel, stride, padding, dilation))
        scratch = _fact is None
        if scratch:
            spec = rank_spec(options.get("depth", rank) if ratio is None else rank, ratio, scratch=True)
            shape = (out_channels, in_channels // groups) + kernel
            gaussian = np.random.default_rng(seed).standard_normal(shape)
            _fact = fit(format, gaussian, spec, groups=groups, fitted=False, **options)
        self._setup(_fact, _fact.torch_module(self.geometry, None), _bias, out_channels, bias)
        if scratch:
            g = torch.Generator().manual_seed(seed)
            size = [max(8, d * (k - 1) + 1) for d, k in zip(self.dilation, kernel)]
            probe = torch.randn([8, in_channels] + size, generator=g)
            self._init_cores(in_channels // groups * math.prod(kernel), probe, g)

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, *, format: str = "tt", rank=None, ratio: float | None = None,
                  tol: float | None = None, **options) -> "FactorizedConv":
        """The trained conv's kernel fitted by `tnonnx rewrite`'s code (data-free)."""
        if conv.padding_mode != "zeros" or getattr(conv, "transposed", False):
            raise TnonnxError(f"from_conv: {type(conv).__name__} with padding_mode={conv.padding_mode!r} "
                              "or transposed is not supported")
        spec = rank_spec(rank, ratio, tol)
        fact = fit(format, conv.weight.detach().double().cpu().numpy(), spec, groups=conv.groups, **options)
        bias = None if conv.bias is None else conv.bias.detach()
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, conv.bias is not None, format=format, _fact=fact, _bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if self.bias is None:
            return y
        return y + self.bias.reshape((-1,) + (1,) * len(self.kernel_size))
