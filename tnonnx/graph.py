"""Finding the layers to rewrite and putting their replacements in place.

A Layer is a MatMul/Gemm/Conv node with everything needed to factorise it: the weight in
a canonical form (dense: N x M acting as y = x W; conv: T x S x k...), where it came
from, and how the node uses it. Weights are found as initializers or Constant nodes,
through Identity/Cast/Transpose, in the node's own graph or an enclosing one (If/Loop
bodies may use outer-scope initializers). Nodes that cannot be rewritten become Layers
with a `reason`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import external
from .formats.base import ConvGeometry
from .macs import all_graphs, iter_nodes, subgraphs

CANDIDATE_OPS = ("MatMul", "Gemm", "Conv")
QUANTIZED_OPS = ("MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger", "MatMulNBits", "DynamicQuantizeMatMul")
OTHER_LINEAR_OPS = ("ConvTranspose", "Einsum")
FLOAT_TYPES = (np.float16, np.float32, np.float64)
PASS_THROUGH = ("Identity", "Cast", "Transpose")


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
    groups: int = 1  # conv group count; each group is factorised on its own
    weight_path: list[str] = field(default_factory=list)  # tensors between the constant and the node
    lazy: external.Lazy | None = None  # the weight while still in its data file

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.lazy is not None:
            return tuple(self.lazy.shape)
        return tuple(self.weight.shape) if self.weight is not None else ()

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape)) if self.weight_shape else 0

    @property
    def has_weight(self) -> bool:
        return self.lazy is not None or self.weight is not None

    def release(self) -> None:
        """Let go of a weight read from a data file (it is read again if needed)."""
        if self.lazy is not None:
            self.__dict__["_weight"] = None

    @property
    def batch_rank(self) -> int:
        """Leading axes of x carried through a dense chain."""
        return len(self.x_shape) - 1 if self.x_shape is not None else 1


class Scope:
    """Constants and producers visible from one graph (its own, then its parents')."""

    def __init__(self, graph: onnx.GraphProto, parent: "Scope | None" = None, base: str | None = None):
        self.graph, self.parent, self.base = graph, parent, base
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

    def _through(self, node: onnx.NodeProto, name: str):
        if node.op_type == "Constant":
            arr = _constant_value(node)
            return None if arr is None else (arr, arr.dtype, [name])
        if node.op_type == "DequantizeLinear":
            return "quantized"
        if node.op_type not in PASS_THROUGH or node.domain not in ("", "ai.onnx"):
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


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(a), dtype=np.float32)
        if a.name in ("value_int", "value_ints"):
            return np.asarray(onnx.helper.get_attribute_value(a), dtype=np.int64)
    return None


def value_shapes(model: onnx.ModelProto, needed: set[str] = frozenset()) -> dict[str, list]:
    """Shapes known after onnx shape inference (dims are ints, names or None). Where a
    `needed` tensor is left without one (old-opset Shape->Concat->Reshape patterns defeat
    onnx's inference), one ONNX Runtime run on the model's inputs made concrete fills it
    in, and ONNX Runtime's symbolic shape inference after that."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
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
    """Every MatMul/Gemm/Conv (and quantized or unsupported linear op) in the model, named
    as tnonnx.macs names nodes (so per-node costs line up)."""
    nodes = list(iter_nodes(model))
    shapes = value_shapes(model, {n.input[0] for _, n, _ in nodes if n.op_type in CANDIDATE_OPS and n.input})
    scopes: dict[int, Scope] = {}
    base = external.base_dir(model)

    def scope_of(chain) -> Scope:
        parent = None
        for graph in chain:
            if id(graph) not in scopes:
                scopes[id(graph)] = Scope(graph, parent, base)
            parent = scopes[id(graph)]
        return parent

    layers: list[Layer] = []
    for name, node, chain in nodes:
        if node.domain not in ("", "ai.onnx", "com.microsoft"):
            continue
        graph = chain[-1]
        if node.op_type in QUANTIZED_OPS:
            layers.append(Layer(name, node.op_type, node, graph, reason="already quantized"))
        elif node.op_type in OTHER_LINEAR_OPS:
            layers.append(Layer(name, node.op_type, node, graph, reason=f"{node.op_type} is not rewritten yet"))
        elif node.op_type in CANDIDATE_OPS and node.domain in ("", "ai.onnx"):
            layer = Layer(name, node.op_type, node, graph)
            _describe(layer, scope_of(chain), shapes)
            layers.append(layer)
    return layers


def _describe(layer: Layer, scope: Scope, shapes: dict) -> None:
    node = layer.node
    consts = [scope.resolve(n) if n else None for n in node.input]
    if any(c == "quantized" for c in consts[:2]):
        layer.reason = "weight is quantized (DequantizeLinear)"
        return
    if node.op_type == "Conv":
        _describe_conv(layer, consts, shapes)
    else:
        _describe_dense(layer, consts, shapes)
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
                layer.bias = np.asarray(c[0], np.float64) * beta
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
    if layer.groups != 1 and found[0].shape[1] == 1:
        _set_weight(layer, found, found[0], "conv")  # left alone, but its shape and parameters are reported
        layer.reason = f"depthwise conv (group={layer.groups}): one input channel per filter, nothing to factorise"
        return
    if len(node.input) > 2 and node.input[2]:
        if not isinstance(consts[2], tuple):
            layer.reason = "conv bias is computed, not constant"
            return
        layer.bias = np.asarray(consts[2][0], np.float64)
    _set_weight(layer, found, found[0], "conv")
    layer.x = node.input[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
             if a.name in ("strides", "pads", "dilations", "auto_pad")}
    if isinstance(attrs.get("auto_pad"), bytes):
        attrs["auto_pad"] = attrs["auto_pad"].decode()
    in_shape, out_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
    spatial = lambda s: tuple(s[2:]) if s and all(isinstance(v, int) and v > 0 for v in s[2:]) else None
    layer.geometry = ConvGeometry(tuple(found[0].shape[2:]), attrs, spatial(in_shape), spatial(out_shape))
    layer.x_shape = in_shape
    layer.kind = "conv"


# ----------------------------------------------------------------------- replacement


def replace_nodes(model: onnx.ModelProto, replacements: dict[int, tuple[onnx.GraphProto, list, list]],
                  layers: list[Layer]) -> None:
    """Swap each replaced node (keyed by id(node)) for its new nodes, in place and order;
    new initializers go to the main graph (visible from every subgraph). Then remove the
    weight constants and pass-through nodes that nothing uses any more."""
    by_graph: dict[int, tuple[onnx.GraphProto, dict]] = {}
    for key, (graph, nodes, inits) in replacements.items():
        by_graph.setdefault(id(graph), (graph, {}))[1][key] = nodes
        model.graph.initializer.extend(inits)
    for graph, table in by_graph.values():
        new_nodes = []
        for node in graph.node:
            new_nodes.extend(table.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(new_nodes)
    orphans = {t for layer in layers if id(layer.node) in replacements for t in layer.weight_path}
    _remove_unused(model.graph, orphans)
    _declare_domains(model, [n for _, nodes, _ in replacements.values() for n in nodes])


def _declare_domains(model: onnx.ModelProto, nodes) -> None:
    """An opset import (version 1) for each custom domain the new nodes use and the model
    does not import yet (tnonnx's custom ops, --emit custom)."""
    known = {imp.domain for imp in model.opset_import}
    for node in nodes:
        if node.domain not in known and node.domain not in ("", "ai.onnx"):
            model.opset_import.add(domain=node.domain, version=1)
            known.add(node.domain)


def _used_names(graph: onnx.GraphProto, acc: set) -> set:
    for n in graph.node:
        acc.update(n.input)
        for g in subgraphs(n):
            _used_names(g, acc)
            acc.update(o.name for o in g.output)
    acc.update(o.name for o in graph.output)
    return acc


def _remove_unused(root: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop initializers and nodes producing only `candidates` tensors once unused."""
    while True:
        used = _used_names(root, set())
        dead = {c for c in candidates if c not in used}
        if not dead:
            return
        changed = False
        for graph in all_graphs(root):
            keep = [t for t in graph.initializer if t.name not in dead]
            if len(keep) != len(graph.initializer):
                del graph.initializer[:]
                graph.initializer.extend(keep)
                changed = True
            nodes = [n for n in graph.node if not (n.output and all(o in dead for o in n.output))]
            if len(nodes) != len(graph.node):
                del graph.node[:]
                graph.node.extend(nodes)
                changed = True
            vis = [v for v in graph.value_info if v.name not in dead]
            if len(vis) != len(graph.value_info):
                del graph.value_info[:]
                graph.value_info.extend(vis)
        candidates = candidates - dead
        if not changed:
            return
