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

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ---------------------------------------------------------------------------- chains


@dataclass
class Core:
    """A core tensor with one label per axis. Absorbing it into the state contracts the
    labels they share, except labels still needed later (a label held by three or more
    tensors, like CP's rank, stays open until its last holder: a batched MatMul)."""

    key: str
    labels: tuple[str, ...]


@dataclass
class Chain:
    """How a dense layer x[..., N] -> y[..., M] is evaluated through a network of cores:
    the input, reshaped to its in-modes, absorbs one core per step, in `steps` order."""

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

    def plan(self):
        """(keep, free, contracted, new) label lists for every step."""
        labels, out = list(self.in_labels), []
        for i, core in enumerate(self.steps):
            later = set(self.out_labels).union(*(c.labels for c in self.steps[i + 1:]))
            keep, free, contracted, new = split_labels(labels, core.labels, later)
            out.append((keep, free, contracted, new))
            labels = keep + free + new
        return out

    def macs_per_row(self) -> int:
        """Multiply-adds to push one input row through the network."""
        return sum(math.prod(self.sizes[l] for l in k + f + c + n) for k, f, c, n in self.plan())


def split_labels(state: list[str], core: tuple[str, ...], later: set[str]):
    """keep: shared and still needed later; contracted: shared and done; free: the state's
    other labels; new: the core's other labels."""
    keep = [l for l in state if l in core and l in later]
    contracted = [l for l in state if l in core and l not in later]
    free = [l for l in state if l not in core]
    new = [l for l in core if l not in state]
    return keep, free, contracted, new


def run_chain(ops, x, chain: Chain, cores: dict):
    """Evaluate `chain` on x (shape [*batch, N]) with backend `ops`; returns [*batch, M].

    Each step is Transpose -> Reshape -> MatMul with the core laid out as (C, N), or, when
    labels are kept open, a batched MatMul (K, F, C) @ (K, C, N)."""
    sizes = chain.sizes
    labels = list(chain.in_labels)
    phys = [chain.in_features]  # the state's physical tail shape

    def to_shape(t, target):
        nonlocal phys
        if phys != list(target):
            t, phys = ops.reshape(t, target), list(target)
        return t

    def permute(t, order):
        nonlocal phys
        groups, perm = merged_axes(labels, order)
        if perm == list(range(len(perm))):
            return t
        limit = getattr(ops, "max_axes", None)
        if limit is None or len(groups) <= limit:
            t = to_shape(t, [_prod(sizes, g) for g in groups])
            t = ops.transpose(t, perm)
            phys = [_prod(sizes, groups[p]) for p in perm]
            return t
        # too many axes for one Transpose: move the target's groups to the end one by one,
        # each move a Transpose of at most 3 axes ([X, g, Y] -> [X, Y, g])
        current = list(groups)
        for g in (groups[p] for p in perm):
            i = current.index(g)
            if i == len(current) - 1:
                continue
            x, y = current[:i], current[i + 1:]
            dims = ([_prod(sizes, sum(x, []))] if x else []) + [_prod(sizes, g), _prod(sizes, sum(y, []))]
            t = to_shape(t, dims)
            t = ops.transpose(t, [0, 2, 1] if x else [1, 0])
            phys = [dims[0], dims[2], dims[1]] if x else [dims[1], dims[0]]
            current = x + y + [g]
        return t

    state = x
    for i, (core, (keep, free, contracted, new)) in enumerate(zip(chain.steps, chain.plan())):
        state = permute(state, keep + free + contracted)
        lead = [_prod(sizes, keep)] if keep else []
        state = to_shape(state, lead + [_prod(sizes, free), _prod(sizes, contracted)])
        state = ops.matmul(state, ops.core_matrix(cores[core.key], core.labels, keep, contracted, new, sizes))
        labels, phys = keep + free + new, lead + [_prod(sizes, free), _prod(sizes, new)]
        if chain.activation and i < len(chain.steps) - 1:
            state = ops.activation(state, chain.activation)
    state = permute(state, list(chain.out_labels))
    return to_shape(state, [chain.out_features])


def merged_axes(labels: list[str], order: list[str]) -> tuple[list[list[str]], list[int]]:
    """The permutation taking `labels` to `order` on as few axes as possible: runs of labels
    adjacent in both move as one axis. Returns the groups in `labels` order and the
    permutation of the groups (fewer, larger axes for Transpose: the edge target's rank limit)."""
    runs: list[list[str]] = []
    for l in order:
        if runs and labels.index(l) == labels.index(runs[-1][-1]) + 1:
            runs[-1].append(l)
        else:
            runs.append([l])
    groups = sorted(runs, key=lambda g: labels.index(g[0]))
    return groups, [groups.index(g) for g in runs]


def core_matrix_np(core: np.ndarray, labels, keep, contracted, new, sizes) -> np.ndarray:
    """A core permuted and reshaped to ([K,] C, N): the right operand of a MatMul."""
    perm = [labels.index(l) for l in keep + contracted + new]
    lead = [_prod(sizes, keep)] if keep else []
    return np.transpose(core, perm).reshape(lead + [_prod(sizes, contracted), _prod(sizes, new)])


def core_left_np(core: np.ndarray, labels, keep, contracted, new, sizes, lead: bool = False) -> np.ndarray:
    """A core permuted and reshaped to ([K, [1,]] N, C): the left operand of a MatMul
    (features-first layout, emit_layout.py); the 1 broadcasts over the state's lead axis."""
    perm = [labels.index(l) for l in keep + new + contracted]
    k = [_prod(sizes, keep)] + [1] * lead if keep else []
    return np.transpose(core, perm).reshape(k + [_prod(sizes, new), _prod(sizes, contracted)])


def _prod(sizes: dict[str, int], labels) -> int:
    return math.prod(sizes[l] for l in labels)


def best_order(cores: list[Core], in_labels, out_labels, sizes: dict[str, int]) -> list[Core]:
    """The absorption order with the fewest MACs: exact dynamic programming over subsets
    of absorbed cores (a label is open while some but not all of its holders are absorbed),
    greedy beyond 14 cores. The cost of every order scales with the rows, so the best
    order does not depend on the batch size."""
    n = len(cores)
    holders = {}
    for i, core in enumerate(cores):
        for l in core.labels:
            holders.setdefault(l, set()).add(i)
    ins, outs = set(in_labels), set(out_labels)

    def open_labels(absorbed: frozenset) -> set[str]:
        return {l for l, h in holders.items()
                if (l in ins or h & absorbed) and (l in outs or not h <= absorbed)} | (ins - set(holders))

    def step_cost(absorbed: frozenset, i: int) -> int:
        return math.prod(sizes[l] for l in open_labels(absorbed) | set(cores[i].labels))

    if n > 14:
        order, absorbed = [], frozenset()
        for _ in range(n):
            i = min((j for j in range(n) if j not in absorbed), key=lambda j: step_cost(absorbed, j))
            order.append(i)
            absorbed |= {i}
        return [cores[i] for i in order]
    best = {frozenset(): (0, [])}
    for size in range(n):
        for absorbed, (cost, order) in [kv for kv in best.items() if len(kv[0]) == size]:
            for i in range(n):
                if i in absorbed:
                    continue
                nxt = absorbed | {i}
                total = cost + step_cost(absorbed, i)
                if nxt not in best or total < best[nxt][0]:
                    best[nxt] = (total, order + [i])
    return [cores[i] for i in best[frozenset(range(n))][1]]


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

    def core_matrix(self, core, labels, keep, contracted, new, sizes):
        return core_matrix_np(core, labels, keep, contracted, new, sizes)

    def matmul(self, t, m):
        return t @ m

    def activation(self, t, name):
        return ACTIVATIONS_NUMPY[name](t)

    # features-first layout (emit_layout.py): whole-tensor reshapes and permutations
    def to_columns(self, x, n):
        return x.reshape(-1, n).T

    def from_columns(self, t, x, m):
        return t.T.reshape(tuple(x.shape[: self.batch_rank]) + (m,))

    def reshape_all(self, t, shape):
        return t.reshape(shape)

    def permute_all(self, t, perm):
        return t.transpose(perm)

    def left_core(self, core, labels, keep, contracted, new, sizes, lead):
        return core_left_np(core, labels, keep, contracted, new, sizes, lead)


def _gelu_np(t):
    from scipy.special import erf

    return 0.5 * t * (1 + erf(t / math.sqrt(2)))


# the activations a nonlinear chain may use (Chain.activation), the same in every backend
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")

ACTIVATIONS_NUMPY = {
    "relu": lambda t: np.maximum(t, 0),
    "tanh": np.tanh,
    "sigmoid": lambda t: 1 / (1 + np.exp(-t)),
    "gelu": _gelu_np,  # exact (erf) form
}


class TorchOps(NumpyOps):
    """The same chain on torch tensors (differentiable in the cores)."""

    def transpose(self, t, perm):
        b = self.batch_rank
        return t.permute(list(range(b)) + [p + b for p in perm])

    def core_matrix(self, core, labels, keep, contracted, new, sizes):
        perm = [labels.index(l) for l in keep + contracted + new]
        lead = [_prod(sizes, keep)] if keep else []
        return core.permute(perm).reshape(lead + [_prod(sizes, contracted), _prod(sizes, new)])

    def permute_all(self, t, perm):
        return t.permute(perm)

    def left_core(self, core, labels, keep, contracted, new, sizes, lead):
        perm = [labels.index(l) for l in keep + new + contracted]
        k = [_prod(sizes, keep)] + [1] * lead if keep else []
        return core.permute(perm).reshape(k + [_prod(sizes, new), _prod(sizes, contracted)])

    def activation(self, t, name):
        import torch

        if name == "gelu":
            return torch.nn.functional.gelu(t)  # exact (erf) form
        return getattr(torch, name)(t)


class OnnxOps:
    """Appends the chain's nodes to a Builder. Batch axes are copied with Reshape's 0."""

    def __init__(self, builder: "Builder", batch_rank: int):
        self.b = builder
        self.batch_rank = batch_rank
        # a Transpose's axes after the batch axes, when the builder limits tensor ranks
        self.max_axes = builder.max_rank - batch_rank if builder.max_rank else None

    def reshape(self, t, tail):
        shape = [0] * self.batch_rank + [int(v) for v in tail]
        return self.b.op("Reshape", [t, self.b.int64s(shape)], "reshape")

    def transpose(self, t, perm):
        k = self.batch_rank
        return self.b.op("Transpose", [t], "transpose", perm=list(range(k)) + [p + k for p in perm])

    def core_matrix(self, core, labels, keep, contracted, new, sizes):
        # permuted offline: same parameters, already in the layout MatMul wants
        return self.b.weight(core_matrix_np(core, labels, keep, contracted, new, sizes), "core")

    def matmul(self, t, m):
        return self.b.op("MatMul", [t, m], "matmul")

    def activation(self, t, name):
        return onnx_activation(self.b, t, name)

    def to_columns(self, x, n):
        if self.batch_rank > 1:
            x = self.b.op("Reshape", [x, self.b.int64s([-1, n])], "reshape")
        return self.b.op("Transpose", [x], "transpose", perm=[1, 0])

    def from_columns(self, t, x, m):
        y = self.b.op("Transpose", [t], "transpose", perm=[1, 0])
        if self.batch_rank == 1:
            return y
        batch = self.b.op("Slice", [self.b.op("Shape", [x], "shape"), self.b.int64s([0]),
                                    self.b.int64s([self.batch_rank])], "batch_shape")
        shape = self.b.op("Concat", [batch, self.b.int64s([m])], "out_shape", axis=0)
        return self.b.op("Reshape", [y, shape], "reshape")

    def reshape_all(self, t, shape):
        return self.b.op("Reshape", [t, self.b.int64s([int(v) for v in shape])], "reshape")

    def permute_all(self, t, perm):
        return self.b.op("Transpose", [t], "transpose", perm=list(perm))

    def left_core(self, core, labels, keep, contracted, new, sizes, lead):
        return self.b.weight(core_left_np(core, labels, keep, contracted, new, sizes, lead), "core")


ONNX_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def onnx_activation(builder: "Builder", t: str, name: str) -> str:
    """An activation's nodes. GELU (exact) is spelled with standard ops of every opset the
    project emits, x * (1 + Erf(x / sqrt 2)) * 0.5 (the pattern ONNX Runtime fuses into its
    own Gelu kernel). Its constants are made from integer tensors (1, 2) by a Cast to the
    compute dtype and Sqrt/Div, all folded when the session loads: they hold exactly the
    compute dtype's values and add no float parameters to the graph."""
    if name in ONNX_ACTIVATIONS:
        return builder.op(ONNX_ACTIVATIONS[name], [t], name)
    if name != "gelu":
        raise ValueError(f"activation '{name}': choose from {', '.join(ACTIVATIONS)}")
    to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(builder.compute_dtype))
    one = builder.op("Cast", [builder.int64s(1)], "gelu_const", to=to)
    two = builder.op("Cast", [builder.int64s(2)], "gelu_const", to=to)
    root2 = builder.op("Sqrt", [two], "gelu_const")
    half = builder.op("Div", [one, two], "gelu_const")
    e = builder.op("Erf", [builder.op("Div", [t, root2], "gelu")], "gelu")
    y = builder.op("Mul", [t, builder.op("Add", [e, one], "gelu")], "gelu")
    return builder.op("Mul", [y, half], "gelu")


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
    max_rank: int | None = None  # the largest tensor rank chains may use (the edge target)
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
    for i, (core, (keep, free, _, new)) in enumerate(zip(chain.steps, chain.plan())):
        out = keep + free + new
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
              attrs: dict | None = None, output: str | None = None, op: str = "Conv") -> str:
    """A Conv (or ConvTranspose) with the given weight (an array, or the name of a tensor
    already built) and bias; `attrs` carries strides/pads/dilations/auto_pad."""
    inputs = [x, weight if isinstance(weight, str) else builder.weight(weight, hint)]
    if bias is not None:
        inputs.append(builder.cast(builder.constant(bias, hint + "_bias")))
    return builder.op(op, inputs, hint, output=output, **(attrs or {}))
