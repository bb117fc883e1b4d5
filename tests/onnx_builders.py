"""Small ONNX models for tests, built with onnx.helper at versions onnxruntime loads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def value(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.asarray(array), name)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(*shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))


def single_layer_model(shape, attrs=None, seed: int = 0) -> onnx.ModelProto:
    """One layer named "layer": a MatMul for a 2-D weight shape (input batch x 5 x N), else a
    Conv with bias for a T x S x k... kernel; symbolic batch."""
    w = randn(*shape, seed=seed)
    if len(shape) == 2:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")]
        return make_model(nodes, [value("x", ["b", 5, shape[0]])], [value("y", ["b", 5, shape[1]])], [init("W", w)])
    nsp = len(shape) - 2
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="layer", **(attrs or {}))]
    return make_model(nodes, [value("x", ["b", shape[1]] + [None] * nsp)], [value("y", ["b", shape[0]] + [None] * nsp)],
                      [init("W", w), init("B", randn(shape[0], seed=seed + 1))])


def emit_alone(model: onnx.ModelProto, module, spec, emit: str = "matmul", dense_options=None, conv_options=None):
    """The model's only layer fitted by a format module and emitted alone (no validation,
    no rewrite pipeline): (new model, factorization, layer)."""
    from tnonnx.api import emit_layer
    from tnonnx.emit import Builder
    from tnonnx.graph import find_layers

    new = onnx.ModelProto()
    new.CopyFrom(model)
    layer = find_layers(new)[0]
    if layer.kind == "conv":
        fact = module.fit_conv(layer.weight, spec, **(conv_options or {}))
    else:
        fact = module.fit_dense(layer.weight, spec, **(dense_options or {}))
    b = Builder("layer/" + module.NAME, np.float32, np.float32)
    emit_layer(b, layer, fact, emit)
    del new.graph.node[:]
    new.graph.node.extend(b.nodes)
    del new.graph.initializer[:]
    new.graph.initializer.extend(b.initializers)
    return new, fact, layer
