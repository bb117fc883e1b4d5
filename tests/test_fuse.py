"""Op fusion for the torch interpreter (tnonnx/fuse.py): exporters' erf GELU chains run as
one Gelu op, computing what onnxruntime computes on the unchanged graph."""

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import init, make_model, randn, run, value
from tnonnx.fuse import fuse_gelu

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _chain(order: str, scale: str = "div", extra_reader: str | None = None, half=np.float32(0.5)):
    """x -> the erf GELU in one of the exporters' orders -> y (and z = y + 1 after it)."""
    consts = [init("sqrt2", np.float32(math.sqrt(2))), init("isqrt2", np.float32(1 / math.sqrt(2))),
              init("one", np.float32(1.0)), init("half", half)]
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["h"]) if scale == "div"
             else helper.make_node("Mul", ["isqrt2", "x"], ["h"]),
             helper.make_node("Erf", ["h"], ["e"]), helper.make_node("Add", ["one", "e"], ["a"])]
    if order == "x*a*0.5":
        nodes += [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Mul", ["m", "half"], ["y"])]
    elif order == "a*0.5*x":
        nodes += [helper.make_node("Mul", ["a", "half"], ["m"]), helper.make_node("Mul", ["x", "m"], ["y"])]
    else:  # (x * 0.5) * a
        nodes.insert(0, helper.make_node("Mul", ["half", "x"], ["m"]))
        nodes += [helper.make_node("Mul", ["m", "a"], ["y"])]
    nodes.append(helper.make_node("Add", ["y", "one"], ["z"]))
    outputs = [value("z", [3, 5])]
    if extra_reader:
        outputs.append(value(extra_reader, [3, 5]))
    return make_model(nodes, [value("x", [3, 5])], outputs, consts)


def _interpret(model, names=None):
    from tnonnx.finetune import GraphModule

    graph = GraphModule(model, set())
    with torch.no_grad():
        got = graph({"x": torch.as_tensor(randn(3, 5, seed=1) * 2)}, names)
    return graph, [g.numpy() for g in got]


@pytest.mark.parametrize("scale", ["div", "mul"])
@pytest.mark.parametrize("order", ["x*a*0.5", "a*0.5*x", "x*0.5*a"])
def test_each_exporter_order_becomes_one_gelu_equal_to_onnxruntime(order, scale):
    model = _chain(order, scale)
    nodes, removed = fuse_gelu(model.graph)
    assert [n.op_type for n in nodes] == ["Gelu", "Add"]
    assert nodes[0].input == ["x"] and nodes[0].output == ["y"]
    assert removed == {"h", "e", "a", "m"}
    graph, (got,) = _interpret(model)
    assert graph.nodes == nodes
    (want,) = run(model, {"x": randn(3, 5, seed=1) * 2})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_chain_whose_intermediate_is_read_elsewhere_is_left_alone():
    model = _chain("x*a*0.5", extra_reader="e")
    nodes, removed = fuse_gelu(model.graph)
    assert list(nodes) == list(model.graph.node) and not removed
    _, (got, erf) = _interpret(model)
    want = run(model, {"x": randn(3, 5, seed=1) * 2})
    np.testing.assert_allclose(got, want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(erf, want[1], rtol=1e-6, atol=1e-6)


def test_a_constant_that_is_not_a_scalar_is_left_alone():
    model = _chain("x*a*0.5", half=np.full(5, 0.5, np.float32))
    nodes, removed = fuse_gelu(model.graph)
    assert "Gelu" not in [n.op_type for n in nodes] and not removed


def test_a_fused_intermediate_asked_for_by_name_is_still_computed():
    model = _chain("a*0.5*x")
    graph, (erf, y) = _interpret(model, ["e", "y"])
    x = randn(3, 5, seed=1) * 2
    np.testing.assert_allclose(erf, torch.erf(torch.as_tensor(x / math.sqrt(2))).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, run(model, {"x": x})[0] - 1, rtol=1e-5, atol=1e-5)


def test_the_exported_transformer_block_runs_its_gelu_fused(tmp_path):
    from models.export import export
    from tnonnx.calibrate import random_feeds
    from tnonnx.finetune import GraphModule

    model = onnx.load(export("transformer_block", tmp_path / "block.onnx"))
    graph = GraphModule(model, set())
    kinds = [n.op_type for n in graph.nodes]
    assert kinds.count("Gelu") == 1 and "Erf" not in kinds
    feeds = random_feeds(model, 2, None, 0)
    with torch.no_grad():
        (got,) = graph({k: torch.as_tensor(v) for k, v in feeds.items()})
    (want,) = run(model, feeds)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_tnonnx_own_gelu_between_cores_runs_fused(tmp_path):
    """An NTT layer's GELU makes its constants with Cast and Sqrt: folded, they count."""
    import tnonnx
    from tnonnx.finetune import GraphModule

    lenet = ROOT / "models" / "lenet5_fashion.onnx"
    small, _ = tnonnx.rewrite(lenet, format="ntt", rank=4, format_options={"act": "gelu"}, include="^/fc1/",
                              validate=False, timing=False, workers=1)
    graph = GraphModule(small, set())
    assert "Gelu" in [n.op_type for n in graph.nodes] and "Erf" not in [n.op_type for n in graph.nodes]
    x = np.load(ROOT / "models" / "fashion_test.npz")["input"][:8]
    with torch.no_grad():
        (got,) = graph({"input": torch.as_tensor(x)})
    (want,) = run(small, {"input": x})
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_constants_given_as_value_float_attributes_are_matched():
    """Constant nodes may carry a scalar as value_float instead of a tensor (the op allows
    either); both are constants of the chain."""
    model = _chain("x*a*0.5")
    consts = [helper.make_node("Constant", [], [t.name], value_float=float(onnx.numpy_helper.to_array(t)))
              for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    nodes, removed = fuse_gelu(model.graph)
    assert [n.op_type for n in nodes if n.op_type != "Constant"] == ["Gelu", "Add"]
    assert removed == {"h", "e", "a", "m"}
