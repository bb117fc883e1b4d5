"""Parameters and multiply-accumulates (MACs) of an ONNX model, counted by tnonnx itself
(onnxsim counts Einsum as 0 MACs; onnx-tool crashes on multi-operand Einsum).

MACs per run at the given input shapes:
- MatMul (numpy semantics: 1-D operands, broadcast batch dims): prod(batch) * M * K * N;
  MatMulInteger and QLinearMatMul alike. Gemm: M * K * N (the bias add is no MAC).
- Conv (also ConvInteger, QLinearConv): N * C_out * prod(out spatial) * C_in/group *
  prod(kernel). ConvTranspose: N * C_in * prod(in spatial) * C_out/group * prod(kernel).
- LSTM, GRU, RNN: seq * batch * (elements of W + elements of R), all directions and
  gates (the gate nonlinearities and elementwise products are not MACs).
- Einsum, any number of operands, implicit output and ``...`` included: evaluated pairwise
  left to right, each step costing the product of the sizes of all distinct indices of its
  two operands (a one-operand Einsum costs 0). That is the order the graph states, not
  necessarily the cheapest.
- Everything else costs 0: elementwise ops, reductions, pooling, normalisation and softmax
  do adds, compares or divides, not multiply-accumulates. Ops of other domains cost 0
  unless a counter is registered in ``COUNTERS`` (tnonnx.macs_ops).
- Nodes ONNX Runtime constant-folds at session load (deterministic, ONNX or com.microsoft
  domain, no subgraph, all inputs from initializers or Constant nodes, transitively) cost
  0 and stay in ``per_node`` with 0: a layer that rebuilds its weight from cores in-graph
  is free at run time. (ORT also folds Shape of static tensors; not modelled, and it only
  reaches nodes that cost 0 here.)
- Nodes inside If/Loop/Scan bodies: an If counts the branch that runs (its condition is
  constant, or read off one ONNX Runtime run on the inputs), else the larger branch; a
  Scan body counts once per step of its scanned axis, a Loop body once per iteration of a
  constant trip count (else once). ``notes`` says which, per node; ``per_node`` keeps each
  node's own cost per run of its graph, scaled by the trip counts of Scan/Loop bodies
  around it.

Shapes: graph inputs are fixed to ``input_shapes`` and ``onnx.shape_inference`` runs with
data propagation; if a MAC op still lacks a shape, ONNX Runtime's SymbolicShapeInference
is tried; a node whose shape is still unknown goes to ``ModelCost.unknown`` (and not into
``per_node`` or ``total``) rather than being guessed.

``params``: elements of every float-typed initializer or Constant tensor (float16/bfloat16/
float/double/float8...), subgraphs included; integer tensors are shapes or indices, so the
int8 weights of a quantized model are not counted. ``param_bytes``: storage of every
initializer and Constant tensor, any dtype.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from tnonnx.errors import TnonnxError
from .macs_ops import COUNTERS, Shape

FLOAT_TYPES = {v for k, v in TensorProto.DataType.items() if k.startswith(("FLOAT", "BFLOAT", "DOUBLE"))}
_NONDETERMINISTIC = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike",
                     "Multinomial", "Bernoulli"}
_FOLDABLE_DOMAINS = {"", "ai.onnx", "com.microsoft"}
_STRIP_ABOVE = 64  # float tensors larger than this lose their data in the shape-inference copy


@dataclass
class ModelCost:
    """``per_node``: node key (see ``iter_nodes``) -> MACs, every node whose cost is known;
    ``total``: their sum; ``unknown``: keys of MAC ops left out for lack of shapes."""

    per_node: dict[str, int] = field(default_factory=dict)
    total: int = 0
    unknown: list[str] = field(default_factory=list)
    params: int = 0
    param_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # how If/Loop/Scan bodies were counted


def macs_of(cost: ModelCost, names: Iterable[str]) -> int:
    """Sum of ``per_node`` over ``names``; KeyError for a name not counted (or unknown)."""
    return sum(cost.per_node[n] for n in names)


# ---------------------------------------------------------------- model walking

def subgraphs(node) -> list[onnx.GraphProto]:
    return [g for a in node.attribute
            for g in ([a.g] if a.type == AttributeProto.GRAPH else
                      list(a.graphs) if a.type == AttributeProto.GRAPHS else [])]


def _walk(graph, chain=()) -> Iterator[tuple[onnx.NodeProto, tuple[onnx.GraphProto, ...]]]:
    chain = chain + (graph,)
    for node in graph.node:
        yield node, chain
        for g in subgraphs(node):
            yield from _walk(g, chain)


def all_graphs(graph) -> list[onnx.GraphProto]:
    """``graph`` and all its subgraphs, at any depth."""
    return [graph] + [g for node, _ in _walk(graph) for g in subgraphs(node)]


def tensor_index(graph: onnx.GraphProto):
    """(producer, consumers) of a graph's tensors (node objects); what a node's subgraphs read from
    the outer scope (at any depth) counts as read by the node."""
    producer, consumers = {}, {}
    for node in graph.node:
        for o in node.output:
            producer[o] = node
        reads = set(node.input)
        for sub in (g for top in subgraphs(node) for g in all_graphs(top)):
            reads.update(i for inner in sub.node for i in inner.input)
        for i in reads:
            consumers.setdefault(i, []).append(node)
    return producer, consumers


def other_input(node, name: str) -> str | None:
    """The input of a two-input node that is not `name` (None when both are, or neither)."""
    rest = [i for i in node.input if i != name]
    return rest[0] if len(node.input) == 2 and len(rest) == 1 else None


def constant_names(graph: onnx.GraphProto) -> set[str]:
    """The graph's initializers and Constant nodes' outputs."""
    return {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node (a tensor, or value_float(s)/value_int(s)); None for the
    other forms (strings, sparse)."""
    if any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        return None
    tensor = _constant_tensor(node)
    return None if tensor is None else numpy_helper.to_array(tensor)


# ops folded when all their inputs are constant (and small), to see the constants they make
FOLDABLE = {"Cast", "Sqrt", "Div", "Mul", "Add", "Sub", "Neg", "Reciprocal", "Pow"}
FOLD_LIMIT = 1 << 16
FOLD_DEPTH = 8  # ops between a folded value and its constants, at most (keeps the recursion short)


def constant_values(graph: onnx.GraphProto, producer, exclude=frozenset()):
    """value(name): the tensor's value when it is constant (an initializer, a Constant node,
    or computed from those alone: the GELU constants tnonnx emits are Casts and a Sqrt of
    scalars), else None. `producer`: tensor_index(graph)[0]; initializers named in `exclude`
    (trained ones, say) do not count as constants."""
    initializers = {t.name: t for t in graph.initializer if t.name not in exclude}
    memo: dict[str, np.ndarray | None] = {}

    def value(name: str, depth: int = 0):
        if name not in memo:
            if depth > FOLD_DEPTH:  # (not memoised: nearer its constants it may still fold)
                return None
            memo[name] = None  # (a cycle is not a constant)
            memo[name] = _value(name, depth)
        return memo[name]

    def _value(name: str, depth: int):
        if name in initializers:
            tensor = initializers[name]
            # (a weight still in its data file is not read for this)
            return None if tensor.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(tensor)
        node = producer.get(name)
        if node is None or len(node.output) != 1:
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        if node.op_type not in FOLDABLE:
            return None
        inputs = [value(i, depth + 1) for i in node.input]
        if any(v is None for v in inputs) or sum(v.size for v in inputs) > FOLD_LIMIT:
            return None
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(node).run(None, dict(zip(node.input, inputs)))[0]

    return value


def iter_nodes(model: onnx.ModelProto):
    """(key, node, graphs) for every node, subgraphs included (right after their owner).

    ``key`` is the node's name, or ``<op_type>#<index>`` for an unnamed node (and
    ``<name>#<index>`` for a repeated name), index counting nodes in this order;
    ``graphs`` is the chain of graphs from the main graph to the one holding the node.
    """
    seen = set()
    for i, (node, chain) in enumerate(_walk(model.graph)):
        key = node.name if node.name and node.name not in seen else f"{node.name or node.op_type}#{i}"
        seen.add(key)
        yield key, node, chain


def _shape(type_proto) -> Shape:
    t = type_proto.tensor_type
    if not type_proto.HasField("tensor_type") or not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return None if None in dims else tuple(dims)


def _constant_tensor(node) -> TensorProto | None:
    """The tensor a Constant node holds (a sparse one: its stored values)."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "sparse_value":
            return a.sparse_tensor.values
        if a.name.startswith("value_"):
            kind = a.name[len("value_"):].rstrip("s")  # float, int, string
            v = onnx.helper.get_attribute_value(a)
            return onnx.numpy_helper.from_array(
                np.asarray(v, {"float": np.float32, "int": np.int64}.get(kind, object)))
    return None


def _tensors(graph) -> Iterator[TensorProto]:
    """Initializers and Constant tensors of ``graph`` (not of its subgraphs)."""
    yield from graph.initializer
    yield from (t.values for t in graph.sparse_initializer)
    for node in graph.node:
        if node.op_type == "Constant" and (t := _constant_tensor(node)) is not None:
            yield t


class _Scope:
    """Shapes and constant values of one graph, falling back to the enclosing graph."""

    def __init__(self, graph, parent: _Scope | None, fallback: dict[str, Shape]):
        self.parent, self.fallback = parent, fallback
        inputs = {i.name for i in graph.input}
        inits = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
        self.const = inits - inputs
        self.defined = inputs | inits
        self.defined |= {o for n in graph.node for o in n.output}
        self.shapes: dict[str, Shape] = {}
        for vi in (*graph.input, *graph.output, *graph.value_info):
            self.shapes[vi.name] = _shape(vi.type)
        for t in graph.initializer:
            self.shapes[t.name] = tuple(t.dims)

    def shape(self, name: str) -> Shape:
        s = self.shapes.get(name)
        if s is None and name not in self.defined and self.parent is not None:
            s = self.parent.shape(name)
        return s if s is not None else self.fallback.get(name)

    def is_const(self, name: str) -> bool:
        if name == "" or name in self.const:
            return True
        return name not in self.defined and self.parent is not None and self.parent.is_const(name)


def folded_outputs(graph: onnx.GraphProto) -> set[str]:
    """The outputs of `graph`'s own nodes that ONNX Runtime constant-folds at session load
    (the module docstring's rule, without subgraphs): free at run time."""
    scope = _Scope(graph, None, {})
    out: set[str] = set()
    for node in graph.node:
        if _foldable(node, scope):
            scope.const.update(node.output)
            out.update(node.output)
    return out


def _foldable(node, scope: _Scope) -> bool:
    return (node.domain in _FOLDABLE_DOMAINS and node.op_type not in _NONDETERMINISTIC
            and not subgraphs(node) and all(scope.is_const(i) for i in node.input))


def _count_macs(model, fallback: dict[str, Shape], cost: ModelCost) -> list[str]:
    """Fill cost.per_node; return the keys of MAC ops whose shapes are unknown."""
    scopes: dict[int, _Scope] = {}
    unknown = []
    for key, node, chain in iter_nodes(model):
        g = chain[-1]
        if id(g) not in scopes:
            scopes[id(g)] = _Scope(g, scopes[id(chain[-2])] if len(chain) > 1 else None, fallback)
        scope = scopes[id(g)]
        counter = COUNTERS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
        if _foldable(node, scope):
            scope.const.update(node.output)
            cost.per_node[key] = 0
        elif counter is None:
            cost.per_node[key] = 0
        else:
            macs = counter(node, [scope.shape(i) for i in node.input],
                           [scope.shape(o) for o in node.output])
            if macs is None:
                unknown.append(key)
            else:
                cost.per_node[key] = int(macs)
    return unknown


# ---------------------------------------------------------------- shape inference

def _with_inputs(model, input_shapes, strip: bool) -> onnx.ModelProto:
    from .model import skeleton

    if strip:  # shape inference needs only the dims of big float tensors; stays under 2 GB
        m = skeleton(model, _STRIP_ABOVE)
    else:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    inputs = {i.name: i for i in m.graph.input}
    for name, dims in input_shapes.items():
        if name not in inputs:
            raise TnonnxError(f"input_shapes names {name!r}, which is not an input of the model "
                              f"(inputs: {', '.join(inputs)})")
        shape = inputs[name].type.tensor_type.shape
        if len(shape.dim) not in (0, len(dims)):
            raise TnonnxError(f"input {name!r} has rank {len(shape.dim)}, given shape {tuple(dims)}")
        shape.ClearField("dim")
        for d in dims:
            shape.dim.add().dim_value = int(d)
    return m


def probed_shapes(model, input_shapes, inferred: onnx.ModelProto, names: set[str]) -> dict[str, Shape]:
    """Shapes of main-graph tensors `names` read off one ONNX Runtime run on random
    inputs of `input_shapes` (their dtypes come from `inferred`). Exact for shape
    arithmetic that onnx's inference gives up on (Slice of a Shape, broadcasting with an
    unknown dim); empty if the run fails."""
    return {n: shape for n, (shape, _) in _probe(model, input_shapes, inferred, names).items()}


def _probe(model, input_shapes, inferred: onnx.ModelProto, names) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of main-graph tensors `names` from one ONNX Runtime run (probed_shapes)."""
    from . import calibrate, runtime

    # graph inputs keep the shapes the caller gave (a symbolic one stays unknown, not guessed)
    m, wanted = runtime.with_outputs(model, sorted(names), inferred, inputs=False)
    if not wanted:
        return {}
    try:
        sess = runtime.session(m, optimize=False)
        outputs = sess.run(wanted, calibrate.random_feeds(model, shapes=input_shapes))
    except Exception:  # noqa: BLE001 - a fallback that fails leaves the nodes unknown
        return {}
    return {n: (tuple(o.shape), o.dtype) for n, o in zip(wanted, outputs)}


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's shape inference, with data propagation when it gets through."""
    for data_prop in (True, False):
        try:
            return onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
        except Exception:  # noqa: BLE001 - a graph onnx rejects may still pass ORT's tool
            pass
    return model


class TensorShapes:
    """Concrete shapes of a model's main-graph tensors at `input_shapes`, found once for the
    whole rewrite: onnx's inference (weights stripped), then, for what it leaves open, one
    ONNX Runtime run exposing together the tensors of the MAC ops (for count) and `extra`
    (the rewritten layers' inputs, for their one-layer timing models). A rewritten model
    keeps the original's tensors, so count() of it starts from these shapes too."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], extra=()):
        self.model, self.input_shapes = model, input_shapes
        self._main = {o for n in model.graph.node for o in n.output} | set(input_shapes)
        self.inferred = _infer(_with_inputs(model, input_shapes, strip=True))
        graph = self.inferred.graph
        self._types = {vi.name: vi.type.tensor_type for vi in (*graph.value_info, *graph.input, *graph.output)}
        unknown = _count_macs(self.inferred, {}, ModelCost())
        wanted = {t for key, node, _ in iter_nodes(self.inferred) if key in unknown for t in (*node.input, *node.output)
                  if t}
        control_flow = any(subgraphs(n) for n in model.graph.node)  # the run says which tensors it carries
        wanted |= {t for t in extra if t and (control_flow or self._inferred(t) is None)}
        self.probed = _probe(model, input_shapes, self.inferred, wanted) if wanted else {}

    def _inferred(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        t = self._types.get(name)
        if t is None or not t.elem_type or not t.HasField("shape"):
            return None
        shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim)
        if any(d <= 0 for d in shape):
            return None
        return shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))

    def spec(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """(shape, dtype) of a main-graph tensor, None when neither inference nor the run
        gave it (inside a subgraph, or the run failed)."""
        main = name in self._main
        return self.probed.get(name) or (self._inferred(name) if main else None)

    @property
    def shapes(self) -> dict[str, Shape]:
        return {n: shape for n, (shape, _) in self.probed.items()}


@contextlib.contextmanager
def _scratch_cwd():
    """Run in a temporary working directory (removed afterwards)."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="tnonnx-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(before)


def symbolic_shapes(model, input_shapes) -> dict[str, Shape]:
    """Shapes from ORT's symbolic shape inference, over all graphs; a name with two
    different shapes (in two subgraphs) is dropped. Empty if the tool fails."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        with _scratch_cwd():  # when incomplete it saves sym_shape_infer_temp.onnx (+ data) in the cwd
            inferred = SymbolicShapeInference.infer_shapes(
                _with_inputs(model, input_shapes, strip=False), auto_merge=True)
    except Exception:  # noqa: BLE001 - a fallback that fails leaves the nodes unknown
        return {}
    if inferred is None:
        return {}
    shapes: dict[str, Shape] = {}
    clashes = set()
    for g in all_graphs(inferred.graph):
        for vi in (*g.input, *g.output, *g.value_info):
            s = _shape(vi.type)
            if vi.name in shapes and shapes[vi.name] != s:
                clashes.add(vi.name)
            shapes[vi.name] = s
    return {k: v for k, v in shapes.items() if k not in clashes and v is not None}


# ---------------------------------------------------------------- entry point

def parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """(float parameters, bytes of all initializers and Constant tensors), subgraphs included."""
    params = nbytes = 0
    for g in all_graphs(model.graph):
        for t in _tensors(g):
            n = math.prod(t.dims)
            if t.data_type in FLOAT_TYPES:
                params += n
            nbytes += _nbytes(t, n)
    return params, nbytes


def count(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
          known: TensorShapes | None = None) -> ModelCost:
    """Parameters and MACs of ``model`` run once on inputs of ``input_shapes``.

    ``input_shapes`` maps graph input names to concrete shapes (the caller resolves
    symbolic dimensions; inputs not named keep the shapes the model declares).
    ``known``: the shapes found for this model, or for the model it was rewritten from
    (the same inputs), so that no second run is needed for them.
    """
    cost = ModelCost()
    cost.params, cost.param_bytes = parameters(model)

    if known is not None and known.model is model and known.input_shapes == input_shapes:
        m, probed = known.inferred, known.shapes
    else:
        m, probed = _with_inputs(model, input_shapes, strip=True), {}
        if known is not None:  # the original's tensors, given their shapes before inferring the rest
            _seed_shapes(m.graph, known.probed)
        m = _infer(m)
    unknown = _count_macs(m, probed, cost)
    if unknown:  # first one run of the model itself (fast), then ORT's symbolic inference
        names = {t for key, node, _ in iter_nodes(m) if key in unknown for t in (*node.input, *node.output) if t}
        probed = probed_shapes(model, input_shapes, m, names)
        cost.per_node.clear()
        unknown = _count_macs(m, probed, cost)
    if unknown:
        cost.per_node.clear()
        unknown = _count_macs(m, symbolic_shapes(model, input_shapes), cost)
    cost.unknown = unknown
    from .macs_bodies import weigh_subgraphs

    cost.total = weigh_subgraphs(model, m, input_shapes, cost)
    return cost


def _seed_shapes(graph: onnx.GraphProto, specs: dict[str, tuple]) -> None:
    """Write the (shape, dtype) of intermediate tensors into `graph.value_info`, replacing
    what is there for them."""
    produced = {o for n in graph.node for o in n.output} - {o.name for o in graph.output}
    specs = {name: spec for name, spec in specs.items() if name in produced}
    kept = [vi for vi in graph.value_info if vi.name not in specs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    graph.value_info.extend(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(dtype),
                                                               list(shape)) for name, (shape, dtype) in specs.items())


def _nbytes(t: TensorProto, n: int) -> int:
    if t.data_type == TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    name = TensorProto.DataType.Name(t.data_type)  # sub-byte types are packed
    bits = {"INT4": 4, "INT2": 2, "E2M1": 4, "E2M3": 6, "E3M2": 6}.get(name[-4:])
    if bits:
        return (n * bits + 7) // 8
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
