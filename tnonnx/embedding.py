"""Embedding tables: a Gather from a constant [V x D] table, factorised as a dense V x D
weight acting on one-hot rows (y = onehot(i) W), but evaluated without the one-hot.

- svd (W ~ U V): Gather rows of U, then one MatMul with V.
- tt (TT-matrix with in-modes n_1..n_d, out-modes m_1..m_d): the index is split into mode
  indices (Div/Mod, row-major), each core is gathered at its own mode index, and the
  gathered cores are contracted left to right by batched MatMuls. The vocabulary is padded
  with zero rows to the product of the in-modes (the padding rows are never gathered).

Data-aware fitting weights each row by how often its index occurs in the calibration
data: svd takes the SVD of diag(d) W with d_i = sqrt(count_i + ridge) and maps the left
factor back through diag(d)^-1, which folds the weighting into the table at no run-time
cost (every row is the original row projected on the r right singular vectors the
frequent rows choose). tt is fitted data-free; its output error is then reported and
compared (by the --budget allocator) in the same frequency-weighted measure.

A MatMul by the table's transpose (an output projection tied to the embedding) is a layer
of kind "tied" carrying the table itself: it shares the embedding's plan, fit and svd
factors (h V^T U^T), so the table is stored once, factorised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import NotApplicable
from .formats.base import ChainFactorization

FORMATS = ("svd", "tt")
RIDGE = 1e-3  # relative to the mean count: rows the data never uses still count a little


@dataclass
class PaddedChain(ChainFactorization):
    """A chain over a vocabulary padded to `rows_padded` rows; its dense weight is the
    first `rows` of them."""

    rows: int = 0

    def to_dense(self) -> np.ndarray:
        return super().to_dense()[: self.rows]


def describe(layer, found, indices_shape) -> None:
    """Fill in an embedding layer (graph.find_layers made it for a Gather on a constant
    2-D float table, axis 0)."""
    from .graph import _set_weight

    _set_weight(layer, found, found[0], "embedding")
    layer.kind = "embedding"
    layer.x = layer.node.input[1]
    layer.x_shape = indices_shape
    if indices_shape is None:
        layer.reason = "rank of the indices is unknown (shape inference failed)"


def link_tied(layers) -> None:
    """A dense layer multiplying by an embedding table's transpose (a tied output projection)
    becomes kind "tied": it carries the table itself, with its weight key, so that the two
    share one plan, one fit and one set of factors (svd: h V^T U^T from U and V)."""
    by_shape: dict[tuple, list] = {}  # only weights shaped like a table's transpose are hashed
    for l in layers:
        if l.kind == "embedding" and l.reason is None:
            by_shape.setdefault(tuple(l.weight.shape), []).append(l)
    tables: dict[tuple, dict] = {}  # shape -> {digest: table}, built when a layer first asks
    for layer in layers:
        if layer.kind == "dense" and layer.reason is None and layer.side == "right" and not layer.trans_x \
                and layer.bias_input is None and layer.weight.ndim == 2 and tuple(layer.weight.T.shape) in by_shape:
            shape = tuple(layer.weight.T.shape)
            if shape not in tables:
                tables[shape] = {_digest(t.weight): t for t in by_shape[shape]}
            table = tables[shape].get(_digest(layer.weight.T))
            if table is not None:
                layer.kind, layer.weight, layer.weight_key = "tied", table.weight, table.weight_key


def _digest(w: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(w, dtype=np.float64).tobytes()).hexdigest()


def vocabulary_modes(v: int, d: int) -> tuple[int, ...]:
    """d modes whose product is the smallest balanced cover of v: all ceil(v^(1/d)), each
    lowered by one while the product still covers v (30522, 3 -> 31 x 31 x 32 = 30752)."""
    modes = [math.ceil(v ** (1 / d))] * d
    for k in range(d):
        if math.prod(modes) // modes[k] * (modes[k] - 1) >= v:
            modes[k] -= 1
    return tuple(sorted(modes))


@dataclass
class EmbeddingData:
    """Index counts of one embedding layer on the calibration data."""

    counts: np.ndarray  # (V,)
    weight: np.ndarray  # the table (V x D)

    @property
    def row_weights(self) -> np.ndarray:
        c = self.counts.astype(np.float64)
        return np.sqrt(c + RIDGE * max(c.mean(), 1e-12))

    def output_error(self, fact, dense: np.ndarray | None = None) -> float:
        """Relative error of the looked-up rows over the calibration indices (`dense`: the
        factorisation's to_dense() when the caller has it)."""
        w = self.counts.astype(np.float64)[:, None]
        dense = fact.to_dense() if dense is None else dense
        error = np.sum(w * (dense - self.weight) ** 2)
        return float(np.sqrt(error / max(np.sum(w * self.weight**2), 1e-300)))

    def held_out_error(self, fact, dense: np.ndarray | None = None) -> None:
        """No samples are held out of index counts: every lookup is its own row."""
        return None


def fit(module, layer, spec, modes=None, order=None, data: EmbeddingData | None = None):
    """The factorisation of an embedding table in format `module` (svd or tt)."""
    from .tensorize import default_order, factor_dims

    if module.NAME not in FORMATS:
        raise NotApplicable(f"embedding tables are rewritten in {' or '.join(FORMATS)}, not {module.NAME}")
    if layer.kind == "tied" and module.NAME != "svd":
        raise NotApplicable("a tied output projection shares its table's factors in svd only")
    w = layer.weight
    v, dim = w.shape
    if module.NAME == "svd":
        if data is None:
            return module.fit_dense(w, spec)
        scale = data.row_weights
        fact = module.fit_dense(w * scale[:, None], spec)
        fact.cores["U"] = fact.cores["U"] / scale[:, None]
        return fact
    if modes is not None and math.prod(modes[0]) >= v and math.prod(modes[1]) == dim:
        ins, outs = modes
    else:
        d = order or default_order(v, dim)
        ins, outs = vocabulary_modes(v, d), factor_dims(dim, d)
    padded = np.zeros((math.prod(ins), dim))
    padded[:v] = w
    base = module.fit_dense(padded, spec, modes=(ins, outs))
    return PaddedChain(base.format, base.chain, base.cores, base.ranks, base.modes, rows=v)


def train_cores(fact) -> list[tuple[np.ndarray, int]]:
    """The chain's cores in train order (from the core holding the first in-mode, along the
    bonds), each as a 4-way (r_in, n, m, r_out) array (1 for an absent axis), with the
    position of its in-mode (-1: none)."""
    chain = fact.chain
    ins, outs = list(chain.in_labels), list(chain.out_labels)
    steps = list(chain.steps)
    current = next((c for c in steps if ins[0] in c.labels), None)
    out, left, seen = [], None, set()
    while current is not None:
        seen.add(current.key)
        labels = current.labels
        n = [l for l in labels if l in ins]
        m = [l for l in labels if l in outs]
        right = [l for l in labels if l not in ins + outs and l != left]
        if len(n) > 1 or len(m) > 1 or len(right) > 1:
            raise NotApplicable(f"{fact.format}: not a train of cores with one mode each")
        order = ([left] if left else []) + n + m + right
        t = np.transpose(fact.cores[current.key], [labels.index(l) for l in order])
        shape = [chain.sizes[x[0]] if x else 1 for x in ([left] if left else [], n, m, right)]
        out.append((t.reshape(shape), ins.index(n[0]) if n else -1))
        left = right[0] if right else None
        current = next((c for c in steps if left and left in c.labels and c.key not in seen), None)
    if len(out) != len(steps):
        raise NotApplicable(f"{fact.format}: not a train of cores with one mode each")
    return out


def emit(builder, layer, fact) -> None:
    """The looked-up rows of the factorised table into the Gather's output."""
    batch_rank = len(layer.x_shape)
    keep = [0] * batch_rank
    idx, ins = layer.x, list(fact.chain.in_labels)
    in_sizes = [fact.chain.sizes[l] for l in ins]
    if len(ins) > 1:  # non-negative int64 row index, then its mode indices (row-major)
        idx = builder.op("Cast", [idx], "index", to=onnx.TensorProto.INT64)
        idx = builder.op("Mod", [idx, builder.int64s(np.asarray(layer.weight.shape[0]))], "index")
    cores = train_cores(fact)
    state, m_done = None, 1
    for core, k in cores:
        r_in, n, m, r_out = core.shape
        if k >= 0:
            mode_index = idx
            if len(ins) > 1:
                stride = math.prod(in_sizes[k + 1:])
                if stride > 1:
                    mode_index = builder.op("Div", [mode_index, builder.int64s(np.asarray(stride))], "mode")
                mode_index = builder.op("Mod", [mode_index, builder.int64s(np.asarray(n))], "mode")
            table = builder.weight(np.moveaxis(core, 1, 0).reshape(n, r_in * m * r_out), "core")
            piece = builder.op("Gather", [table, mode_index], "gather", axis=0)
            piece = builder.op("Reshape", [piece, builder.int64s(keep + [r_in, m * r_out])], "reshape")
        else:
            piece = builder.weight(core.reshape(r_in, m * r_out), "core")
        if state is None:
            state = piece  # r_in == 1
        else:
            state = builder.op("MatMul", [state, piece], "matmul")
        m_done *= m
        state = builder.op("Reshape", [state, builder.int64s(keep + [m_done, r_out])], "reshape")
    builder.op("Reshape", [state, builder.int64s(keep + [m_done])], "reshape")
    builder.rename_output(layer.node.output[0])


def emit_tied(builder, layer, fact) -> None:
    """h @ W^T with the table's svd factors (W ~ U V): h V^T U^T, the same initializers as the
    Gather's (Builder.weight shares them by order), transposed in the graph."""
    (u, _), (v, _) = train_cores(fact)
    table_u = builder.weight(np.moveaxis(u, 1, 0).reshape(u.shape[1], -1), "core")
    table_v = builder.weight(v.reshape(v.shape[0], -1), "core")
    y = builder.op("MatMul", [layer.x, builder.op("Transpose", [table_v], "transpose", perm=[1, 0])], "matmul")
    y = builder.op("MatMul", [y, builder.op("Transpose", [table_u], "transpose", perm=[1, 0])], "matmul")
    if layer.bias is not None:
        builder.op("Add", [y, builder.cast(builder.constant(layer.bias, "bias"))], "bias")
    builder.rename_output(layer.node.output[0])


def layer_data(model, layers, batches) -> dict:
    """EmbeddingData per embedding layer whose indices are a main-graph tensor onnxruntime
    can expose (or a graph input), from the calibration batches."""
    from . import runtime

    tied = [l for l in layers if l.kind == "tied"]
    layers = [l for l in layers if l.kind == "embedding"]
    if not layers:
        return {}
    names = sorted({l.x for l in layers})
    inputs = {i.name for i in model.graph.input}
    exposed = [n for n in names if n not in inputs]
    sess, wanted = None, []
    if exposed:
        m, wanted = runtime.with_outputs(model, exposed)
        sess = runtime.session(m) if wanted else None
    counts = {l.name: np.zeros(l.weight.shape[0], dtype=np.int64) for l in layers}
    for feeds in batches:
        values = {n: np.asarray(feeds[n]) for n in names if n in feeds}
        if sess is not None:
            values.update(zip(wanted, sess.run(wanted, dict(feeds))))
        for l in layers:
            if l.x in values:
                v = l.weight.shape[0]
                counts[l.name] += np.bincount(np.mod(values[l.x].ravel().astype(np.int64), v), minlength=v)[:v]
    data = {l.name: EmbeddingData(counts[l.name], l.weight) for l in layers if l.x in inputs or l.x in wanted}
    for layer in tied:  # a tied projection is fitted with its table (one fit, shared factors)
        source = next((l for l in layers if l.weight_key == layer.weight_key and l.name in data), None)
        if source is not None:
            data[layer.name] = data[source.name]
    return data
