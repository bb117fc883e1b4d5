"""What a model's graph says about the inputs it runs on, for making up feeds: the size of
a table an integer input indexes, a value an integer scalar input is compared with (a
sample rate checked by Equal against 16000), and the shortest length a symbolic axis can
have (a reflect Pad of 64 needs at least 65 samples). Cheap static reads of constants;
nothing is run."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .macs import all_graphs, subgraphs

_LOOK_THROUGH = ("Cast", "Identity")
_COMPARISONS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
# ops that keep every axis of their first input where it was (the other inputs constant)
_SAME_AXES = ("Cast", "Identity", "Neg", "Abs", "Mul", "Add", "Sub", "Div", "Pow", "Sqrt", "Relu", "Clip")


class GraphIndex:
    """Constants, producers and consumers of every graph of a model (subgraphs included:
    their bodies read outer-scope names)."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray | None] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        self._inits: dict[str, onnx.TensorProto] = {}
        for graph in all_graphs(model.graph):
            for t in graph.initializer:
                self.constants[t.name] = None  # read on demand (weights can be large)
                self._inits[t.name] = t
            for node in graph.node:
                self.nodes.append(node)
                for o in node.output:
                    self.producers[o] = node
                if node.op_type == "Constant":
                    self.constants[node.output[0]] = None
        self.inputs = {i.name for i in model.graph.input} - set(self._inits)
        self.input_ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input
                            if i.type.tensor_type.HasField("shape")}

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, None if `name` is not one."""
        if name not in self.constants:
            return None
        if self.constants[name] is None:
            if name in self._inits:
                self.constants[name] = numpy_helper.to_array(self._inits[name])
            else:
                node = self.producers[name]
                attr = next((a for a in node.attribute if a.name.startswith("value")), None)
                if attr is None or attr.name == "sparse_value":
                    return None
                v = onnx.helper.get_attribute_value(attr)
                self.constants[name] = numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)
        return self.constants[name]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant tensor without decoding an initializer's values."""
        if name in self._inits and self.constants.get(name, 0) is None:
            return tuple(self._inits[name].dims)
        value = self.value(name)
        return None if value is None else value.shape

    def aliases(self, name: str) -> set[str]:
        """`name` and what Cast/Identity nodes make of it, transitively."""
        out, frontier = {name}, [name]
        while frontier:
            current = frontier.pop()
            for node in self.nodes:
                if node.op_type in _LOOK_THROUGH and node.input[:1] == [current] and node.output[0] not in out:
                    out.add(node.output[0])
                    frontier.append(node.output[0])
        return out


def gather_table_size(index: GraphIndex, name: str) -> int | None:
    """Size of the gathered axis if `name` (or a Cast of it) indexes a constant table."""
    names, sizes = index.aliases(name), []
    for node in index.nodes:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in names:
            shape = index.shape(node.input[0])  # a table's shape: its values are not needed
            if shape:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if shape[axis % len(shape)] > 0:
                    sizes.append(shape[axis % len(shape)])
    return min(sizes) if sizes else None


def compared_value(index: GraphIndex, name: str) -> int | None:
    """A constant that `name` (or a Cast of it) is compared with in the graph, Equal first
    (a sample-rate input checked against 16000 and 8000 gets 16000, the first seen)."""
    names = index.aliases(name)
    found: list[tuple[int, int]] = []
    for node in index.nodes:
        if node.op_type not in _COMPARISONS or len(node.input) != 2:
            continue
        for mine, other in ((0, 1), (1, 0)):
            if node.input[mine] in names:
                v = index.value(node.input[other])
                if v is not None and v.size == 1 and v.dtype.kind in "iuf":
                    value = int(v.reshape(()))
                    if node.op_type == "Greater" and mine == 0 or node.op_type == "Less" and mine == 1:
                        value += 1  # x > c holds at c + 1
                    found.append((0 if node.op_type == "Equal" else 1, value))
    return min(found, key=lambda f: f[0])[1] if found else None


def minimum_lengths(model: onnx.ModelProto, index: GraphIndex | None = None) -> dict[tuple[str, int], int]:
    """{(graph input, axis): shortest length} implied by constant Pad (reflect) and Slice
    starts on tensors reached from a graph input through ops that keep their axes
    (Unsqueeze, Cast, elementwise ops with constants). Other paths are not followed."""
    index = index or GraphIndex(model)
    needs: dict[tuple[str, int], int] = {}
    for node in index.nodes:
        for axis, length in _node_minimums(index, node, model):
            source = _trace_axis(index, node.input[0], axis)
            if source is not None and source[0] in index.inputs:
                needs[source] = max(needs.get(source, 0), length)
    return needs


def _node_minimums(index: GraphIndex, node, model) -> list[tuple[int, int]]:
    """(axis, minimum length) pairs, axes negative (counted from the end)."""
    if node.op_type == "Pad":
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if mode != b"reflect":
            return []
        pads = next((list(a.ints) for a in node.attribute if a.name in ("pads", "paddings")), None)
        if pads is None and len(node.input) > 1:
            v = index.value(node.input[1])
            pads = None if v is None else [int(p) for p in v.reshape(-1)]
        if not pads or len(node.input) > 3 and node.input[3]:  # explicit axes: not followed
            return []
        rank = len(pads) // 2
        # onnxruntime's reflect pad needs each pad smaller than the axis it pads
        return [(i - rank, max(pads[i], pads[i + rank]) + 1) for i in range(rank) if max(pads[i], pads[i + rank]) > 0]
    if node.op_type == "Slice" and len(node.input) >= 3:
        starts = index.value(node.input[1])
        axes = index.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if starts is None or axes is None or any(a >= 0 for a in axes.reshape(-1)):
            return []  # only negative axes can be placed without knowing the rank
        return [(int(a), int(s) + 1 if s >= 0 else int(-s))
                for a, s in zip(axes.reshape(-1), starts.reshape(-1)) if abs(int(s)) < 2**31]
    return []


def _trace_axis(index: GraphIndex, name: str, axis: int, depth: int = 0) -> tuple[str, int] | None:
    """(tensor, non-negative axis) upstream of `name`'s axis `axis` (negative), or None."""
    node = index.producers.get(name)
    if node is None or depth > 32:
        rank = index.input_ranks.get(name)
        return (name, axis % rank) if name in index.inputs and rank and -rank <= axis < 0 else None
    if node.op_type in _SAME_AXES and not subgraphs(node):
        if any(index.value(i) is None for i in node.input[1:] if i):
            return None
        return _trace_axis(index, node.input[0], axis, depth + 1)
    if node.op_type == "Unsqueeze":
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1:
            v = index.value(node.input[1])
            axes = None if v is None else [int(a) for a in v.reshape(-1)]
        if axes is None:
            return None
        # count axes from the end: an inserted axis at or after ours shifts nothing before it
        out_rank = _rank(index, node.input[0])
        if out_rank is None:
            return None
        out_rank += len(axes)
        positive = sorted(a % out_rank for a in axes)
        mine = axis % out_rank
        if mine in positive:
            return None
        return _trace_axis(index, node.input[0], mine - sum(a < mine for a in positive) - (out_rank - len(axes)),
                           depth + 1)
    return None


def _rank(index: GraphIndex, name: str) -> int | None:
    """The rank of `name` where a graph input or Unsqueeze/same-axes chain says it."""
    node = index.producers.get(name)
    if node is None:
        return index.input_ranks.get(name)
    if node.op_type in _SAME_AXES:
        return _rank(index, node.input[0])
    return None
