"""Old and odd exports: an opset older than onnxruntime runs is upgraded by onnx's version
converter; weights that are also graph inputs (IR 3) leave the inputs when factorised;
weights computed from constants alone are folded and rewritten."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx_builders import init, randn, rel_err, run, value

from tnonnx.graph import find_layers
from tnonnx.cli import main
from tnonnx.errors import TnonnxError
from tnonnx.model import load


def _ir3_opset(opset: int) -> onnx.ModelProto:
    """Gemm (with opset 6's broadcast attribute where it exists) -> Relu -> MatMul, every
    initializer also listed as a graph input, IR 3, as old converters wrote."""
    gemm = dict(broadcast=1) if opset < 7 else {}
    weights = [init("W", randn(8, 6, seed=1)), init("B", randn(6, seed=2)), init("K", randn(6, 4, seed=3))]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["g"], name="fc", **gemm), helper.make_node("Relu", ["g"], ["r"]),
         helper.make_node("MatMul", ["r", "K"], ["y"], name="mm")], "old",
        [value("x", [1, 8])] + [value(t.name, list(t.dims)) for t in weights], [value("y", [1, 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def _rewrite(tmp_path, model, *extra):
    src, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["rewrite", str(src), "--format", "svd", "--rank", "8", "--force",
                                       "--no-timing", "-o", str(out), "--report", str(report), *extra])
    assert result.exit_code == 0, result.output
    return onnx.load(out), json.loads(report.read_text())


def test_old_opset_is_upgraded_and_rewritten(tmp_path):
    model = _ir3_opset(6)
    new, report = _rewrite(tmp_path, model)
    assert any("opset 6 is older than onnxruntime runs: upgraded to opset 13" in n for n in report["notes"])
    assert new.opset_import[0].version == 13 and not new.metadata_props
    assert all(r["format"] == "svd" for r in report["layers"])
    x = randn(1, 8, seed=9)
    upgraded = load(model)  # the original as onnxruntime can run it
    assert rel_err(run(upgraded, {"x": x})[0], run(new, {"x": x})[0]) < 1e-5


def test_inspect_says_the_model_was_upgraded(tmp_path):
    onnx.save(_ir3_opset(6), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0 and "opset 6 is older than onnxruntime runs: upgraded to opset 13" in result.output


def test_an_opset_the_converter_cannot_upgrade_is_refused_in_one_line():
    model = _ir3_opset(6)
    model.graph.node[1].op_type = "NoSuchOp"  # the converter has no adapter for it
    with pytest.raises(TnonnxError, match="opset 6 is older than onnxruntime .* version converter cannot upgrade"):
        load(model)


def test_weights_listed_as_graph_inputs_leave_the_inputs(tmp_path):
    model = _ir3_opset(11)
    new, report = _rewrite(tmp_path, model)
    assert [i.name for i in new.graph.input] == ["x"]
    assert any("also listed as graph inputs (IR 3 style): removed from the inputs (W, B, K)" in n
               for n in report["notes"])
    x = randn(1, 8, seed=9)
    assert rel_err(run(model, {"x": x})[0], run(new, {"x": x})[0]) < 1e-5  # runs on x alone


def test_weight_computed_from_constants_is_folded_and_rewritten(tmp_path):
    """W = Reshape(flat, Concat(Unsqueeze(8), Unsqueeze(6))) + ConstantOfShape([8, 6], 0.5)."""
    nodes = [
        helper.make_node("Unsqueeze", ["n8", "ax0"], ["d0"]), helper.make_node("Unsqueeze", ["n6", "ax0"], ["d1"]),
        helper.make_node("Concat", ["d0", "d1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["flat", "shape"], ["w0"]),
        helper.make_node("ConstantOfShape", ["shape"], ["half"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Add", ["w0", "half"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    inits = [init("n8", np.array(8, np.int64)), init("n6", np.array(6, np.int64)), init("ax0", np.array([0])),
             init("flat", randn(48, seed=4))]
    graph = helper.make_graph(nodes, "computed", [value("x", ["b", 8])], [value("y", ["b", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    layer = find_layers(model)[0]
    assert layer.reason is None and layer.weight.shape == (8, 6)
    new, report = _rewrite(tmp_path, model)
    assert report["layers"][0]["format"] == "svd"
    assert {n.op_type for n in new.graph.node}.isdisjoint({"ConstantOfShape", "Concat", "Add"})  # chain removed
    x = randn(3, 8, seed=5)
    assert rel_err(run(model, {"x": x})[0], run(new, {"x": x})[0]) < 1e-5


def test_weight_concatenated_inside_an_if_body_is_folded_and_rewritten(tmp_path):
    """An If branch multiplies by Concat(Unsqueeze(a), b) of outer-scope constants."""
    then = helper.make_graph([
        helper.make_node("Unsqueeze", ["row", "ax0"], ["row2"]),
        helper.make_node("Concat", ["row2", "rest"], ["w"], axis=0),
        helper.make_node("MatMul", ["x", "w"], ["y_then"], name="branch_mm"),
    ], "then", [], [value("y_then", ["b", 6])])
    other = helper.make_graph([helper.make_node("Identity", ["x6"], ["y_else"])], "else", [],
                              [value("y_else", ["b", 6])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)], "if_model",
        [value("x", ["b", 8]), value("x6", ["b", 6])], [value("y", ["b", 6])],
        [init("flag", np.array(True)), init("row", randn(6, seed=1)), init("rest", randn(7, 6, seed=2)),
         init("ax0", np.array([0]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    new, report = _rewrite(tmp_path, model)
    assert [r["format"] for r in report["layers"]] == ["svd"]
    from tnonnx.macs import all_graphs

    assert not [n for g in all_graphs(new.graph) for n in g.node if n.op_type in ("Concat", "Unsqueeze")]
    feeds = {"x": randn(3, 8, seed=5), "x6": randn(3, 6, seed=6)}
    assert rel_err(run(model, feeds)[0], run(new, feeds)[0]) < 1e-5
