"""Finding the layers to rewrite (tnonnx.replace puts their replacements in place).

A Layer is a node that carries a weight, with everything needed to factorise it: the
weight in a canonical form (dense: N x M acting as y = x W; conv and ConvTranspose:
T x S x k...), where it came from, and how the node uses it. OP_KINDS maps each op type to
the function describing its nodes: candidates (MatMul, Gemm, Conv, ConvTranspose) or
kinds listed with the reason they are left alone. Weights are found as initializers or
Constant nodes, through Identity/Cast/Transpose, computed from constants alone (FOLDED
ops), in the node's own graph or an enclosing one (If/Loop bodies may use outer-scope
initializers). Nodes that cannot be rewritten become Layers with a `reason`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import external
from .formats.base import ConvGeometry, flip_kernel
from .macs import all_graphs, constant_node_value, iter_nodes
from .macs_ops import _attr
from .model import default_opset

CANDIDATE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
FLOAT_TYPES = (np.float16, np.float32, np.float64)
PASS_THROUGH = ("Identity", "Cast", "Transpose")
EMBEDDING_OPS = ("Gather",)  # on a constant 2-D float table (tnonnx/embedding.py)
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # input weights hoisted (tnonnx/recurrent.py)
REWRITABLE_OPS = CANDIDATE_OPS + EMBEDDING_OPS + RECURRENT_OPS
# ops evaluated when all their inputs are constant: weights computed from constants alone
FOLDED = ("ConstantOfShape", "Unsqueeze", "Squeeze", "Concat", "Slice", "Reshape", "Flatten", "Expand", "Tile",
          "Gather", "Split", "Mul", "Add", "Sub", "Div", "Neg", "Range")


class _Weight:
    """Layer.weight: set directly, or read from the layer's `lazy` external weight on first
    use (and dropped again by Layer.release())."""

    def __get__(self, layer, owner=None):
        if layer is None:
            return None
        value = layer.__dict__.get("_weight")
        if value is None and layer.__dict__.get("lazy") is not None:
            lazy = layer.lazy
            value = layer.__dict__["_weight"] = lazy.read(np.float64 if lazy.dtype.kind == "f" else None)
        return value

    def __set__(self, layer, value):
        layer.__dict__["_weight"] = None if isinstance(value, _Weight) else value  # the default


@dataclass
class Layer:
    name: str
    op_type: str
    node: onnx.NodeProto
    graph: onnx.GraphProto
    kind: str = ""  # "dense" or "conv" when rewritable
    reason: str | None = None
    weight: np.ndarray | None = field(default=_Weight(), repr=False, compare=False)  # canonical float64 weight
    weight_key: str = ""  # equal for layers that share one weight (factorised once)
    store_dtype: np.dtype | None = None  # dtype of the constant the weight is stored as
    compute_dtype: np.dtype | None = None  # dtype the node computes in
    x: str = ""  # activation input
    x_shape: list | None = None
    side: str = "right"  # dense: "left" when the node computes W @ x
    trans_x: bool = False  # Gemm transA
    bias: np.ndarray | None = None  # constant bias, already scaled by Gemm's beta
    bias_input: str | None = None  # computed Gemm C
    beta: float = 1.0
    geometry: ConvGeometry | None = None
    other_weights: list = field(default_factory=list)  # further constants the node carries (LSTM's R, B)
    groups: int = 1  # conv group count; each group is factorised on its own
    weight_path: list[str] = field(default_factory=list)  # tensors between the constant and the node
    bias_path: list[str] = field(default_factory=list)  # the same for a constant bias
    probe_x: str = ""  # a main-graph tensor whose rows stand for x in calibration (x inside a Scan cell)
    lazy: external.Lazy | None = None  # the weight while still in its data file
    macs_key: str = ""  # the node's name in tnonnx.macs' count when not `name` (LSTM's R row)
    macs_share: float = 1.0  # the part of the node's MACs this weight accounts for (LSTM's W and R)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """As the node stores it (a ConvTranspose: in x out/group x k...)."""
        if self.lazy is not None:
            return tuple(self.lazy.shape)
        if self.weight is None:
            return ()
        if self.op_type == "ConvTranspose":
            return (self.weight.shape[1] * self.groups, self.weight.shape[0] // self.groups) + self.weight.shape[2:]
        return tuple(self.weight.shape)

    @property
    def params(self) -> int:
        if not self.has_weight:
            return 0
        return int(np.prod(self.weight_shape)) + sum(int(np.size(w)) for w in self.other_weights)

    @property
    def has_weight(self) -> bool:
        return self.lazy is not None or self.weight is not None

    def macs_in(self, per_node: dict) -> int | None:
        """The MACs of the node (per_node: tnonnx.macs' count by node name) this weight accounts for."""
        total = per_node.get(self.macs_key or self.name)
        return total if total is None or self.macs_share == 1.0 else round(total * self.macs_share)

    def release(self) -> None:
        """Let go of a weight read from a data file (it is read again if needed)."""
        if self.lazy is not None:
            self.__dict__["_weight"] = None

    @property
    def batch_rank(self) -> int:
        """Leading axes of x carried through a dense chain."""
        return len(self.x_shape) - 1 if self.x_shape is not None else 1


class Quantized(str):
    """Scope.resolve's answer for a weight that DequantizeLinear computes: equal to
    "quantized", with the quantized array (None when that is not constant either)."""

    def __new__(cls, array):
        out = super().__new__(cls, "quantized")
        out.array = array
        return out


class Scope:
    """Constants and producers visible from one graph (its own, then its parents')."""

    def __init__(self, graph: onnx.GraphProto, parent: "Scope | None" = None, opset: int | None = None,
                 base: str | None = None):
        self.graph, self.parent, self.base = graph, parent, base
        self.opset = opset if opset is not None else (parent.opset if parent is not None else onnx.defs.onnx_opset_version())
        self.initializers = {t.name: t for t in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}
        self.inputs = {i.name for i in graph.input} - set(self.initializers)

    def resolve(self, name: str):
        """(array, stored dtype, path of tensor names) if `name` is constant, "quantized" if it
        comes from DequantizeLinear, else None."""
        scope = self
        while scope is not None:
            if name in scope.inputs:
                return None
            if name in scope.initializers:
                arr = external.lazy_or_array(scope.initializers[name], scope.base)
                return arr, arr.dtype, [name]
            node = scope.producers.get(name)
            if node is not None:
                return scope._through(node, name)
            scope = scope.parent
        return None

    def resolve_values(self, name: str):
        """resolve(), with a weight still in its data file read into memory: for describers
        that compute on the values (folding, flipping, stacking, embedding tables)."""
        found = self.resolve(name)
        if isinstance(found, tuple) and isinstance(found[0], external.Lazy):
            return (found[0].read(),) + tuple(found[1:])
        return found

    def _through(self, node: onnx.NodeProto, name: str):
        if node.op_type == "Constant":
            arr = constant_node_value(node)
            return None if arr is None else (arr, arr.dtype, [name])
        if node.op_type == "DequantizeLinear":
            found = self.resolve(node.input[0])
            return Quantized(found[0] if isinstance(found, tuple) else None)
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in FOLDED:
            return self._fold(node, name)
        if node.op_type not in PASS_THROUGH:
            return None
        found = self.resolve(node.input[0])
        if not isinstance(found, tuple):
            return found
        arr, stored, path = found
        if node.op_type == "Cast":
            to = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        elif node.op_type == "Transpose":
            perm = _attr(node, "perm", None)
            arr = arr.transpose(perm)
        return arr, stored, path + [name]


    def _fold(self, node: onnx.NodeProto, name: str):
        """A tensor computed from constants alone (a ConstantOfShape, a Reshape of a
        constant, ...), evaluated by onnx's reference implementation of the node at the
        model's opset; the path holds every tensor of the computation."""
        found = [self.resolve_values(i) if i else None for i in node.input]
        if any(f is not None and not isinstance(f, tuple) for f in found) or \
                any(f is None for i, f in zip(node.input, found) if i):
            return None
        from onnx.reference import ReferenceEvaluator

        try:
            values = ReferenceEvaluator(node, opsets={"": self.opset}).run(
                None, {i: f[0] for i, f in zip(node.input, found) if i})
        except Exception:  # noqa: BLE001 - an op the reference cannot evaluate stays computed
            return None
        arr = np.asarray(values[list(node.output).index(name)])
        path = [t for f in found if f is not None for t in f[2]] + [name]
        stored = next((f[1] for f in found if f is not None and np.dtype(f[1]).kind == "f"), arr.dtype)
        return arr, stored, path


def value_shapes(model: onnx.ModelProto, needed: set[str] = frozenset()) -> dict[str, list]:
    """Shapes known after onnx shape inference (dims are ints, names or None). Where a
    `needed` tensor is left without one (old-opset Shape->Concat->Reshape patterns defeat
    onnx's inference), one ONNX Runtime run on the model's inputs made concrete fills it
    in, and ONNX Runtime's symbolic shape inference after that."""
    from .model import skeleton

    try:  # on the model without its weights' values: inference reads their dims only
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, list] = {}
    for graph in all_graphs(inferred.graph):
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                   for d in t.shape.dim]
    for t in model.graph.initializer:
        shapes.setdefault(t.name, list(t.dims))
    missing = {n for n in needed if n not in shapes}
    if missing:  # the same fallbacks as MAC counting: one ORT run, then symbolic inference
        from . import calibrate, macs

        concrete = calibrate.concrete_shapes(model)
        found = macs.probed_shapes(model, concrete, inferred, missing)
        if missing - set(found):
            found = {**macs.symbolic_shapes(model, concrete), **found}
        for name, shape in found.items():
            shapes.setdefault(name, list(shape))
    return shapes


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """A Layer for every node of a kind in OP_KINDS that carries a weight (or, for the
    candidates, would need one), named as tnonnx.macs names nodes (so per-node costs line up)."""
    nodes = list(iter_nodes(model))
    shapes = value_shapes(model, {n.input[0] for _, n, _ in nodes if n.op_type in CANDIDATE_OPS and n.input})
    scopes: dict[int, Scope] = {}
    base = external.base_dir(model)

    def scope_of(chain) -> Scope:
        parent = None
        for graph in chain:
            if id(graph) not in scopes:
                scopes[id(graph)] = Scope(graph, parent, default_opset(model), base)
            parent = scopes[id(graph)]
        return parent

    layers: list[Layer] = []
    for name, node, chain in nodes:
        describe = OP_KINDS.get(node.op_type) if node.domain in ("", "ai.onnx", "com.microsoft") else None
        if describe is None or (node.domain == "com.microsoft") != (node.op_type in MICROSOFT_OPS):
            continue
        layer = Layer(name, node.op_type, node, chain[-1])
        if describe(layer, scope_of(chain), shapes) is not False:
            layers.append(layer)
            if node.op_type in RECURRENT_OPS:  # R gets a row of its own
                from .recurrent import state_layer

                layers.extend(filter(None, [state_layer(layer, scope_of(chain))]))
    if any(layer.kind == "embedding" for layer in layers):
        from .embedding import link_tied

        link_tied(layers)
    return layers


def _describe(layer: Layer, scope: Scope, shapes: dict) -> None:
    node = layer.node
    consts = [scope.resolve(n) if n else None for n in node.input]
    quantized = next((c for c in consts[:2] if c == "quantized"), None)
    if quantized is not None:
        layer.reason = "weight is quantized (DequantizeLinear)"
        if quantized.array is not None:  # listed with its shape and parameters
            layer.weight, layer.weight_key = quantized.array, f"{layer.op_type}:{id(layer.node)}"
        return
    if node.op_type in ("Conv", "ConvTranspose"):
        _describe_conv(layer, consts, shapes)
    else:
        _describe_dense(layer, consts, shapes)
    _check_weight(layer)


def _check_weight(layer: Layer) -> None:
    if layer.has_weight and layer.reason is None:
        shape = layer.weight_shape
        if np.dtype(layer.compute_dtype) not in [np.dtype(t) for t in FLOAT_TYPES]:
            layer.reason = f"weight dtype {layer.compute_dtype} is not float16/32/64"
        elif layer.kind == "conv" and min(shape[0] // layer.groups, shape[1]) < 2:
            layer.reason = "conv with a single input or output channel per group: nothing to factorise"
        elif min(shape[:2]) < 2:
            layer.reason = "weight has a dimension of size 1"


def _set_weight(layer: Layer, found, weight, signature: str) -> None:
    _, stored, path = found
    layer.compute_dtype = weight.dtype
    layer.store_dtype = stored if np.dtype(stored) in [np.dtype(t) for t in FLOAT_TYPES] else weight.dtype
    layer.weight_path = path
    if isinstance(weight, external.Lazy):  # identified by where it lies, not read
        layer.lazy = weight
        layer.weight_key = f"{signature}:{weight.shape}:{weight.key}"
        return
    layer.weight = weight.astype(np.float64) if weight.dtype.kind == "f" else weight
    digest = hashlib.sha1(np.ascontiguousarray(weight).tobytes()).hexdigest()[:16]
    layer.weight_key = f"{signature}:{weight.shape}:{digest}"


def _describe_dense(layer: Layer, consts, shapes) -> None:
    node = layer.node
    a, b = consts[0], consts[1]
    if layer.op_type == "Gemm":
        alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
        if not isinstance(b, tuple):
            layer.reason = "no constant weight (Gemm's B is computed)"
            return
        w = b[0].T if _attr(node, "transB", 0) else b[0]
        _set_weight(layer, b, (w * alpha).astype(w.dtype) if alpha != 1.0 else w, "dense")
        layer.x, layer.trans_x = node.input[0], bool(_attr(node, "transA", 0))
        layer.x_shape = [None, None]
        if len(node.input) > 2 and node.input[2]:
            c = consts[2]
            if isinstance(c, tuple):
                layer.bias, layer.bias_path = np.asarray(c[0], np.float64) * beta, c[2]
            else:
                layer.bias_input, layer.beta = node.input[2], beta
        layer.kind = "dense"
        return
    # MatMul
    if isinstance(b, tuple):
        w, found, x, side = b[0], b, node.input[0], "right"
    elif isinstance(a, tuple):
        w, found, x, side = a[0], a, node.input[1], "left"
    else:
        layer.reason = "no constant weight: both inputs are computed (e.g. attention)"
        return
    if w.ndim != 2:
        layer.reason = f"constant operand is {w.ndim}-D, not a 2-D weight"
        return
    layer.x, layer.x_shape = x, shapes.get(x)
    if layer.x_shape is None:
        layer.reason = "rank of the activation is unknown (shape inference failed)"
        return
    _set_weight(layer, found, w if side == "right" else w.T, f"dense-{side}")
    # W @ x with a 1-D x is x @ W^T: no transposes needed around the chain
    layer.side = "right" if len(layer.x_shape) == 1 else side
    layer.kind = "dense"


def _describe_conv(layer: Layer, consts, shapes) -> None:
    node = layer.node
    found = consts[1]
    if not isinstance(found, tuple):
        layer.reason = "conv weight is computed, not constant"
        return
    layer.groups = _attr(node, "group", 1)
    transposed = node.op_type == "ConvTranspose"
    # the canonical kernel is a Conv's (out, in/group, k...); a ConvTranspose stores (in, out/group, k...)
    kernel = flip_kernel(np.asarray(found[0]), layer.groups) if transposed else found[0]
    found = (kernel,) + tuple(found[1:])
    if layer.groups != 1 and kernel.shape[1] == 1:
        _set_weight(layer, found, found[0], "conv")  # left alone, but its shape and parameters are reported
        layer.reason = f"depthwise conv (group={layer.groups}): one input channel per filter, nothing to factorise"
        return
    if len(node.input) > 2 and node.input[2]:
        if not isinstance(consts[2], tuple):
            layer.reason = "conv bias is computed, not constant"
            return
        layer.bias, layer.bias_path = np.asarray(consts[2][0], np.float64), consts[2][2]
    _set_weight(layer, found, found[0], "conv-transpose" if transposed else "conv")
    layer.x = node.input[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
             if a.name in ("strides", "pads", "dilations", "auto_pad", "output_padding", "output_shape")}
    if isinstance(attrs.get("auto_pad"), bytes):
        attrs["auto_pad"] = attrs["auto_pad"].decode()
    in_shape, out_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
    spatial = lambda s: tuple(s[2:]) if s and all(isinstance(v, int) and v > 0 for v in s[2:]) else None
    layer.geometry = ConvGeometry(tuple(found[0].shape[2:]), attrs, spatial(in_shape), spatial(out_shape),
                                  transposed=transposed)
    layer.x_shape = in_shape
    layer.kind = "conv"


def _left_alone(reason: str, inputs: tuple[int, ...] = (1,), table: bool = False):
    """A describer for nodes tnonnx lists but does not rewrite (yet): the constants at
    `inputs` are the weight (the first) and the node's other weights; `table`: only a
    float table of rank >= 2 is a weight (an embedding; a Gather of shape constants is
    no layer). Nodes without a constant weight get no row when `table`, else the reason."""

    def describe(layer: Layer, scope: Scope, shapes: dict):
        found = [scope.resolve_values(layer.node.input[i]) if i < len(layer.node.input) and layer.node.input[i] else None
                 for i in inputs]
        arrays = [f[0] for f in found if isinstance(f, tuple)]
        if table and not (arrays and isinstance(found[0], tuple) and arrays[0].ndim >= 2
                          and arrays[0].dtype.kind == "f"):
            return False
        if arrays and isinstance(found[0], tuple):
            layer.weight, layer.other_weights = arrays[0], arrays[1:]
            layer.weight_key = f"{layer.op_type}:{id(layer.node)}"
        layer.reason = reason

    return describe


def _describe_recurrent(layer: Layer, scope: Scope, shapes: dict):
    from . import recurrent

    recurrent.describe(layer, scope, shapes)
    _check_weight(layer)


def _describe_embedding(layer: Layer, scope: Scope, shapes: dict):
    """A Gather of rows from a constant 2-D float table (axis 0, computed indices); other
    Gathers (shapes, indices) are no layer."""
    node = layer.node
    if len(node.input) < 2 or _attr(node, "axis", 0) not in (0, -2):
        return False
    found = scope.resolve_values(node.input[0])
    if not isinstance(found, tuple) or found[0].ndim != 2 or found[0].dtype.kind != "f" \
            or isinstance(scope.resolve(node.input[1]), tuple):
        return False
    from . import embedding

    embedding.describe(layer, found, shapes.get(node.input[1]))
    _check_weight(layer)


# What find_layers does with each op type: the candidates are described for rewriting, the
# others listed with the reason they are left alone. A new kind of layer plugs in here.
OP_KINDS = {op: _describe for op in CANDIDATE_OPS}
OP_KINDS.update({
    "LSTM": _describe_recurrent, "GRU": _describe_recurrent, "RNN": _describe_recurrent,
    "Gather": _describe_embedding,
    "Einsum": _left_alone("Einsum is not rewritten yet", (1, 0)),
    "MatMulInteger": _left_alone("already quantized", (1,)),
    "ConvInteger": _left_alone("already quantized", (1,)),
    "QLinearMatMul": _left_alone("already quantized", (3,)),
    "QLinearConv": _left_alone("already quantized", (3,)),
    "MatMulNBits": _left_alone("already quantized", (1,)),
    "DynamicQuantizeMatMul": _left_alone("already quantized", (1,)),
})
MICROSOFT_OPS = ("MatMulNBits", "DynamicQuantizeMatMul")  # kinds of the com.microsoft domain
