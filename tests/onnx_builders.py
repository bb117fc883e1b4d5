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


def speech_model(through: str = "Unsqueeze", pad: int = 96) -> onnx.ModelProto:
    """A voice-activity-detector-like model: audio x [batch, samples] and an int64 scalar
    sample rate sr. The graph checks sr == 16000 (Equal -> If); the 16 kHz branch lifts x to
    [batch, 1, samples] (through `through`: Unsqueeze, which tnonnx's feed hints follow, or
    Reshape, which they do not), reflect-pads it by `pad` on each side (onnxruntime needs
    samples > pad), then Conv 1->16, Conv 16->16, mean over time and a MatMul 16->8. Any
    other rate takes the else branch, which fails (an out-of-range Gather), as exported
    models that support only some rates do."""
    lift = (helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]) if through == "Unsqueeze"
            else helper.make_node("Reshape", ["x", "shape3"], ["u"]))
    then = helper.make_graph([
        lift,
        helper.make_node("Pad", ["u", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "W1"], ["c1"], name="conv1", pads=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1]),
        helper.make_node("ReduceMean", ["c2"], ["m"], axes=[2], keepdims=0),
        helper.make_node("MatMul", ["m", "W3"], ["y_then"], name="head"),
    ], "sr16k", [], [value("y_then", ["n", 8])])
    other = helper.make_graph([
        helper.make_node("Gather", ["table", "bad"], ["y_else"], axis=0),
    ], "unsupported", [], [value("y_else", ["n", 8])])
    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=then, else_branch=other)]
    inits = [init("rate16k", np.array(16000, np.int64)), init("ax1", np.array([1], np.int64)),
             init("shape3", np.array([0, 1, -1], np.int64)),
             init("pads", np.array([0, 0, pad, 0, 0, pad], np.int64)), init("W1", randn(16, 1, 5, seed=1)),
             init("W2", randn(16, 16, 3, seed=2)), init("B2", randn(16, seed=3)), init("W3", randn(16, 8, seed=4)),
             init("table", randn(4, 8, seed=5)), init("bad", np.array([10**6], np.int64))]
    return make_model(nodes, [value("x", ["batch", "samples"]), value("sr", [], TensorProto.INT64)],
                      [value("y", ["n", 8])], inits)
