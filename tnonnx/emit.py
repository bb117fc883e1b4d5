"""Shared building blocks for emitted subgraphs.

A factorised dense layer is a *chain*: the input, reshaped to its in-modes, absorbs one
core at a time (Transpose -> Reshape -> MatMul -> Reshape). The same chain is executed by
three backends so that the ONNX subgraph, the torch module and the numpy reference
compute the same function in the same order:

- `NumpyOps`  reference evaluation (tests, fitting checks),
- `TorchOps`  the torch module of a format (training, distillation),
- `OnnxOps`   ONNX nodes appended to a `Builder`.

Leading axes of the input (batch, sequence, ...) are carried untouched as "batch axes".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ---------------------------------------------------------------------------- chains


@dataclass
class Core:
    """A core tensor with one label per axis; labels shared with the state are contracted."""

    key: str
    labels: tuple[str, ...]


@dataclass
class Chain:
    """How a dense layer x[..., N] -> y[..., M] is evaluated through its cores."""

    in_labels: tuple[str, ...]  # labels of the input's modes, in memory order
    out_labels: tuple[str, ...]  # labels of the output's modes, in memory order
    sizes: dict[str, int]
    steps: list[Core]  # absorption order
    activation: str | None = None  # applied between steps (nonlinear chains)

    @property
    def in_features(self) -> int:
        return math.prod(self.sizes[l] for l in self.in_labels)

    @property
    def out_features(self) -> int:
        return math.prod(self.sizes[l] for l in self.out_labels)

    def macs_per_row(self) -> int:
        """Multiply-adds to push one input row through the chain."""
        labels, total = list(self.in_labels), 0
        for core in self.steps:
            free, contracted, new = split_labels(labels, core.labels)
            total += math.prod(self.sizes[l] for l in free + contracted + new)
            labels = free + new
        return total


def split_labels(state: list[str], core: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    free = [l for l in state if l not in core]
    contracted = [l for l in state if l in core]
    new = [l for l in core if l not in state]
    return free, contracted, new


def run_chain(ops, x, chain: Chain, cores: dict):
    """Evaluate `chain` on x (shape [*batch, N]) with backend `ops`; returns [*batch, M]."""
    sizes = chain.sizes
    labels = list(chain.in_labels)
    phys = [chain.in_features]  # the state's physical tail shape

    def to_shape(t, target):
        nonlocal phys
        if phys != list(target):
            t, phys = ops.reshape(t, target), list(target)
        return t

    state = x
    for i, core in enumerate(chain.steps):
        free, contracted, new = split_labels(labels, core.labels)
        perm = [labels.index(l) for l in free + contracted]
        if perm != list(range(len(labels))):
            state = to_shape(state, [sizes[l] for l in labels])
            state = ops.transpose(state, perm)
            phys = [sizes[l] for l in free + contracted]
        state = to_shape(state, [_prod(sizes, free), _prod(sizes, contracted)])
        state = ops.matmul(state, ops.core_matrix(cores[core.key], core.labels, contracted, new, sizes))
        labels, phys = free + new, [_prod(sizes, free), _prod(sizes, new)]
        if chain.activation and i < len(chain.steps) - 1:
            state = ops.activation(state, chain.activation)
    perm = [labels.index(l) for l in chain.out_labels]
    if perm != list(range(len(labels))):
        state = to_shape(state, [sizes[l] for l in labels])
        state = ops.transpose(state, perm)
        phys = [sizes[l] for l in chain.out_labels]
    return to_shape(state, [chain.out_features])


def core_matrix_np(core: np.ndarray, labels, contracted, new, sizes) -> np.ndarray:
    """A core permuted and reshaped to (contracted, new): the right operand of a MatMul."""
    perm = [labels.index(l) for l in contracted + new]
    return np.transpose(core, perm).reshape(_prod(sizes, contracted), _prod(sizes, new))


def _prod(sizes: dict[str, int], labels) -> int:
    return math.prod(sizes[l] for l in labels)


def best_chain_order(cores: list[Core], in_labels, sizes) -> list[Core]:
    """The absorption order with the fewest MACs among orders that grow a contiguous
    segment of a linear chain of cores (exhaustive: d * 2^(d-1) orders, d is small)."""
    d = len(cores)
    best, best_cost = list(cores), None
    for start in range(d):
        for sides in itertools.product((0, 1), repeat=d - 1):
            lo = hi = start
            order = [cores[start]]
            ok = True
            for s in sides:
                if s == 0 and lo > 0:
                    lo -= 1
                    order.append(cores[lo])
                elif s == 1 and hi < d - 1:
                    hi += 1
                    order.append(cores[hi])
                else:
                    ok = False
                    break
            if not ok:
                continue
            cost = Chain(tuple(in_labels), (), sizes, order).macs_per_row()
            if best_cost is None or cost < best_cost:
                best, best_cost = order, cost
    return best


# ---------------------------------------------------------------------------- backends


class NumpyOps:
    """Reference backend. x carries `batch_rank` leading axes."""

    def __init__(self, batch_rank: int):
        self.batch_rank = batch_rank

    def reshape(self, t, tail):
        return t.reshape(list(t.shape[: self.batch_rank]) + list(tail))

    def transpose(self, t, perm):
        b = self.batch_rank
        return t.transpose(list(range(b)) + [p + b for p in perm])

    def core_matrix(self, core, labels, contracted, new, sizes):
        return core_matrix_np(core, labels, contracted, new, sizes)

    def matmul(self, t, m):
        return t @ m

    def activation(self, t, name):
        return ACTIVATIONS_NUMPY[name](t)


ACTIVATIONS_NUMPY = {
    "relu": lambda t: np.maximum(t, 0),
    "tanh": np.tanh,
    "sigmoid": lambda t: 1 / (1 + np.exp(-t)),
}


class TorchOps(NumpyOps):
    """The same chain on torch tensors (differentiable in the cores)."""

    def transpose(self, t, perm):
        b = self.batch_rank
        return t.permute(list(range(b)) + [p + b for p in perm])

    def core_matrix(self, core, labels, contracted, new, sizes):
        perm = [labels.index(l) for l in contracted + new]
        return core.permute(perm).reshape(_prod(sizes, contracted), _prod(sizes, new))

    def activation(self, t, name):
        import torch

        return getattr(torch, name)(t) if name != "relu" else torch.relu(t)


class OnnxOps:
    """Appends the chain's nodes to a Builder. Batch axes are copied with Reshape's 0."""

    def __init__(self, builder: "Builder", batch_rank: int):
        self.b = builder
        self.batch_rank = batch_rank

    def reshape(self, t, tail):
        shape = [0] * self.batch_rank + [int(v) for v in tail]
        return self.b.op("Reshape", [t, self.b.int64s(shape)], "reshape")

    def transpose(self, t, perm):
        k = self.batch_rank
        return self.b.op("Transpose", [t], "transpose", perm=list(range(k)) + [p + k for p in perm])

    def core_matrix(self, core, labels, contracted, new, sizes):
        # permuted offline: same parameters, already in the layout MatMul wants
        return self.b.weight(core_matrix_np(core, labels, contracted, new, sizes), "core")

    def matmul(self, t, m):
        return self.b.op("MatMul", [t, m], "matmul")

    def activation(self, t, name):
        return self.b.op(ONNX_ACTIVATIONS[name], [t], name)


ONNX_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


# ---------------------------------------------------------------------------- builder


@dataclass
class Builder:
    """Collects the nodes and initializers that replace one layer.

    Nodes are named `<prefix>/<hint>_<i>`. Weights are stored in `store_dtype` (the dtype
    of the constant they replace) and cast to `compute_dtype` when those differ; ONNX
    Runtime folds such casts when the session loads.
    """

    prefix: str
    store_dtype: np.dtype
    compute_dtype: np.dtype
    # layers sharing one weight share its cores: weights are looked up by (share_key, i)
    shared: dict = field(default_factory=dict)
    share_key: str = ""
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _count: int = 0
    _weights: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        out = output or self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(op_type), **attrs))
        return out

    def weight(self, array: np.ndarray, hint: str) -> str:
        """A factor of the layer's weight, stored once per shared weight."""
        key = (self.share_key, self._weights)
        self._weights += 1
        name = self.shared.get(key) if self.share_key else None
        if name is None:
            name = self.constant(array, hint)
            self.shared[key] = name
        return self.cast(name)

    def constant(self, array: np.ndarray, hint: str) -> str:
        """A new initializer in the stored dtype (not shared)."""
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=self.store_dtype), name))
        return name

    def cast(self, name: str) -> str:
        if np.dtype(self.store_dtype) != np.dtype(self.compute_dtype):
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.compute_dtype))
            return self.op("Cast", [name], "cast", to=to)
        return name

    def rename_output(self, output: str) -> None:
        """Make the last node write the replaced node's output tensor."""
        self.nodes[-1].output[0] = output

    def int64s(self, values) -> str:
        name = self.fresh("shape")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name


def emit_chain(builder: Builder, x: str, chain: Chain, cores: dict, batch_rank: int) -> str:
    return run_chain(OnnxOps(builder, batch_rank), x, chain, cores)


def emit_chain_einsum(builder: Builder, x: str, chain: Chain, cores: dict, batch_rank: int) -> str:
    """The same chain as pairwise Einsum nodes (state x core), no Transpose/Reshape between.

    On ONNX Runtime's CPU provider a MatMul chain is usually faster (see ALGORITHMS.md
    section 0); this form exists for runtimes and tools that prefer Einsum."""
    letters = {label: chr(ord("a") + i) for i, label in enumerate(chain.sizes)}
    word = lambda labels: "".join(letters[l] for l in labels)
    ops = OnnxOps(builder, batch_rank)
    state = ops.reshape(x, [chain.sizes[l] for l in chain.in_labels])
    labels = list(chain.in_labels)
    for i, core in enumerate(chain.steps):
        free, _, new = split_labels(labels, core.labels)
        out = free + new
        if i == len(chain.steps) - 1 and sorted(out) == sorted(chain.out_labels):
            out = list(chain.out_labels)
        equation = f"...{word(labels)},{word(core.labels)}->...{word(out)}"
        state = builder.op("Einsum", [state, builder.weight(cores[core.key], "core")], "einsum", equation=equation)
        labels = out
        if chain.activation and i < len(chain.steps) - 1:
            state = ops.activation(state, chain.activation)
    if labels != list(chain.out_labels):
        perm = [labels.index(l) for l in chain.out_labels]
        state = ops.transpose(state, perm)
    return ops.reshape(state, [chain.out_features])


def conv_node(builder: Builder, x: str, weight: np.ndarray, hint: str, *, bias: np.ndarray | None = None,
              attrs: dict | None = None, output: str | None = None) -> str:
    """A Conv with the given weight (an array, or the name of a tensor already built) and
    bias; `attrs` carries strides/pads/dilations/auto_pad."""
    inputs = [x, weight if isinstance(weight, str) else builder.weight(weight, hint)]
    if bias is not None:
        inputs.append(builder.cast(builder.constant(bias, hint + "_bias")))
    return builder.op("Conv", inputs, hint, output=output, **(attrs or {}))
