"""ADTN: a weight decoded by a deep tensor network (Qing et al. 2023, ALGORITHMS.md section 8).

The weight (N entries, padded to 2^Q) is the first N entries of a Q-index state: starting
from the product state [1,0] (x) ... (x) [1,0], `depth` layers each apply a brick wall of
Q-1 small 2x2x2x2 tensors (a 4 x 4 matrix on a pair of neighbouring indices: the pairs
(0,1), (2,3), ... then (1,2), (3,4), ...), with an activation on the state between layers;
a scalar scale multiplies the result. Parameters: 16 depth (Q-1) + 1.

Choices where the paper's details are not confirmed here (tested, documented):
- the activation is tanh (option act), applied elementwise to the whole state;
- initialisation: Gaussian entries of standard deviation 1/2 (a gate then keeps a
  state's expected squared norm) except in the first layer, where it is
  2^(Q / (2 (Q-1))) / 2 so that the state's entries reach RMS 1 (the product state has
  norm 1 over 2^Q entries) and the activations act in their nonlinear range; the scale
  sets the weight's RMS (1/sqrt(fan_in) from scratch, the target's when fitting);
- the rank rule: rank=D is the depth, ratio=R the largest depth with at most N/R
  parameters (at least 1); tol is refused (the decode has no truncation to bound);
- the index layout: by default the flat weight (row-major) is the first N of the 2^Q
  entries, so for a 784-row weight read from a flattened 28 x 28 image each binary
  digit of the row index mixes image rows and columns. Given modes (--modes 28x28,16x16:
  the in- and out-features as products, as TT takes them), each mode is padded to a power
  of two on its own and gets its own binary digits: the state is decoded as a
  32 x 32 x 16 x 16 tensor and the padding sliced off. FC-2 trained from scratch on MNIST
  digits with its hidden layer in ADTN at 105x (act=relu, 40 epochs): 90.1% with these
  modes against 86.8% flat (dense 94.6%; docs/RESULTS.md). The parameter count follows
  Q, which padding per mode can raise by a digit or so. interleave=1 (with modes) orders
  the modes as TT pairs them, in1 out1 in2 out2 ..., and transposes the decoded tensor
  back to the weight's order, so that the gates next to an input mode's digits act on the
  output mode it is paired with (the FC-2 case: 92.0% at 40 epochs, 93.8% at 150, against
  a dense 94.6%; 93.9% with distillation from the dense network, which also steadies the
  seeds: within 1 point on three of three, against two of three on the labels alone);
- fitting to a trained weight (`tnonnx rewrite --format adtn`): Adam on the relative
  squared weight error, ITERATIONS steps, best iterate kept. Data-aware fitting is not
  implemented: calibration data is not used by this format.

The emitted ONNX decodes the weight in the graph from the gates (a one-hot start made by
Pad from an integer constant, then Reshape/MatMul per gate): the graph's inputs are only
initializers, which ONNX Runtime folds into the dense weight when the session is created.
The saving is on disk and in download size, not in run-time memory or MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..emit import ACTIVATIONS, Builder, NumpyOps, conv_node, onnx_activation
from ..errors import NotApplicable, TnonnxError
from .base import ConvGeometry, Factorization, RankSpec, conv_output_size

NAME = "adtn"
STRUCTURED = True  # represents only weights its generator reaches: not exact at full rank
DATA_FREE = True  # fitted to the weight only: calibration data does not refine it
ITERATIONS = 400
LEARNING_RATE = 0.02
MAX_QUBITS = 26  # 64M entries: the decode state must fit in memory


def qubits(size: int) -> int:
    return max(2, math.ceil(math.log2(max(size, 2))))


def pairs(q: int) -> list[int]:
    """The left index of each gate of one brick-wall layer."""
    return list(range(0, q - 1, 2)) + list(range(1, q - 1, 2))


def param_count(depth: int, q: int) -> int:
    return 16 * depth * (q - 1) + 1


def depth_for(spec: RankSpec, size: int, q: int, depth: int | None) -> int:
    if depth is not None:
        d = int(depth)
    elif spec.tol is not None or spec.rank == "vbmf":
        raise NotApplicable("adtn: no tolerance or vbmf rank rule (give rank=depth, ratio or depth)")
    elif spec.ratio is not None:
        d = int((size / spec.ratio - 1) // (16 * (q - 1)))
    else:
        d = int(spec.rank if spec.rank is not None else 2)
    return max(1, min(d, 64))


def _activate(t, act: str):
    if isinstance(t, np.ndarray):
        return NumpyOps(batch_rank=0).activation(t, act)
    from ..emit import TorchOps

    return TorchOps(batch_rank=0).activation(t, act)


def _torch_einsum(*args):
    import torch

    return torch.einsum(*args)


def padded(layout: tuple[int, ...]) -> tuple[int, ...]:
    """Each mode of a layout padded to a power of two."""
    return tuple(1 << max(0, math.ceil(math.log2(m))) for m in layout)


def layout_qubits(layout: tuple[int, ...]) -> int:
    return max(2, sum(p.bit_length() - 1 for p in padded(layout)))


def decode(cores: dict, shape: tuple[int, ...], depth: int, q: int, act: str, layout: tuple[int, ...] = (),
           perm: tuple[int, ...] = ()):
    """The weight (numpy or torch, as the cores are); `layout`: the modes, each on digits of
    its own (module docstring), or () for the flat weight; `perm`: the transpose that takes
    the decoded modes to the weight's order (interleaved modes), or () for none."""
    # the first gate on the product state |0...0> is its first column (x) |0...0>: the
    # state is built from it, so that a traced export holds no 2^Q constant
    column = cores["L0G0"].reshape(4, 4)[:, :1]
    if isinstance(column, np.ndarray):
        state = np.pad(column, ((0, 0), (0, 2 ** (q - 2) - 1))).reshape(-1)
    else:
        import torch

        state = torch.nn.functional.pad(column, (0, 2 ** (q - 2) - 1)).reshape(-1)
    numpy = isinstance(state, np.ndarray)
    for layer in range(depth):
        for g, p in enumerate(pairs(q)):
            if layer or g:
                gate, view = cores[f"L{layer}G{g}"].reshape(4, 4), state.reshape(2**p, 4, -1)
                # torch: einsum is one GEMM over the pair's axis, about 3x faster than a batched
                # matmul of 2^p tiny products (and its backward)
                state = (gate @ view if numpy else _torch_einsum("ij,ajb->aib", gate, view)).reshape(-1)
        if layer < depth - 1:
            state = _activate(state, act)
    if layout:
        pads = padded(layout)
        state = state[: math.prod(pads)].reshape(pads)[tuple(slice(0, m) for m in layout)]
        if perm:
            state = state.transpose(perm) if isinstance(state, np.ndarray) else state.permute(perm)
        return cores["scale"].reshape(()) * state.reshape(tuple(shape))
    return cores["scale"].reshape(()) * state[: math.prod(shape)].reshape(tuple(shape))


def initial_cores(rng: np.random.Generator, depth: int, q: int, rms: float, act: str) -> dict[str, np.ndarray]:
    """Gates as the module docstring says, the scale giving the decoded weight RMS `rms`."""
    first = 2 ** (q / (2 * (q - 1))) / 2
    cores = {f"L{layer}G{g}": rng.standard_normal((2, 2, 2, 2)) * (first if layer == 0 else 0.5)
             for layer in range(depth) for g in range(q - 1)}
    cores["scale"] = np.ones(1)
    size = 2**q
    raw = decode(cores, (size,), depth, q, act)
    cores["scale"] = np.array([rms / max(float(np.sqrt(np.mean(raw**2))), 1e-30)])
    return cores


@dataclass
class ADTNFactorization(Factorization):
    """A dense weight (N x M, y = x W) or a conv kernel (T x S x k...) decoded by the network."""

    format: str
    cores: dict[str, np.ndarray]
    ranks: tuple[int, ...]  # (depth,)
    shape: tuple[int, ...]
    act: str = "tanh"
    kernel: tuple[int, ...] = ()
    layout: tuple[int, ...] = ()  # the modes, each padded on its own (module docstring); (): flat
    perm: tuple[int, ...] = ()  # decoded modes -> the weight's order (interleaved modes); (): none

    @property
    def depth(self) -> int:
        return self.ranks[0]

    @property
    def qubits(self) -> int:
        return layout_qubits(self.layout) if self.layout else qubits(math.prod(self.shape))

    @property
    def channels(self) -> tuple[int, int]:
        return (self.shape[0], self.shape[1])

    def to_dense(self) -> np.ndarray:
        return decode(self.cores, self.shape, self.depth, self.qubits, self.act, self.layout, self.perm)

    def init_cores(self, rng: np.random.Generator, rms: float) -> dict[str, np.ndarray]:
        return initial_cores(rng, self.depth, self.qubits, rms, self.act)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.to_dense()

    def macs(self, rows_or_geometry) -> int:
        """Those of the dense layer: the decoded weight is folded at load."""
        if isinstance(rows_or_geometry, ConvGeometry):
            g = rows_or_geometry
            out = conv_output_size(tuple(g.in_spatial), self.kernel, g.spatial_attrs())
            return math.prod(out) * math.prod(self.shape)
        return rows_or_geometry * math.prod(self.shape)

    def emit_weight(self, builder: Builder) -> str:
        q = self.qubits
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(builder.compute_dtype))
        one = builder.op("Cast", [builder.int64s([1])], "adtn_start", to=to)  # no float initializer
        state = builder.op("Pad", [one, builder.int64s([0, 2**q - 1])], "adtn_start")
        for layer in range(self.depth):
            for g, p in enumerate(pairs(q)):
                gate = builder.weight(self.cores[f"L{layer}G{g}"].reshape(4, 4), "gate")
                state = builder.op("Reshape", [state, builder.int64s([2**p, 4, -1])], "adtn")
                state = builder.op("MatMul", [gate, state], "adtn")
            state = builder.op("Reshape", [state, builder.int64s([-1])], "adtn")
            if layer < self.depth - 1:
                state = onnx_activation(builder, state, self.act)
        if self.layout:
            pads = padded(self.layout)
            if 2**q > math.prod(pads):
                state = builder.op("Slice", [state, builder.int64s([0]), builder.int64s([math.prod(pads)]),
                                             builder.int64s([0])], "adtn")
            state = builder.op("Reshape", [state, builder.int64s(list(pads))], "adtn")
            axes = list(range(len(pads)))
            state = builder.op("Slice", [state, builder.int64s([0] * len(axes)), builder.int64s(list(self.layout)),
                                         builder.int64s(axes)], "adtn")
            if self.perm:
                state = builder.op("Transpose", [state], "adtn", perm=list(self.perm))
        else:
            n = math.prod(self.shape)
            state = builder.op("Slice", [state, builder.int64s([0]), builder.int64s([n]), builder.int64s([0])], "adtn")
        state = builder.op("Reshape", [state, builder.int64s(list(self.shape))], "adtn")
        return builder.op("Mul", [state, builder.weight(self.cores["scale"].reshape(()), "scale")], "adtn")

    def emit(self, builder: Builder, x: str, *args, **kwargs) -> str:
        """Dense: emit(builder, x, batch_rank); conv: emit(builder, x, geometry, bias, output)."""
        weight = self.emit_weight(builder)
        if len(self.shape) == 2:
            return builder.op("MatMul", [x, weight], "matmul")
        geometry, bias, output = args
        return conv_node(builder, x, weight, "conv", bias=bias, attrs=geometry.spatial_attrs(), output=output)

    emit_einsum = emit_features_first = emit_custom = emit  # one decode, one MatMul

    def torch_module(self, geometry: ConvGeometry | None = None, bias: np.ndarray | None = None):
        from .adtn_torch import DecodedConv, DecodedLinear

        return DecodedLinear(self) if len(self.shape) == 2 else DecodedConv(self, geometry, bias)


def layout_of(shape: tuple[int, ...], modes, interleave: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The modes of a dense weight (N x M) as (layout, perm), checked against its shape:
    in-modes then out-modes, or in1 out1 in2 out2 ... with the transpose back; ((), ()) for none."""
    if modes is None:
        if interleave:
            raise TnonnxError("adtn: interleave needs modes (--modes IN,OUT)")
        return (), ()
    ins, outs = (tuple(int(m) for m in side) for side in modes)
    if len(shape) != 2 or math.prod(ins) != shape[0] or math.prod(outs) != shape[1]:
        raise TnonnxError(f"adtn: modes {'x'.join(map(str, ins))},{'x'.join(map(str, outs))} do not multiply to "
                          f"the weight's {' x '.join(map(str, shape))}")
    if not interleave:
        return ins + outs, ()
    if len(ins) != len(outs):
        raise TnonnxError("adtn: interleave needs as many in-modes as out-modes")
    layout = tuple(m for pair in zip(ins, outs) for m in pair)
    k = len(ins)
    return layout, tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2))


def _fit(shape, weight: np.ndarray | None, spec: RankSpec, *, depth, act: str, iters: int, seed: int,
         kernel=(), layout: tuple[int, ...] = (), perm: tuple[int, ...] = ()) -> ADTNFactorization:
    if act not in ACTIVATIONS:
        raise TnonnxError(f"act '{act}': choose from {', '.join(ACTIVATIONS)}")
    size = math.prod(shape)
    q = layout_qubits(layout) if layout else qubits(size)
    if q > MAX_QUBITS:
        raise NotApplicable(f"adtn: {size} weights need 2^{q} decode states (at most 2^{MAX_QUBITS})")
    d = depth_for(spec, size, q, depth)
    rng = np.random.default_rng(seed)
    rms = float(np.sqrt(np.mean(weight**2))) if weight is not None else 1.0
    fact = ADTNFactorization(NAME, initial_cores(rng, d, q, rms, act), (d,), tuple(shape), act, tuple(kernel),
                             tuple(layout), tuple(perm))
    if weight is not None and iters > 0:
        from .adtn_torch import fit_cores

        fact.cores = fit_cores(fact, weight, iters)
    return fact


def fit_dense(weight: np.ndarray, spec: RankSpec, *, depth: int | None = None, act: str = "tanh",
              iters: int = ITERATIONS, seed: int = 0, modes=None, interleave: bool = False,
              **_) -> ADTNFactorization:
    layout, perm = layout_of(weight.shape, modes, bool(interleave))
    return _fit(weight.shape, np.asarray(weight, dtype=np.float64), spec, depth=depth, act=act, iters=iters,
                seed=seed, layout=layout, perm=perm)


def fit_conv(kernel: np.ndarray, spec: RankSpec, *, depth: int | None = None, act: str = "tanh",
             iters: int = ITERATIONS, seed: int = 0, **_) -> ADTNFactorization:
    return _fit(kernel.shape, np.asarray(kernel, dtype=np.float64), spec, depth=depth, act=act, iters=iters,
                seed=seed, kernel=kernel.shape[2:])


def start(weight: np.ndarray, spec: RankSpec, *, depth: int | None = None, act: str = "tanh", seed: int = 0,
          modes=None, interleave: bool = False, **_) -> ADTNFactorization:
    """The structure without fitting (tnonnx.nn trains it from scratch)."""
    layout, perm = layout_of(weight.shape, modes, bool(interleave)) if weight.ndim == 2 else ((), ())
    return _fit(weight.shape, None, spec, depth=depth, act=act, iters=0, seed=seed,
                kernel=weight.shape[2:] if weight.ndim > 2 else (), layout=layout, perm=perm)
