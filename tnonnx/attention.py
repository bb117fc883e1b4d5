"""Query and key projections fitted for the attention logits they make.

A self-attention head scores token i against token j by q_i . k_j (q = x W_q, k = x W_k,
per head). Fitted on its own, W_q's whitened fit weighs every output direction alike; but an
error d in q_i changes the logits by d . k_j, so what matters is d's size in the metric of
the keys, d Sigma_k d^T with Sigma_k = E[k k^T] per head, and the keys keep to few
directions. Weighing each projection's outputs by its partner's second moments (per head,
block-diagonal) makes the fit spend its rank where the logits see it. The key bias adds
q_i . b_k to every logit of query i alike, which the softmax does not see, so the weights
leave biases out. On all-MiniLM-L6-v2 at half its MatMul parameters (svd, --fit aware, no
gradient steps) the mean sentence cosine goes from 0.7941 to 0.800 (docs/RESULTS.md).

Only self-attention pairs are weighed: both projections read one tensor, so its Gram matrix
gives both partners' moments (Sigma_k = W_k^T G W_k / rows).
"""

from __future__ import annotations

import numpy as np

from .macs import constant_names, other_input, tensor_index

# ops a projection's output passes through on its way to the score MatMul: adding the bias,
# splitting the heads, scaling by 1/sqrt(d)
_PASSING = ("Add", "Reshape", "Transpose", "Mul", "Div")


def logit_partners(graph, layers, shapes) -> dict[str, tuple[str, int]]:
    """{layer name: (partner layer name, heads)} for the query and key projections of the
    self-attention score MatMuls in the main graph. `shapes`: macs.TensorShapes (the score
    MatMul's query operand [..., heads, tokens, head size] gives the head count)."""
    _, consumers = tensor_index(graph)
    constant = constant_names(graph)
    by_output = {layer.node.output[0]: layer for layer in layers
                 if layer.kind == "dense" and layer.side == "right" and not layer.trans_x}
    arrivals: dict[int, dict[int, object]] = {}
    scores = {}
    for y, layer in by_output.items():
        reached = _follow(y, consumers, constant)
        if reached is not None:
            node, slot = reached
            arrivals.setdefault(id(node), {})[slot] = layer
            scores[id(node)] = node
    partners = {}
    for score, slots in arrivals.items():
        query, key_layer = slots.get(0), slots.get(1)
        if query is None or key_layer is None or query.x != key_layer.x:
            continue
        spec = shapes.spec(scores[score].input[0]) if shapes is not None else None
        if spec is None or len(spec[0]) < 3:
            continue
        heads, size = spec[0][-3], spec[0][-1]
        features = query.weight.shape[1]
        if heads * size != features or key_layer.weight.shape[1] != features:
            continue
        partners[query.name] = (key_layer.name, heads)
        partners[key_layer.name] = (query.name, heads)
    return partners


def _follow(name: str, consumers, constant) -> tuple[object, int] | None:
    """(score MatMul, which operand) that `name` reaches through _PASSING ops with constant
    second operands (a Reshape's shape may be computed), each read by one node besides Shape
    nodes (exporters compute the head split from the tensor's own shape); else None."""
    for _ in range(8):
        readers = [r for r in consumers.get(name, []) if r.op_type != "Shape"]
        if len(readers) != 1:
            return None
        node = readers[0]
        if node.op_type == "MatMul":
            if any(i in constant for i in node.input):
                return None
            return node, list(node.input).index(name)
        if node.op_type not in _PASSING:
            return None
        if node.op_type in ("Add", "Mul", "Div"):
            other = other_input(node, name)
            if other not in constant or (node.op_type == "Div" and node.input[0] != name):
                return None
        elif node.input[0] != name:
            return None
        name = node.output[0]
    return None


def weigh_logits(data: dict, layers, partners: dict[str, tuple[str, int]]) -> int:
    """Give each partnered layer's LayerData its partner's per-head output moments as the
    output weighting (fit.LayerData.weigh_outputs); returns how many layers were weighed.
    Layers without a Gram basis (or whose partner has none) are left as they are."""
    by_name = {layer.name: layer for layer in layers}
    weighed = 0
    for name, (partner, heads) in partners.items():
        d = data.get(name)
        if d is None or d.basis is None or d.kind != "dense" or partner not in by_name:
            continue
        projected = d.basis @ by_name[partner].weight.astype(np.float64)  # A W_p: ||A W_p||^2 = tr(W_p^T G W_p)
        moments = _per_head(projected.T @ projected, heads)
        d.weigh_outputs(moments)
        weighed += 1
    return weighed


def _per_head(gram: np.ndarray, heads: int) -> np.ndarray:
    """The block-diagonal part of `gram` (heads blocks along its diagonal)."""
    size = gram.shape[0] // heads
    out = np.zeros_like(gram)
    for h in range(heads):
        block = slice(h * size, (h + 1) * size)
        out[block, block] = gram[block, block]
    return out
