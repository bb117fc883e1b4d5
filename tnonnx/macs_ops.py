"""The per-op MAC counters of tnonnx.macs (the rules are listed in its docstring): one
function per op type, keyed by (domain, op_type) in COUNTERS."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

Shape = tuple[int, ...] | None  # None: unknown rank or a symbolic dimension


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# A counter gets the node, its input shapes and its output shapes (None where unknown)
# and returns MACs, or None when a shape it needs is unknown.

def _matmul(a: Shape, b: Shape) -> int | None:
    if a is None or b is None or not a or not b:
        return None
    a2 = (1, a[0]) if len(a) == 1 else a
    b2 = (b[0], 1) if len(b) == 1 else b
    batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
    return math.prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _gemm(node, ins, outs):
    a, b = ins[0], ins[1]
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    (m, k) = a[::-1] if _attr(node, "transA", 0) else a
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return m * k * n


def _conv(w_idx: int):
    def count(node, ins, outs):
        y, w = outs[0], ins[w_idx]  # N C_out out... * C_in/g kernel...
        return None if y is None or w is None else math.prod(y) * math.prod(w[1:])
    return count


def _conv_transpose(node, ins, outs):
    x, w = ins[0], ins[1]  # N C_in in... * C_out/g kernel...
    return None if x is None or w is None else math.prod(x) * math.prod(w[1:])


def _recurrent(node, ins, outs):
    """LSTM/GRU/RNN: every step multiplies the input by W and the state by R, per
    direction: seq * batch * (|W| + |R|)."""
    x, w, r = ins[0], ins[1], ins[2]
    if x is None or w is None or r is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
    return seq * batch * (math.prod(w) + math.prod(r))


def _einsum(node, ins, outs):
    if any(s is None for s in ins):
        return None
    eq = _attr(node, "equation", b"").decode().replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    n_ell = max((len(s) - (len(t) - 3) for t, s in zip(terms, ins) if "..." in t), default=0)
    labels, sizes = [], {}
    for term, shape in zip(terms, ins):
        head, dots, tail = term.partition("...")
        k = len(shape) - len(head) - len(tail) if dots else 0
        labs = list(head) + [n_ell - k + i for i in range(k)] + list(tail)  # ... right-aligned
        if len(labs) != len(shape):
            return None
        for lab, d in zip(labs, shape):
            sizes[lab] = d if sizes.get(lab, 1) == 1 else sizes[lab]  # 1 broadcasts
        labels.append(set(labs))
    if "->" in eq:
        out = set(rhs.replace("...", "")) | (set(range(n_ell)) if "..." in rhs else set())
    else:
        letters = [c for t in terms for c in t.replace("...", "")]
        out = {c for c in letters if letters.count(c) == 1} | set(range(n_ell))
    macs, cur = 0, labels[0]
    for k in range(1, len(labels)):
        union = cur | labels[k]
        macs += math.prod(sizes[lab] for lab in union)
        cur = union & (out.union(*labels[k + 1:]))
    return macs


COUNTERS: dict[tuple[str, str], Callable] = {
    ("", "MatMul"): lambda node, ins, outs: _matmul(ins[0], ins[1]),
    ("", "MatMulInteger"): lambda node, ins, outs: _matmul(ins[0], ins[1]),
    ("", "QLinearMatMul"): lambda node, ins, outs: _matmul(ins[0], ins[3]),
    ("", "Gemm"): _gemm,
    ("", "Conv"): _conv(1),
    ("", "ConvInteger"): _conv(1),
    ("", "QLinearConv"): _conv(3),
    ("", "ConvTranspose"): _conv_transpose,
    ("", "Einsum"): _einsum,
    ("", "LSTM"): _recurrent,
    ("", "GRU"): _recurrent,
    ("", "RNN"): _recurrent,
}
"""(domain, op_type) -> counter; a module that emits a custom op registers its counter here."""
