"""LSTM, GRU and RNN nodes written out as standard ops (`--recurrent scan`), so that their
recurrent weights R can be factorised like any dense layer.

Per direction d the node becomes
- a MatMul `<node>/W<d>` of the whole sequence by W[d]^T (plus the biases that can be
  folded there), in front of the loop: a main-graph dense layer (data-aware fitting sees
  its real input);
- a Scan over the timesteps (reverse direction: scanned backwards, outputs in time order)
  whose body computes the cell with MatMul(s) `h @ R[d]^T` by weights of the main graph:
  dense layers inside a subgraph, fitted on their weights;
then the direction outputs are stacked into Y, Y_h (and Y_c) as the node wrote them.
sequence_lens is honoured by a [T, B, 1] mask: steps at or past a sequence's length leave
the state unchanged and output zeros, which is what the node does in both directions.

Exactly the node's function (tests compare with onnxruntime's kernels); slower than the
fused kernel at the same weights (bench/recurrent.py measures how much). Nodes with
non-default activations, clip, peepholes, input_forget or layout 1 are left fused, with
the reason in the returned notes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import RECURRENT_OPS, Scope
from .macs_ops import _attr
from .macs import all_graphs, subgraphs

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def to_scan(model: onnx.ModelProto) -> tuple[list[str], dict[str, str]]:
    """Rewrite every eligible recurrent node in place, in the main graph and inside If/Loop/
    Scan bodies (there, the new weights are initializers of the body). Returns notes, and for
    each main-graph cell MatMul that multiplies the state h by R, the Scan output holding
    the states: calibration rows for R (the states h_1..h_T stand for the h_0..h_{T-1} the
    cell multiplies: all but one row in common; inside bodies R is fitted on its weight)."""
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    notes, states, converted = [], {}, 0
    # bodies before the graph holding them: rebuilding a graph's node list copies its nodes
    for graph, scope in _graphs(model.graph, None, opset):
        new_nodes, before = [], converted
        for node in graph.node:
            if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
                new_nodes.append(node)
                continue
            reason = _ineligible(node, scope, opset)
            if reason:
                notes.append(f"{node.name or node.op_type}: kept as a fused {node.op_type} node ({reason})")
                new_nodes.append(node)
                continue
            b = _Emitter(node.name or f"{node.op_type}_{converted}", graph, opset)
            found = _convert(b, node, scope)
            if graph is model.graph:
                states.update(found)
            new_nodes.extend(b.nodes)
            converted += 1
        if converted > before:
            del graph.node[:]
            graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    if converted:
        notes.append(f"--recurrent scan: {converted} recurrent node(s) written as MatMul + Scan; their W and R "
                     "are rewritten as MatMul layers")
    return notes, states


def _graphs(graph, parent, opset):
    """(graph, its Scope) for `graph` and every body in it, bodies first."""
    scope = Scope(graph, parent, opset)
    for node in graph.node:
        for body in subgraphs(node):
            yield from _graphs(body, scope, opset)
    yield graph, scope


def _ineligible(node, scope, opset) -> str | None:
    if opset < 11:
        return f"opset {opset} < 11"
    if _attr(node, "layout", 0):
        return "layout 1"
    if _attr(node, "clip", None) is not None:
        return "clip"
    if _attr(node, "input_forget", 0):
        return "input_forget"
    acts = [a.decode() if isinstance(a, bytes) else a for a in _attr(node, "activations", [])]
    d = 2 if _direction(node) == "bidirectional" else 1
    if acts and acts != DEFAULT_ACTIVATIONS[node.op_type] * d:
        return "non-default activations"
    if node.op_type == "LSTM" and len(node.input) > 7 and node.input[7]:
        return "peepholes"
    for i in (1, 2):
        if not isinstance(scope.resolve(node.input[i]), tuple):
            return "W or R not constant"
    if len(node.input) > 3 and node.input[3] and not isinstance(scope.resolve(node.input[3]), tuple):
        return "bias not constant"
    return None


def _direction(node) -> str:
    d = _attr(node, "direction", b"forward")
    return d.decode() if isinstance(d, bytes) else d


class _Emitter:
    """Nodes and initializers for one converted node (names under its own prefix)."""

    def __init__(self, prefix, graph, opset):
        self.prefix, self.graph, self.opset, self.nodes, self.count = prefix, graph, opset, [], 0

    def name(self, hint):
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def op(self, op_type, inputs, hint, nodes=None, output=None, **attrs):
        out = output or self.name(hint)
        (self.nodes if nodes is None else nodes).append(
            helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def const(self, array, hint, graph=None):
        name = self.name(hint)
        (graph or self.graph).initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def unsqueeze(self, x, axis, nodes=None, graph=None):
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.asarray([axis], np.int64), "axes", graph)], "unsq", nodes)
        return self.op("Unsqueeze", [x], "unsq", nodes, axes=[axis])

    def squeeze(self, x, axis, nodes=None):
        if self.opset >= 13:
            return self.op("Squeeze", [x, self.const(np.asarray([axis], np.int64), "axes")], "sq", nodes)
        return self.op("Squeeze", [x], "sq", nodes, axes=[axis])

    def cols(self, x, start, stop, nodes, graph):
        """x[:, start:stop] of a 2-D tensor."""
        c = lambda v: self.const(np.asarray([v], np.int64), "idx", graph)
        return self.op("Slice", [x, c(start), c(stop), c(1)], "gate", nodes)


def _convert(b: _Emitter, node, scope) -> dict[str, str]:
    op, hidden = node.op_type, _attr(node, "hidden_size", None)
    w, r = scope.resolve_values(node.input[1])[0], scope.resolve_values(node.input[2])[0]
    g, dirs = GATES[op], w.shape[0]
    hidden = hidden or r.shape[-1]
    dtype = w.dtype
    has_bias = len(node.input) > 3 and node.input[3]
    bias = scope.resolve_values(node.input[3])[0] if has_bias else np.zeros((dirs, 2 * g * hidden), dtype)
    inputs = list(node.input) + [""] * (8 - len(node.input))
    lens, h0, c0 = inputs[4], inputs[5], inputs[6]
    x = node.input[0]
    lbr = _attr(node, "linear_before_reset", 0)
    directions = ["reverse"] if _direction(node) == "reverse" else \
        ["forward", "reverse"] if _direction(node) == "bidirectional" else ["forward"]
    mask = _mask(b, x, lens) if lens else None
    zeros = None
    ys, yhs, ycs, states_of = [], [], [], {}
    for d, direction in enumerate(directions):
        wb, rb = bias[d, : g * hidden], bias[d, g * hidden:]
        # GRU's R bias of the candidate gate meets r * (h R^T) or r * h: it stays in the cell
        hoisted = wb + rb if op != "GRU" else wb + np.concatenate([rb[: 2 * hidden], np.zeros(hidden, dtype)])
        xw = b.op("MatMul", [x, b.const(np.ascontiguousarray(w[d].T), "W")], "xw")
        b.nodes[-1].name = f"{b.prefix}/W{d}"
        xw = b.op("Add", [xw, b.const(hoisted.astype(dtype), "bias")], "xw")
        states = []
        for given in (h0, c0) if op == "LSTM" else (h0,):
            if given:
                part = b.op("Slice", [given, b.const(np.asarray([d], np.int64), "i"),
                                      b.const(np.asarray([d + 1], np.int64), "i"),
                                      b.const(np.asarray([0], np.int64), "i")], "state")
                states.append(b.squeeze(part, 0))
            else:
                zeros = zeros or _zeros(b, x, hidden, dtype)
                states.append(zeros)
        body = _body(b, op, d, r[d], rb if op == "GRU" else None, lbr, hidden, dtype, mask is not None)
        scan_in = [xw] + ([mask] if mask is not None else [])
        reverse = 1 if direction == "reverse" else 0
        outs = [b.name("state") for _ in states] + [b.name("y")]
        b.nodes.append(helper.make_node(
            "Scan", states + scan_in, outs, name=f"{b.prefix}/Scan{d}", body=body, num_scan_inputs=len(scan_in),
            scan_input_directions=[reverse] * len(scan_in), scan_output_directions=[reverse]))
        states_of[f"{b.prefix}/R{d}"] = outs[-1] if mask is None else None  # masked outputs hold zeros
        ys.append(b.unsqueeze(outs[-1], 1))
        yhs.append(b.unsqueeze(outs[0], 0))
        if op == "LSTM":
            ycs.append(b.unsqueeze(outs[1], 0))
    for k, parts in enumerate((ys, yhs, ycs)):
        if k < len(node.output) and node.output[k] and parts:
            b.op("Concat", parts, "out", output=node.output[k], axis=1 if k == 0 else 0)
    return {k: v for k, v in states_of.items() if v}


def _zeros(b, x, hidden, dtype):
    shape = b.op("Shape", [x], "shape")
    batch = b.op("Slice", [shape, b.const(np.asarray([1], np.int64), "i"), b.const(np.asarray([2], np.int64), "i")],
                 "batch")
    dims = b.op("Concat", [batch, b.const(np.asarray([hidden], np.int64), "h")], "dims", axis=0)
    value = numpy_helper.from_array(np.zeros(1, dtype))
    return b.op("ConstantOfShape", [dims], "zeros", value=value)


def _mask(b, x, lens):
    """[T, B, 1] float: 1 where t < sequence_lens[b]."""
    shape = b.op("Shape", [x], "shape")
    t = b.op("Gather", [shape, b.const(np.asarray(0, np.int64), "i")], "t", axis=0)
    steps = b.op("Range", [b.const(np.asarray(0, np.int64), "i"), t, b.const(np.asarray(1, np.int64), "i")], "steps")
    steps = b.unsqueeze(b.unsqueeze(steps, 1), 2)  # [T, 1, 1]
    lens64 = b.unsqueeze(b.unsqueeze(b.op("Cast", [lens], "lens", to=TensorProto.INT64), 0), 2)  # [1, B, 1]
    return b.op("Cast", [b.op("Less", [steps, lens64], "mask")], "mask", to=TensorProto.FLOAT)


def _body(b: _Emitter, op, d, r, rb, lbr, hidden, dtype, masked) -> onnx.GraphProto:
    """The cell as a Scan body: states (h[, c]), scan inputs (gates_x[, mask])."""
    graph = onnx.GraphProto(name=f"{b.prefix}/cell{d}")
    nodes = []
    ttype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    h, c, gx, m = "h_in", "c_in", "gx_in", "m_in"
    names = [h] + ([c] if op == "LSTM" else []) + [gx] + ([m] if masked else [])
    for n in names:
        width = {h: hidden, c: hidden, gx: GATES[op] * hidden, m: 1}[n]
        graph.input.append(helper.make_tensor_value_info(n, ttype if n != m else TensorProto.FLOAT, ["batch", width]))

    def matmul(state, weight, k):
        out = b.op("MatMul", [state, b.const(np.ascontiguousarray(weight), "R")], "hr", nodes)
        nodes[-1].name = f"{b.prefix}/R{d}" + (f"_{k}" if k else "")
        return out

    col = lambda t, k, n=1: b.cols(t, k * hidden, (k + n) * hidden, nodes, graph)
    sig = lambda t: b.op("Sigmoid", [t], "sig", nodes)
    tanh = lambda t: b.op("Tanh", [t], "tanh", nodes)
    add = lambda p, q: b.op("Add", [p, q], "add", nodes)
    mul = lambda p, q: b.op("Mul", [p, q], "mul", nodes)
    new_c = None
    if op == "LSTM":  # gates i, o, f, c
        gates = add(gx, matmul(h, r.T, 0))
        i, o, f, cc = sig(col(gates, 0)), sig(col(gates, 1)), sig(col(gates, 2)), tanh(col(gates, 3))
        new_c = add(mul(f, c), mul(i, cc))
        new_h = mul(o, tanh(new_c))
    elif op == "GRU":  # gates z, r, h
        rbh = b.const(rb[2 * hidden:].astype(dtype), "rb", graph)
        hr = matmul(h, r.T if lbr else r[: 2 * hidden].T, 0)
        z, rr = sig(add(col(gx, 0), col(hr, 0))), sig(add(col(gx, 1), col(hr, 1)))
        if lbr:
            cand = tanh(add(col(gx, 2), mul(rr, add(col(hr, 2), rbh))))
        else:
            cand = tanh(add(add(col(gx, 2), matmul(mul(rr, h), r[2 * hidden:].T, 1)), rbh))
        one = b.const(np.ones(1, dtype), "one", graph)
        new_h = add(mul(b.op("Sub", [one, z], "sub", nodes), cand), mul(z, h))
    else:
        new_h = tanh(add(gx, matmul(h, r.T, 0)))
    outs = [new_h] + ([new_c] if new_c else [])
    if masked:  # past a sequence's end: state kept, output zero
        mm = b.op("Cast", [m], "m", nodes, to=ttype)
        keep = b.op("Sub", [b.const(np.ones(1, dtype), "one", graph), mm], "keep", nodes)
        outs = [add(mul(mm, new), mul(keep, old)) for new, old in zip(outs, [h, c])]
        y = mul(mm, new_h)
    else:
        y = new_h
    final = [b.op("Identity", [t], "out", nodes, output=f"{n}_out") for t, n in zip(outs, ["h", "c"])]
    final.append(b.op("Identity", [y], "out", nodes, output="y_out"))
    graph.node.extend(nodes)
    for n, width in zip(final, [hidden] * len(final)):
        graph.output.append(helper.make_tensor_value_info(n, ttype, ["batch", width]))
    return graph


def _drop_unused_initializers(model) -> None:
    used = set()
    graphs = all_graphs(model.graph)
    for g in graphs:
        for n in g.node:
            used.update(n.input)
        used.update(o.name for o in g.output)
    for g in graphs:
        keep = [t for t in g.initializer if t.name in used]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)
