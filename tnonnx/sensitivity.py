"""The budget allocator's sensitivity pass: how much the model's outputs move per unit of a
layer's own output error, measured with that one layer rewritten (api.rewrite passes
layer_sensitivity to planner.Planner)."""

from __future__ import annotations

import numpy as np
import onnx

from .emit import Builder
from .graph import Layer
from .layer_fits import Replacement, emit_layer, partial
from .macs import all_graphs
from .plan import fit_error
from .validate import run as run_model


SENSITIVITY_SAMPLES = 128


def layer_sensitivity(original, new, fitter, batches, emit):
    """sensitivity(plan, format, spec): the model's squared relative output error on (part
    of) the calibration data with this one layer rewritten, per unit of the layer's own
    squared output error. Layers whose errors the rest of the network amplifies (or damps)
    are weighted accordingly by the budget allocator."""
    subset = spread(list(batches), SENSITIVITY_SAMPLES)
    reference = _float_outputs(original, subset)
    overridable = OverridableWeights(new)

    def measure(plan, fmt, spec) -> float:
        fact = fitter.fit(plan.layer, fmt, spec, plan.modes, plan.order, final=False)
        if overridable.takes(plan.layer, fact):
            got = overridable.outputs(plan.layer, fact.to_dense(), subset)
        else:
            builder = Builder(f"{plan.layer.name}/{fmt}", plan.layer.store_dtype, plan.layer.compute_dtype)
            emit_layer(builder, plan.layer, fact, emit)
            single = partial(new, {id(plan.layer.node): Replacement(plan.layer, plan, fact, builder)})
            got = _float_outputs(single, subset)
        model_error = sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, reference)) / max(
            sum(float(np.sum(r**2)) for r in reference), 1e-300)
        layer_error = fit_error(fact) ** 2
        return model_error / layer_error if layer_error > 1e-12 else 1.0

    return measure


class OverridableWeights:
    """The sensitivity pass's fast path: one session of `model` in which the weight of each
    MatMul reading a constant of its own directly can be fed instead (an initializer listed
    as a graph input is a default onnxruntime lets a feed override), so that a linear
    factorisation is measured as its dense equivalent without a model and a session per
    layer (MiniLM: 36 sessions of 0.5 s each). Other layers take the partial-model path."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.session, self.names = model, None, None

    def takes(self, layer: Layer, fact) -> bool:
        if self.names is None:
            self.names = self._eligible()
        return (getattr(fact, "linear", False) and layer.kind == "dense" and layer.side == "right"
                and id(layer.node) in self.names)

    def _eligible(self) -> dict[int, onnx.TensorProto]:
        graph = self.model.graph
        uses: dict[str, int] = {}
        for g in all_graphs(graph):
            for node in g.node:
                for name in set(node.input):
                    uses[name] = uses.get(name, 0) + 1
        inputs = {i.name for i in graph.input}
        consts = {t.name: t for t in graph.initializer}
        out = {}
        for node in graph.node:
            if node.op_type == "MatMul" and len(node.input) == 2:
                w = consts.get(node.input[1])
                if w is not None and len(w.dims) == 2 and uses.get(w.name) == 1 and w.name not in inputs \
                        and w.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                    out[id(node)] = w
        return out

    def outputs(self, layer: Layer, dense: np.ndarray, batches) -> list[np.ndarray]:
        if self.session is None:
            from . import runtime

            probe = onnx.ModelProto()
            probe.CopyFrom(self.model)
            probe.graph.input.extend(onnx.helper.make_tensor_value_info(w.name, w.data_type, w.dims)
                                     for w in self.names.values())
            self.session = runtime.session(probe, what="model")
        w = self.names[id(layer.node)]
        weight = dense.astype(onnx.helper.tensor_dtype_to_np_dtype(w.data_type))
        return _float_outputs(self.model, [dict(feeds, **{w.name: weight}) for feeds in batches],
                              open_session=lambda model, what: self.session)


def spread(batches: list, samples: int) -> list:
    """Batches holding about `samples` samples, taken at even intervals over `batches`:
    a calibration reader may sort its samples (by length, say), and the first few batches
    would then stand for the shortest inputs only."""
    sizes = [max((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), default=1) for feeds in batches]
    if sum(sizes) <= samples:
        return batches
    wanted = max(1, round(len(batches) * samples / sum(sizes)))
    return [batches[int(i * len(batches) / wanted)] for i in range(wanted)]


def _float_outputs(model, batches, open_session=None) -> list[np.ndarray]:
    """The model's float outputs over the batches (validate.run), as float64."""
    return [np.asarray(v, np.float64) for v in run_model(model, batches, open_session=open_session).values()
            if np.issubdtype(v.dtype, np.floating)]
