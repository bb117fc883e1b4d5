"""Op fusion for the torch interpreter of ONNX graphs (tnonnx/finetune.py's GraphModule).

Exporters write GELU as five elementwise ops, x * 0.5 * (1 + erf(x / sqrt(2))). Run one by
one in torch, each of them reads and writes a whole activation, and autograd keeps and
differentiates each: on MiniLM's 1536-wide FFN activations the five ops and their backward
took about a third of a fine-tuning step (torch profiler, batches of 32 sentences). One
`Gelu` node (torch's fused erf GELU, forward and backward) computes the same function.

Only the interpreter's node list changes; the ONNX model that is trained and saved keeps
its ops as they are.
"""

from __future__ import annotations

import math

from onnx import helper

from .macs import constant_values, other_input, tensor_index

SQRT2 = math.sqrt(2.0)


def fuse_gelu(graph, trainable=frozenset()) -> tuple[list, set[str]]:
    """The graph's nodes with every erf GELU chain replaced by one `Gelu` node (placed where
    the chain's last node was), and the names of the tensors the fused chains no longer
    compute. A chain is fused only when its intermediate tensors are read by the chain
    alone (not by other nodes, subgraphs or the graph outputs) and its constants are
    scalars (size 1, at most one axis; computed from constants counts, as tnonnx's own GELU
    makes them). Initializers named in `trainable` are never taken for constants."""
    nodes = list(graph.node)
    producer, consumers = tensor_index(graph)
    outputs = {o.name for o in graph.output}
    value = constant_values(graph, producer, exclude=trainable)

    def scalar(name):
        v = value(name)
        return float(v.reshape(())) if v is not None and v.size == 1 and v.ndim <= 1 and v.dtype.kind == "f" else None

    def only_reader(name):
        """The one node reading `name`, or None."""
        r = consumers.get(name, [])
        return r[0] if len(r) == 1 and name not in outputs else None

    replaced, removed, dropped = {}, set(), set()
    for erf in nodes:
        if erf.op_type != "Erf" or erf.input[0] not in producer:
            continue
        scaling = producer[erf.input[0]]
        x = _scaled_input(scaling, scalar)
        add = only_reader(erf.output[0])
        if x is None or only_reader(erf.input[0]) is not erf or add is None or add.op_type != "Add":
            continue
        one = other_input(add, erf.output[0])
        if one is None or scalar(one) != 1.0:
            continue
        tail = _tail(add, x, only_reader, scalar, producer)
        if tail is None:
            continue
        members = [scaling, erf, add] + tail
        if any(id(n) in dropped for n in members):
            continue
        last = tail[-1]
        replaced[id(last)] = helper.make_node("Gelu", [x], [last.output[0]], name=f"{last.name}_fused_gelu")
        dropped.update(id(n) for n in members)
        removed.update(n.output[0] for n in members if n is not last)
    fused = [replaced.get(id(n), n) for n in nodes if id(n) not in dropped or id(n) in replaced]
    return fused, removed


def _scaled_input(node, scalar) -> str | None:
    """x when `node` is x / sqrt(2) or x * (1 / sqrt(2)), else None."""
    if node.op_type == "Div" and len(node.input) == 2 and _close(scalar(node.input[1]), SQRT2):
        return node.input[0]
    if node.op_type == "Mul" and len(node.input) == 2:
        for k in (0, 1):
            if _close(scalar(node.input[k]), 1 / SQRT2):
                return node.input[1 - k]
    return None


def _tail(add, x, only_reader, scalar, producer) -> list | None:
    """The nodes after a = 1 + erf that multiply it by x and by 0.5, in any of the three
    orders exporters write, (x * a) * 0.5, (a * 0.5) * x and (x * 0.5) * a, the node that
    gives the result last; None when they are not there."""
    first = only_reader(add.output[0])
    if first is None or first.op_type != "Mul":
        return None
    partner = other_input(first, add.output[0])
    if partner is None:
        return None
    if partner == x or scalar(partner) == 0.5:
        second = only_reader(first.output[0])
        if second is None or second.op_type != "Mul":
            return None
        rest = other_input(second, first.output[0])
        if rest is None or (scalar(rest) != 0.5 if partner == x else rest != x):
            return None
        return [first, second]
    half = producer.get(partner)  # x * 0.5 computed on its own
    if half is None or half.op_type != "Mul" or only_reader(partner) is not first:
        return None
    constant = other_input(half, x)
    if constant is None or scalar(constant) != 0.5:
        return None
    return [half, first]


def _close(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= 1e-6 * want
