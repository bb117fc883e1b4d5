"""Per-layer timing: each candidate replacement of a layer timed as a one-layer onnxruntime
model fed an input of the layer's real shape at the deployment shape, beside the dense
layer, through latency.Clock (so cached); the cost model prunes hopeless candidates first."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from . import calibrate, macs
from .graph import Layer
from .latency import Clock, Deployment, predict


def layer_feeds(model: onnx.ModelProto, layers: list[Layer], deployment: Deployment,
                shapes: macs.TensorShapes | None = None) -> dict[str, dict]:
    """Per layer name, random feeds of the layer's real input shapes at the deployment shape
    ({"x": ..., "c": ... for a computed Gemm bias}): from `shapes` (the model's tensor shapes
    at the deployment shape, found by onnx's inference or else one run with those tensors
    exposed; made here when not given). Layers inside subgraphs, or a model that does not
    run on random inputs, get none (their times are then predicted from shapes alone)."""
    wanted = [t for layer in layers for t in (layer.x, layer.bias_input) if t]
    if shapes is None:
        try:
            concrete = calibrate.concrete_shapes(model, deployment.batch, deployment.shape_map)
            shapes = macs.TensorShapes(model, concrete, extra=wanted)
        except Exception:  # noqa: BLE001 - timing then falls back to predictions
            return {}
    values = {name: spec for name in wanted if (spec := shapes.spec(name)) is not None}
    rng = np.random.default_rng(0)
    out = {}
    for layer in layers:
        if layer.x not in values or (layer.bias_input and layer.bias_input not in values):
            continue
        if layer.kind == "recurrent":  # its node needs more than x: predicted from shapes
            continue
        shape, dtype = values[layer.x]
        if layer.kind == "embedding":  # row indices of the table
            feed = {"x": rng.integers(0, layer.weight_shape[0], shape).astype(dtype)}
        else:
            feed = {"x": rng.standard_normal(shape).astype(dtype)}
        if layer.bias_input:
            shape, dtype = values[layer.bias_input]
            feed["c"] = rng.standard_normal(shape).astype(dtype)
        out[layer.name] = feed
    return out


def canonical(layer: Layer) -> Layer:
    """The layer as a one-layer model sees it: input x (and c), output y."""
    node = onnx.NodeProto()
    node.CopyFrom(layer.node)
    node.output[0] = "y"
    return dataclasses.replace(layer, node=node, x="x", bias_input="c" if layer.bias_input else None)


def one_layer_model(layer: Layer, nodes, initializers, feeds: dict, opset: int) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for name, v in feeds.items()]
    graph = helper.make_graph(list(nodes), "layer", inputs, [helper.make_tensor_value_info("y", _dtype(layer), None)],
                              list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 13))],
                             ir_version=min(onnx.IR_VERSION, 9))


def layer_model(layer: Layer, fact, emission: str, feeds: dict, emit, opset: int) -> onnx.ModelProto:
    """The one-layer model of `layer` (dense when `fact` is None) in `emission`."""
    from .emit import Builder

    layer = canonical(layer)
    builder = Builder("L", layer.store_dtype, layer.compute_dtype)
    if fact is None:
        dense_nodes(layer, builder)
    else:
        emit(builder, layer, fact, emission)
    return one_layer_model(layer, builder.nodes, builder.initializers, feeds, opset)


def dense_nodes(layer: Layer, builder) -> None:
    """The original layer, as the fastest standard form of its op (MatMul, Conv)."""
    from .emit import conv_node
    from .formats.base import flip_kernel

    if layer.kind == "conv":
        w, op = layer.weight, "Conv"
        if layer.geometry.transposed:
            w, op = flip_kernel(w, layer.groups), "ConvTranspose"
        if layer.groups > 1:
            attrs = dict(layer.geometry.spatial_attrs(), group=layer.groups)
        else:
            attrs = layer.geometry.spatial_attrs()
        conv_node(builder, layer.x, w, "conv", bias=layer.bias, attrs=attrs, output=layer.node.output[0], op=op)
        return
    if layer.kind == "embedding":
        builder.op("Gather", [builder.weight(layer.weight, "w"), layer.x], "gather", output=layer.node.output[0])
        return
    if layer.kind == "tied":  # h @ table^T
        y = builder.op("MatMul", [layer.x, builder.weight(layer.weight.T, "w")], "matmul")
        if layer.bias is not None:
            y = builder.op("Add", [y, builder.cast(builder.constant(layer.bias, "bias"))], "bias")
        builder.rename_output(layer.node.output[0])
        return
    x = layer.x
    if layer.trans_x:
        x = builder.op("Transpose", [x], "transpose", perm=[1, 0])
    if layer.side == "left":  # the node computes W @ x with W the canonical weight's transpose
        y = builder.op("MatMul", [builder.weight(layer.weight.T, "w"), x], "matmul")
    else:
        y = builder.op("MatMul", [x, builder.weight(layer.weight, "w")], "matmul")
    if layer.bias is not None:
        y = builder.op("Add", [y, builder.cast(builder.constant(layer.bias, "bias"))], "bias")
    if layer.bias_input:
        y = builder.op("Add", [y, layer.bias_input], "bias")
    builder.rename_output(layer.node.output[0])


def _dtype(layer: Layer) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(layer.compute_dtype or np.float32))


# ------------------------------------------------------------------ per-layer timing

PRUNE_FACTOR = 2.0  # candidates predicted this much slower than dense are not timed


def far_slower(predicted_ms: float, dense_ms: float) -> bool:
    """Whether a candidate predicted at `predicted_ms` is not worth timing beside a dense
    layer predicted at `dense_ms` (LayerTimer.candidates, and Pruner before any fit is measured)."""
    return predicted_ms > PRUNE_FACTOR * dense_ms


@dataclass
class Timing:
    """A layer's time at the deployment shape, in ms."""

    ms: float | None  # measured when `measured`, else predicted (scaled to the dense layer's measurement)
    predicted_ms: float | None
    measured: bool


class LayerTimer:
    """Times candidate replacements of layers as one-layer models (see canonical,
    one_layer_model), each beside the dense layer, through a Clock (so cached).

    `emit(builder, layer, fact, emission)` appends a factorisation's nodes (api.emit_layer)."""

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], deployment: Deployment, clock: Clock, emit,
                 opset: int, shapes: macs.TensorShapes | None = None):
        self.deployment, self.clock, self.emit, self.opset = deployment, clock, emit, opset
        self.feeds = layer_feeds(model, layers, deployment, shapes)
        self._dense: dict[str, Timing] = {}

    def known(self, layer: Layer) -> bool:
        return layer.name in self.feeds

    def _model(self, layer: Layer, fact=None, emission: str = "matmul") -> onnx.ModelProto:
        return layer_model(layer, fact, emission, self.feeds_of(layer), self.emit, self.opset)

    def pruner(self, layers: list[Layer], exempt: tuple[str, ...] = ()) -> "Pruner":
        """A Pruner for these layers (those this timer can time), `exempt` kinds never pruned."""
        known = [l for l in layers if self.known(l) and l.kind not in exempt]
        return Pruner({l.name: {k: (v.shape, v.dtype) for k, v in self.feeds_of(l).items()} for l in known},
                      {l.name: l.node for l in known}, self.deployment.threads, self.emit, self.opset)

    def feeds_of(self, layer: Layer) -> dict:
        return self.feeds[layer.name]

    def dense(self, layer: Layer) -> Timing:
        if layer.name not in self._dense:
            if not self.known(layer):
                self._dense[layer.name] = Timing(None, None, False)
            else:
                self.candidates(layer, [])
        return self._dense[layer.name]

    def candidates(self, layer: Layer, trials: list[tuple]) -> list[Timing]:
        """Timings of (fact, emission) trials, with the dense layer timed alongside; those
        the cost model predicts PRUNE_FACTOR slower than dense are predicted, not timed."""
        if not self.known(layer):
            return [Timing(None, None, False) for _ in trials]
        feeds = self.feeds_of(layer)
        threads = self.deployment.threads
        models = [self._model(layer)] + [self._model(layer, fact, emission) for fact, emission in trials]
        predicted = [predict(m, feeds, threads) for m in models]
        timed = [0] + [i for i in range(1, len(models)) if not far_slower(predicted[i], predicted[0])]
        try:
            measured = self.clock.time([models[i] for i in timed], feeds)
        except Exception:  # noqa: BLE001 - a candidate onnxruntime cannot run: predictions only
            measured, timed = [predicted[0]], [0]
            self._dense.setdefault(layer.name, Timing(predicted[0], predicted[0], False))
        by_index = dict(zip(timed, measured))
        scale = by_index[0] / predicted[0] if predicted[0] > 0 else 1.0
        self._dense.setdefault(layer.name, Timing(by_index[0], predicted[0] * scale, self.clock.measures))
        return [Timing(by_index.get(i, predicted[i] * scale), predicted[i] * scale,
                       i in by_index and self.clock.measures) for i in range(1, len(models))]


class Pruner:
    """Whether the cost model predicts a candidate more than PRUNE_FACTOR slower than its
    dense layer at the deployment shape in every emission it can take. LayerTimer.candidates
    would not time such a candidate and the never-slower floor would drop it, so the planner
    neither measures its error nor fits its format's larger ranks (choose.candidate_options).
    Picklable for the worker processes: it keeps each layer's node and input shapes, not
    the inputs (the cost model reads shapes only)."""

    def __init__(self, inputs: dict, nodes: dict, threads: int | None, emit, opset: int):
        self.inputs, self.nodes, self.threads, self.emit, self.opset = inputs, nodes, threads, emit, opset
        self._dense: dict[str, float] = {}

    def __getstate__(self):
        return dict(self.__dict__, _dense={})

    def covers(self, layer: Layer) -> bool:
        return layer.name in self.inputs

    def slower(self, layer: Layer, fact, emissions) -> bool:
        if not self.covers(layer):
            return False
        feeds = {k: np.broadcast_to(np.zeros((), dtype), shape) for k, (shape, dtype) in self.inputs[layer.name].items()}
        if layer.node is None:  # a worker's copy of the layer (workers.portable)
            layer = copy.copy(layer)
            layer.node = self.nodes[layer.name]
        if layer.name not in self._dense:
            self._dense[layer.name] = predict(layer_model(layer, None, "matmul", feeds, self.emit, self.opset),
                                              feeds, self.threads)
        dense = self._dense[layer.name]
        try:
            return all(far_slower(predict(layer_model(layer, fact, e, feeds, self.emit, self.opset), feeds,
                                          self.threads), dense) for e in emissions)
        except Exception:  # noqa: BLE001 - a candidate the cost model cannot read is kept, for the timing to judge
            return False
