"""LSTM, GRU and RNN nodes: the input weights W factorised and hoisted in front of the node.

Every direction of the node multiplies each timestep's input by W[d]^T (G*H x I, G gates).
The directions' weights stacked side by side form one dense I x (D*G*H) weight acting on
the input's last axis, factorised like any dense layer. Its chain is split before the last
core: the head is applied to all timesteps at once in front of the node (a MatMul chain on
X, whatever its layout), and the last core, mapping a rank-r state to every gate of every
direction, becomes the node's new W (D x G*H x r). At full rank the node then computes
exactly what it did. The formats whose last core acts on the gates alone qualify (svd);
a train's last core leaves the other output modes open, so tt and the like do not.

The recurrent weights R get a row of their own (state_layer), left alone here: with
`--recurrent scan` the node is written out (recurrent_scan.py) and R becomes a layer. The
biases, sequence_lens, the initial states, the peepholes and
all attributes (direction, layout, activations, clip, linear_before_reset) stay as they
are: the node's own kernel still runs the recurrence.
"""

from __future__ import annotations

import numpy as np

from .emit import Chain, core_matrix_np, run_chain, OnnxOps
from .errors import NotApplicable
from .macs_ops import _attr

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def describe(layer, scope, shapes) -> None:
    """Fill in a recurrent layer: its canonical weight is W stacked over directions."""
    from .graph import _set_weight

    node = layer.node
    found = scope.resolve_values(node.input[1]) if len(node.input) > 1 else None
    if found == "quantized":
        layer.reason = "weight is quantized (DequantizeLinear)"
        return
    if not isinstance(found, tuple):
        layer.reason = f"{node.op_type} input weight W is computed, not constant"
        return
    w = found[0]
    if w.ndim != 3 or w.shape[1] % GATES[node.op_type]:
        layer.reason = f"{node.op_type} weight W of shape {list(w.shape)} is not [directions, gates*hidden, input]"
        return
    _set_weight(layer, found, np.concatenate(list(w), axis=0).T, f"recurrent-{w.shape[0]}")
    layer.kind = "recurrent"
    layer.x = node.input[0]
    layer.x_shape = shapes.get(layer.x)
    if layer.x_shape is None:
        layer.reason = "rank of the sequence input is unknown (shape inference failed)"


STATE_REASON = "recurrent weights R: rewritable with --recurrent scan (the fused node keeps them)"


def state_layer(layer, scope):
    """The row of a recurrent node's R (stacked over directions like W: H x D*G*H), left
    alone with STATE_REASON; the node's MACs are split between W and R by their sizes.
    None when R is not constant."""
    from .graph import Layer

    node = layer.node
    found = scope.resolve_values(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if not isinstance(found, tuple) or found[0].ndim != 3:
        return None
    r = found[0]
    state = Layer(f"{layer.name}/R", node.op_type, node, layer.graph, reason=STATE_REASON,
                  weight=np.concatenate(list(r), axis=0).T.astype(np.float64), weight_key=f"recurrent-R:{id(node)}",
                  weight_path=list(found[2]), macs_key=layer.name)
    if layer.has_weight:
        w = int(np.prod(layer.weight_shape))
        layer.macs_share, state.macs_share = w / (w + r.size), r.size / (w + r.size)
    return state


def split(fact) -> tuple[Chain, np.ndarray]:
    """(head chain: input -> rank state, last core as a C x M matrix in the output's order);
    NotApplicable when the last core does not map the whole state to the gates."""
    chain = fact.chain
    if chain.activation is not None or len(chain.steps) < 2:
        raise NotApplicable(f"{fact.format}: input weights need a linear chain of two or more cores")
    keep, free, contracted, new = chain.plan()[-1]
    if keep or free:
        raise NotApplicable(f"{fact.format}: its last core leaves output modes open; the node's W must map "
                            "a rank state to the gates alone (svd)")
    last = chain.steps[-1]
    head = Chain(chain.in_labels, tuple(contracted), chain.sizes, chain.steps[:-1])
    tail = core_matrix_np(fact.cores[last.key], last.labels, [], contracted, new, chain.sizes)
    sizes = [chain.sizes[l] for l in new]
    perm = [new.index(l) for l in chain.out_labels]
    tail = tail.reshape([tail.shape[0]] + sizes).transpose([0] + [p + 1 for p in perm])
    return head, tail.reshape(tail.shape[0], -1)


def fit(module, layer, spec, modes=None, order=None, **options):
    """The format's dense fit of the stacked W (options: its data-aware input, if any)."""
    fact = module.fit_dense(layer.weight, spec, modes=modes, order=order, **options)
    split(fact)  # refuses formats whose last core does not act on the gates alone
    return fact


def emit(builder, layer, fact) -> None:
    """The head chain on X, then the node with W = the last core (per direction)."""
    import onnx

    node = layer.node
    head, tail = split(fact)
    x = run_chain(OnnxOps(builder, len(layer.x_shape) - 1), layer.x, head, fact.cores)
    directions = 2 if _attr(node, "direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    gates_hidden = tail.shape[1] // directions
    w = np.stack([tail[:, d * gates_hidden:(d + 1) * gates_hidden].T for d in range(directions)])
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = builder.fresh(node.op_type)
    new.input[0] = x
    new.input[1] = builder.weight(w, "w")
    builder.nodes.append(new)
