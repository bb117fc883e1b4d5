"""Rewriting every kind of layer an exporter produces, end to end through tnonnx.rewrite:
at full rank (--force) the rewritten model computes what the original computes."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tnonnx
from tnonnx.graph import find_layers

from onnx_builders import init, make_model, randn, rel_err, run, value

FULL = dict(rank=100000, force=True, validate=False)
FORMATS = ["svd", "tt"]


def check_equal(model, feeds, fmt, tolerance=1e-4, **kwargs):
    new, report = tnonnx.rewrite(model, format=fmt, **{**FULL, **kwargs})
    onnx.checker.check_model(new)
    ref, out = run(model, feeds), run(new, feeds)
    for a, b in zip(ref, out):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < tolerance
    assert [i.SerializeToString() for i in new.graph.input] == [i.SerializeToString() for i in model.graph.input]
    assert [o.SerializeToString() for o in new.graph.output] == [o.SerializeToString() for o in model.graph.output]
    return new, report


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_shape", [[32], [3, 32], [2, 3, 32], [2, 2, 3, 32]])
def test_matmul_weight_on_the_right(fmt, x_shape):
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [value("x", x_shape)],
                   [value("y", x_shape[:-1] + [24])], [init("W", randn(32, 24, seed=1))])
    new, report = check_equal(m, {"x": randn(*x_shape, seed=2)}, fmt)
    assert report.rows[0].format == fmt and all(n.name.startswith("mm/" + fmt) for n in new.graph.node)
    assert not any(t.name == "W" for t in new.graph.initializer)  # the dense weight is gone


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_shape,y_shape", [([32, 5], [24, 5]), ([2, 32, 5], [2, 24, 5]), ([32], [24])])
def test_matmul_weight_on_the_left(fmt, x_shape, y_shape):
    m = make_model([helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")], [value("x", x_shape)],
                   [value("y", y_shape)], [init("W", randn(24, 32, seed=3))])
    check_equal(m, {"x": randn(*x_shape, seed=4)}, fmt)


GEMMS = [
    dict(transB=1),
    dict(transB=1, alpha=0.5, beta=2.0),
    dict(transA=1),
    dict(transA=1, transB=1, alpha=1.5),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("attrs", GEMMS)
@pytest.mark.parametrize("bias", ["const", "const2d", "input", None])
def test_gemm(fmt, attrs, bias):
    w = randn(24, 32, seed=5) if attrs.get("transB") else randn(32, 24, seed=5)
    x_shape = [32, 4] if attrs.get("transA") else [4, 32]
    inputs, inits, feeds = [value("x", x_shape)], [init("W", w)], {"x": randn(*x_shape, seed=6)}
    names = ["x", "W"]
    if bias == "const":
        inits.append(init("C", randn(24, seed=7)))
        names.append("C")
    elif bias == "const2d":
        inits.append(init("C", randn(1, 24, seed=7)))
        names.append("C")
    elif bias == "input":
        inputs.append(value("C", [4, 24]))
        feeds["C"] = randn(4, 24, seed=8)
        names.append("C")
    m = make_model([helper.make_node("Gemm", names, ["y"], name="gemm", **attrs)], inputs, [value("y", [4, 24])], inits)
    check_equal(m, feeds, fmt)


def _weight_through(kind):
    w = randn(32, 24, seed=9)
    nodes, inits = [], []
    if kind == "constant":
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w)))
    elif kind == "identity":
        inits.append(init("W0", w))
        nodes.append(helper.make_node("Identity", ["W0"], ["W"]))
    elif kind == "cast_fp16":
        inits.append(init("W0", w.astype(np.float16)))
        nodes.append(helper.make_node("Cast", ["W0"], ["W"], to=TensorProto.FLOAT))
    elif kind == "transpose":
        inits.append(init("W0", w.T.copy()))
        nodes.append(helper.make_node("Transpose", ["W0"], ["W"], perm=[1, 0]))
    return nodes, inits


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["constant", "identity", "cast_fp16", "transpose"])
def test_weight_reached_through_constant_identity_cast_transpose(fmt, kind):
    nodes, inits = _weight_through(kind)
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"))
    m = make_model(nodes, [value("x", [2, 32])], [value("y", [2, 24])], inits)
    # fp16 storage of the cores costs fp16 round-off
    new, _ = check_equal(m, {"x": randn(2, 32, seed=10)}, fmt, tolerance=2e-3 if kind == "cast_fp16" else 1e-4)
    # the weight's producers are gone; the cores keep the stored dtype (fp16 stays fp16)
    assert [n.op_type for n in new.graph.node if n.op_type in ("Constant", "Identity")] == []
    if kind == "cast_fp16":
        cores = [t for t in new.graph.initializer if t.data_type != TensorProto.INT64]
        assert cores and all(t.data_type == TensorProto.FLOAT16 for t in cores)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_weight_is_factorised_once(fmt):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="second")]
    m = make_model(nodes, [value("x", [2, 48])], [value("y", [2, 48])], [init("W", randn(48, 48, seed=11))])
    new, report = check_equal(m, {"x": randn(2, 48, seed=12)}, fmt)
    core_names = {t.name for t in new.graph.initializer if t.data_type == TensorProto.FLOAT}
    used = [i for n in new.graph.node for i in n.input if i in core_names]
    assert len(used) == 2 * len(core_names)  # both layers use every core
    rows = {r.name: r for r in report.rows}
    assert rows["second"].shared_with == "first" and rows["second"].params_after == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_inside_if_branches_and_loop_bodies(fmt):
    w_outer = randn(32, 32, seed=13)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm")], "then", [],
                               [value("t", [2, 32])])
    w_inner = randn(32, 32, seed=14)
    else_g = helper.make_graph([helper.make_node("Constant", [], ["Wi"], value=numpy_helper.from_array(w_inner)),
                                helper.make_node("MatMul", ["x", "Wi"], ["e"], name="else_mm")], "else", [],
                               [value("e", [2, 32])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["state_in", "W"], ["state_out"], name="loop_mm")],
        "body", [value("i", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL), value("state_in", [2, 32])],
        [value("cond_out", [], TensorProto.BOOL), value("state_out", [2, 32])])
    nodes = [helper.make_node("If", ["flag"], ["z"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Loop", ["trips", "", "z"], ["y"], body=body, name="loop")]
    m = make_model(nodes, [value("x", [2, 32]), value("flag", [], TensorProto.BOOL)], [value("y", [2, 32])],
                   [init("W", w_outer), init("trips", np.array(2, dtype=np.int64))])
    for flag in (True, False):
        new, report = check_equal(m, {"x": randn(2, 32, seed=15), "flag": np.array(flag)}, fmt)
    assert sorted(r.name for r in report.rows if r.format) == ["else_mm", "loop_mm", "then_mm"]
    rows = {r.name: r for r in report.rows}
    assert rows["loop_mm"].shared_with == "then_mm"  # same outer weight, factorised once


@pytest.mark.parametrize("fmt", FORMATS)
def test_float16_model(fmt):
    w = randn(32, 24, seed=16).astype(np.float16)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                   [value("x", [2, 32], TensorProto.FLOAT16)], [value("y", [2, 24], TensorProto.FLOAT16)], [init("W", w)])
    new, _ = tnonnx.rewrite(m, format=fmt, **FULL)
    x = randn(2, 32, seed=17).astype(np.float16)
    (a,), (b,) = run(m, {"x": x}), run(new, {"x": x})
    assert b.dtype == np.float16 and rel_err(a, b) < 5e-3  # fp16 round-off of the cores
    assert all(t.data_type in (TensorProto.FLOAT16, TensorProto.INT64) for t in new.graph.initializer)


CONVS = [
    ([2, 6, 17], (10, 6, 3), dict(strides=[2], pads=[1, 1])),
    ([1, 8, 12, 12], (16, 8, 3, 3), dict(pads=[1, 1, 1, 1])),
    ([1, 8, 11, 13], (16, 8, 3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ([1, 8, 11, 13], (16, 8, 3, 3), dict(auto_pad="SAME_LOWER", strides=[2, 1])),
    ([1, 8, 11, 13], (16, 8, 3, 3), dict(auto_pad="VALID", dilations=[2, 1])),
    ([1, 8, 12, 12], (24, 8, 3, 2), dict(pads=[2, 0, 1, 1], dilations=[2, 3], strides=[1, 2])),
    ([1, 4, 6, 7, 8], (8, 4, 3, 3, 3), dict(pads=[1, 1, 1, 1, 1, 1], strides=[1, 2, 1])),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_shape,k_shape,attrs", CONVS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv(fmt, x_shape, k_shape, attrs, with_bias):
    inits = [init("K", randn(*k_shape, seed=18))]
    names = ["x", "K"]
    if with_bias:
        inits.append(init("B", randn(k_shape[0], seed=19)))
        names.append("B")
    # the output's shape is whatever onnx infers for the original conv
    graph = helper.make_graph([helper.make_node("Conv", names, ["y"], name="conv", **attrs)], "g",
                              [value("x", x_shape)], [], inits)
    inferred = onnx.shape_inference.infer_shapes(helper.make_model(graph))
    y_shape = [d.dim_value for d in inferred.graph.value_info[0].type.tensor_type.shape.dim]
    m = make_model(graph.node, graph.input, [value("y", y_shape)], inits)
    check_equal(m, {"x": randn(*x_shape, seed=20)}, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [2, 4])
def test_grouped_conv_is_factorised_group_by_group(fmt, group):
    k = randn(16, 16 // group, 3, 3, seed=25)
    nodes = [helper.make_node("Conv", ["x", "K", "B"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1], strides=[2, 2])]
    m = make_model(nodes, [value("x", [1, 16, 9, 9])], [value("y", [1, 16, 5, 5])], [init("K", k), init("B", randn(16, seed=26))])
    new, report = check_equal(m, {"x": randn(1, 16, 9, 9, seed=27)}, fmt)
    assert report.rows[0].format == fmt
    layer = find_layers(m)[0]
    from tnonnx.plan import Fitter
    from tnonnx.formats import RankSpec
    import torch

    fact = Fitter().fit(layer, fmt, RankSpec(rank=2))
    assert fact.relative_error(layer.weight) < 1
    x = randn(1, 16, 9, 9, seed=28)
    with torch.no_grad():
        y_torch = fact.torch_module(layer.geometry, layer.bias)(torch.from_numpy(x)).numpy()
    small, _ = tnonnx.rewrite(m, format=fmt, rank=2, force=True, validate=False)
    np.testing.assert_allclose(run(small, {"x": x})[0], y_torch, rtol=1e-5, atol=1e-5)


def test_depthwise_and_quantized_layers_are_left_alone_with_reasons():
    nodes = [
        helper.make_node("Conv", ["x", "Kg"], ["g"], name="grouped", group=2),
        helper.make_node("Conv", ["g", "Kd"], ["d"], name="depthwise", group=8),
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zero"], ["W"]),
        helper.make_node("Flatten", ["d"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["y"], name="quantized"),
    ]
    inits = [init("Kg", randn(8, 4, 3, 3, seed=21)), init("Kd", randn(8, 1, 3, 3, seed=22)),
             init("Wq", np.ones((8 * 4 * 4, 10), dtype=np.int8)), init("scale", np.array(0.1, dtype=np.float32)),
             init("zero", np.array(0, dtype=np.int8))]
    m = make_model(nodes, [value("x", [1, 8, 8, 8])], [value("y", [1, 10])], inits)
    reasons = {l.name: l.reason for l in find_layers(m)}
    assert reasons["grouped"] is None and "depthwise" in reasons["depthwise"]
    assert "quantized" in reasons["quantized"]
    with pytest.raises(tnonnx.TnonnxError, match="nothing to rewrite"):
        tnonnx.rewrite(m, format="tt", rank=4, exclude="grouped")


def test_untouched_nodes_stay_byte_identical_and_input_is_not_modified():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "W"], ["h"], name="mm"),
             helper.make_node("Sigmoid", ["h"], ["y"], name="sig")]
    m = make_model(nodes, [value("x", [2, 32])], [value("y", [2, 32])], [init("W", randn(32, 32, seed=23))])
    before = m.SerializeToString()
    new, _ = tnonnx.rewrite(m, format="tt", rank=2, validate=False)
    assert m.SerializeToString() == before
    kept = {n.name: n.SerializeToString() for n in new.graph.node}
    assert kept["relu"] == nodes[0].SerializeToString() and kept["sig"] == nodes[2].SerializeToString()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tol", [0.1, 0.4])
def test_tolerance_bounds_every_layer(fmt, tol):
    u, _ = np.linalg.qr(randn(64, 64, seed=24).astype(np.float64))
    w = ((u * np.exp(-np.arange(64) / 8.0)) @ u.T).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="a"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="b")]
    m = make_model(nodes, [value("x", [2, 64])], [value("y", [2, 64])], [init("W1", w), init("W2", w[::-1].copy())])
    _, report = tnonnx.rewrite(m, format=fmt, tol=tol, force=True, validate=False)
    assert all(r.weight_error <= tol + 1e-6 for r in report.rows)
