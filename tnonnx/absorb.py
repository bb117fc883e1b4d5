"""Keeping the features-first layout between two rewritten layers (issue: layout absorption).

A features-first layer (emit_layout.py) computes its output as columns [M, R] and turns it
back into rows at its end; the next features-first layer turns its input into columns again
at its start:

    [M, R] -Transpose-> [R, M] -Reshape-> [*batch, M] -(bias, activation)-> -Reshape-> [R, M]
           -Transpose-> [M, R]

When only elementwise ops lie between the two (a bias Add and a GELU, say: MiniLM's feed-
forward pair), the two Transposes of [R, M] activations cancel: the elementwise ops run on the
columns directly, with their per-feature constants [M] reshaped to [M, 1]. The function is
unchanged; two moves of the whole activation are saved. (ONNX Runtime's own transpose
optimiser does not see through the Reshapes.) Only pairs whose Transposes tnonnx emitted are
touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx
from onnx import numpy_helper

from .macs import constant_values, tensor_index
from .replace import remove_unused

# ops that act value by value (with constants broadcast along the features); Gelu is the
# fused form some exporters emit
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Relu", "Tanh", "Sigmoid", "Gelu", "Sqrt", "Exp",
               "Neg", "Abs", "Identity", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "Softplus"}



def absorb_layouts(model: onnx.ModelProto, emitted: set[str]) -> int:
    """Cancel the Transpose pairs around elementwise ops between rewritten features-first
    layers of the main graph, in place; returns how many pairs were cancelled. `emitted`:
    the names of the nodes tnonnx emitted (only their Transposes are candidates)."""
    graph = model.graph
    # what the removed nodes computed their shapes from, and the constants put in column form
    freed = {name for n in graph.node if n.name in emitted for name in (*n.input, *n.output)}
    count = 0
    while (found := _find_pair(graph, emitted)) is not None:
        freed |= _apply(graph, found)
        count += 1
    if count:
        remove_unused(graph, freed)
    return count


@dataclass
class _Pair:
    """Two features-first layers' facing ends and the elementwise region between them."""

    t2: onnx.NodeProto  # the second layer's Transpose [R, M] -> [M, R]
    reshape2: onnx.NodeProto | None  # its Reshape [*batch, M] -> [R, M] (None: 2-D rows)
    t1: onnx.NodeProto  # the first layer's Transpose [M, R] -> [R, M]
    reshape1: onnx.NodeProto | None  # its Reshape [R, M] -> [*batch, M]
    nodes: list  # the elementwise region
    entry: str  # what the region reads (the first layer's rows)
    exit: str  # what the region writes (the second layer's rows)
    width: int | None  # M
    shape_readers: list  # the second layer's Shape nodes reading `exit`
    batch_source: str | None  # a tensor with the same batch dims, read before the first layer
    value: Callable  # the constants, as judged


def _is_transpose_2d(node) -> bool:
    if node is None or node.op_type != "Transpose":
        return False
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm == [1, 0]


def _reshape_last(node, value, producer) -> int | None:
    """The last dimension a Reshape sets, when it is a constant (the shape itself constant,
    or a Concat ending in a constant)."""
    shape = value(node.input[1])
    if shape is None:
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat":
            return None
        shape = value(concat.input[-1])
    if shape is None or shape.size == 0:
        return None
    return int(shape.reshape(-1)[-1])


def _find_pair(graph: onnx.GraphProto, emitted: set[str]):
    producer, consumers = tensor_index(graph)
    value = constant_values(graph, producer)
    outputs = {o.name for o in graph.output}
    for t2 in graph.node:
        if t2.name not in emitted or not _is_transpose_2d(t2):
            continue
        # the second layer's entry: [R, M] (Reshape of [*batch, M], or the rows themselves) -> [M, R]
        exit_name = t2.input[0]
        reshape2 = producer.get(exit_name)
        if reshape2 is not None and reshape2.op_type == "Reshape" and reshape2.name in emitted:
            if len(consumers.get(exit_name, [])) != 1 or exit_name in outputs:
                continue
            width = _reshape_last(reshape2, value, producer)
            exit_name = reshape2.input[0]
        else:
            reshape2, width = None, None
        # the second layer reads its input's batch dims (Shape) for its output's shape
        shape_readers = [c for c in consumers.get(exit_name, []) if c.op_type == "Shape" and c.name in emitted]
        region = _region(exit_name, producer, consumers, value, outputs, [reshape2 or t2] + shape_readers)
        if region is None:
            continue
        nodes, entry = region
        # the first layer's end: [M, R] -> [R, M] (-> Reshape [*batch, M])
        source = producer.get(entry)
        reshape1 = None
        if source is not None and source.op_type == "Reshape" and source.name in emitted:
            reshape1, source = source, producer.get(source.input[0])
            if len(consumers.get(reshape1.input[0], [])) != 1:
                continue
            last = _reshape_last(reshape1, value, producer)
            width = last if width is None else width
            if last is None or last != width:
                continue
        # the rows' rank: [R, M] without the Reshapes, else the batch axes the Reshape keeps + 1
        batch_source, rows_rank = _batch_source(reshape1, producer, value) if reshape1 is not None else (None, 2)
        if shape_readers and batch_source is None:
            continue
        if not _is_transpose_2d(source) or source.name not in emitted:
            continue
        if (reshape1 is None) != (reshape2 is None) or entry in outputs:
            continue
        fits, width = _constants_fit(nodes, entry, value, width, rows_rank)
        if not fits:
            continue
        return _Pair(t2, reshape2, source, reshape1, nodes, entry, exit_name, width, shape_readers, batch_source,
                     value)
    return None


def _batch_source(reshape, producer, value) -> tuple[str | None, int | None]:
    """The tensor whose batch dims the first layer's output Reshape copies, and the rank of
    that output: x and k + 1 in Reshape(y, Concat(Slice(Shape(x), 0, k), [M])), as
    OnnxOps.from_columns emits it; (None, None) for another form."""
    concat = producer.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat":
        return None, None
    sliced = producer.get(concat.input[0])
    if sliced is None or sliced.op_type != "Slice" or len(sliced.input) < 3:
        return None, None
    shape, ends = producer.get(sliced.input[0]), value(sliced.input[2])
    if shape is None or shape.op_type != "Shape" or ends is None or ends.size != 1:
        return None, None
    return shape.input[0], int(ends.reshape(-1)[0]) + 1


def _region(exit_name: str, producer, consumers, value, outputs, readers):
    """The elementwise nodes between one entry tensor and `exit_name` (read by `readers`
    alone), with every tensor they compute read only inside the region; None if not so."""
    nodes, entry, todo = {}, None, [exit_name]
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or node.op_type not in ELEMENTWISE or len(node.output) != 1:
            if entry not in (None, name):
                return None
            entry = name
            continue
        if id(node) in nodes:
            continue
        nodes[id(node)] = node
        for i in node.input:
            if i and value(i) is None:
                todo.append(i)
    if entry is None or not nodes:
        return None
    inside = set(map(id, nodes.values())) | set(map(id, readers))
    for node in nodes.values():
        out = node.output[0]
        if out in outputs or any(id(c) not in inside for c in consumers.get(out, [])):
            return None
    if entry in outputs or any(id(c) not in inside for c in consumers.get(entry, [])):
        return None
    return list(nodes.values()), entry


def _constants_fit(nodes, entry: str, value, width: int | None, rows_rank: int | None) -> tuple[bool, int | None]:
    """Whether every constant operand is a scalar or varies along the features only ([M],
    [1, .., M]), with no more axes than the rows (more would add axes to the result), so
    that it broadcasts over columns [M, R] once reshaped to [M, 1]; and M, when the
    Reshapes did not give it (a valid model's [M] operand of rows [R, M] is M wide)."""
    for node in nodes:
        for i in node.input:
            c = value(i) if i and i != entry else None
            if c is None:
                continue
            if c.ndim > (rows_rank if rows_rank is not None else 2):
                return False, width
            if c.size == 1:
                continue
            if c.size != c.shape[-1] or (width is not None and c.shape[-1] != width):
                return False, width
            width = c.shape[-1]
    return True, width


def _apply(graph: onnx.GraphProto, pair: _Pair) -> set[str]:
    """Put `pair`'s region on the columns, in place; returns the tensors this may leave unused."""
    renamed, replaced = {pair.entry: pair.t1.input[0]}, set()  # the region reads the first layer's [M, R]
    for node in pair.nodes:
        for k, i in enumerate(node.input):
            if i in renamed:
                node.input[k] = renamed[i]
                continue
            c = pair.value(i) if i else None
            if c is None or (c.size == 1 and c.ndim <= 2):
                continue
            # (a scalar with more axes than the columns' two, which the rows' rank allowed, is made 0-D)
            name = f"{i}_columns"
            if not any(t.name == name for t in graph.initializer):
                graph.initializer.append(numpy_helper.from_array(c.reshape(() if c.size == 1 else (pair.width, 1)),
                                                                 name))
            node.input[k] = name
            replaced.add(i)
    # the region's last node now writes what the second layer's Transpose wrote
    last = next(n for n in pair.nodes if n.output[0] == pair.exit)
    last.output[0] = pair.t2.output[0]
    for reader in pair.shape_readers:  # the same batch dims, read before the first layer
        reader.input[0] = pair.batch_source
    gone = [pair.t2, pair.t1] + ([pair.reshape1, pair.reshape2] if pair.reshape1 is not None else [])
    freed = {i for n in gone for i in n.input} | replaced
    keep = [n for n in graph.node if all(n is not g for g in gone)]
    del graph.node[:]
    graph.node.extend(keep)
    # the region's tensors changed shape: their recorded shapes no longer hold
    changed = {n.output[0] for n in pair.nodes}
    infos = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return freed
