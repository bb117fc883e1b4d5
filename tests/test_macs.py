"""tnonnx.macs: MACs and parameters, checked against hand formulas and ORT's own shapes."""

import importlib.util
import math
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from tnonnx import macs, macs_ops
from tnonnx.errors import TnonnxError

F = T.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, F, s) for n, s in inputs],
                     [h.make_tensor_value_info(n, F, None) for n in outputs], list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=10)


def _run(model, shapes):
    """Run in ORT (the model must be valid) and return the output arrays."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    return sess.run(None, {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})


def _w(name, *shape):
    return nh.from_array(np.random.default_rng(1).standard_normal(shape).astype(np.float32), name)


def _single(op, shapes, inits=(), **attrs):
    """One node `op` on graph inputs `shapes` (dict) and initializers; returns (macs, output)."""
    names = list(shapes) + [t.name for t in inits]
    m = _model([h.make_node(op, names, ["y"], name="n", **attrs)], list(shapes.items()), ["y"], inits)
    (y,) = _run(m, shapes)
    cost = macs.count(m, shapes)
    assert cost.unknown == [] and cost.total == cost.per_node["n"]
    return cost.total, y


@pytest.mark.parametrize("a,b,expected", [
    ((3, 4), (4, 5), 3 * 4 * 5),
    ((2, 3, 4), (4, 5), 2 * 3 * 4 * 5),
    ((2, 1, 3, 4), (6, 4, 5), 2 * 6 * 3 * 4 * 5),  # batch dims broadcast to (2, 6)
    ((4,), (4, 5), 4 * 5),
    ((2, 3, 4), (4,), 2 * 3 * 4),
    ((4,), (4,), 4),
])
def test_matmul(a, b, expected):
    got, y = _single("MatMul", {"a": a, "b": b})
    assert got == expected
    assert y.shape == np.matmul(np.zeros(a), np.zeros(b)).shape


@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm(ta, tb):
    m, k, n = 3, 4, 5
    a = (k, m) if ta else (m, k)
    b = (n, k) if tb else (k, n)
    got, y = _single("Gemm", {"a": a}, [_w("b", *b), _w("c", n)], transA=ta, transB=tb)
    assert y.shape == (m, n) and got == m * k * n


def _out_len(i, k, s, d, p0, p1):
    return (i + p0 + p1 - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize("case", [
    dict(x=(2, 4, 17), w=(6, 2, 3), group=2, strides=[2], pads=[1, 2], dilations=[3]),
    dict(x=(2, 4, 11, 13), w=(6, 4, 3, 3), group=1, strides=[2, 1], pads=[1, 0, 1, 2],
         dilations=[1, 2]),
    dict(x=(1, 6, 5, 9, 8), w=(3, 2, 3, 1, 2), group=3, strides=[1, 2, 3], pads=[1, 0, 0, 1, 0, 1],
         dilations=[1, 1, 2]),
    dict(x=(1, 8, 10, 10), w=(8, 1, 3, 3), group=8, strides=[1, 1], pads=[1, 1, 1, 1],
         dilations=[1, 1]),  # depthwise
])
def test_conv(case):
    x, w = case["x"], case["w"]
    nd = len(x) - 2
    p = case["pads"]
    out = [_out_len(x[2 + i], w[2 + i], case["strides"][i], case["dilations"][i], p[i], p[nd + i])
           for i in range(nd)]
    attrs = {k: case[k] for k in ("group", "strides", "pads", "dilations")}
    got, y = _single("Conv", {"x": x}, [_w("w", *w), _w("b", w[0])], **attrs)
    assert y.shape == (x[0], w[0], *out)  # the hand formula agrees with ORT
    assert got == x[0] * w[0] * math.prod(out) * (x[1] // case["group"]) * math.prod(w[2:])


def test_conv_auto_pad_same_upper():
    x, w, s = (1, 3, 15, 16), (5, 3, 4, 3), [2, 3]
    out = [math.ceil(15 / 2), math.ceil(16 / 3)]
    got, y = _single("Conv", {"x": x}, [_w("w", *w)], auto_pad="SAME_UPPER", strides=s)
    assert y.shape == (1, 5, *out)
    assert got == 1 * 5 * math.prod(out) * 3 * 4 * 3


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    x, w = (2, 4, 5, 6), (4, 3, 3, 2)  # W: C_in x C_out/group x kernel
    got, y = _single("ConvTranspose", {"x": x}, [_w("w", *w)], group=group, strides=[2, 2])
    assert y.shape == (2, 3 * group, (5 - 1) * 2 + 3, (6 - 1) * 2 + 2)
    assert got == 2 * 4 * 5 * 6 * 3 * 3 * 2


@pytest.mark.parametrize("eq,shapes,expected", [
    ("bij,jk->bik", [(2, 3, 4), (4, 5)], 2 * 3 * 4 * 5),
    ("ij,jk", [(2, 3), (3, 4)], 2 * 3 * 4),  # implicit output
    # pairwise left to right: (i,j,k) then the kept (i,k) with (k,l)
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)], 2 * 3 * 4 + 2 * 4 * 5),
    ("bi,ij,jk,k->b", [(7, 2), (2, 3), (3, 4), (4,)], 7 * 2 * 3 + 7 * 3 * 4 + 7 * 4),
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (2, 3, 5, 6)], 2 * 3 * 4 * 5 * 6),
    ("...ij,...jk->...ik", [(2, 1, 4, 5), (1, 3, 5, 6)], 2 * 3 * 4 * 5 * 6),  # 1 broadcasts
    ("...ij,jk", [(2, 3, 4), (4, 5)], 2 * 3 * 4 * 5),  # ellipsis in one operand only
    ("i...,i...", [(4, 2, 3), (4, 2, 3)], 4 * 2 * 3),  # implicit, ellipsis kept
    ("ii->i", [(3, 3)], 0),  # one operand: no multiply
])
def test_einsum(eq, shapes, expected):
    names = [f"x{i}" for i in range(len(shapes))]
    got, y = _single("Einsum", dict(zip(names, shapes)), equation=eq)
    assert got == expected
    ref = np.einsum(eq, *[np.zeros(s) for s in shapes])
    assert y.shape == ref.shape


def test_constant_product_of_initializers_is_folded():
    nodes = [h.make_node("MatMul", ["w1", "w2"], ["w"], name="fold"),
             h.make_node("MatMul", ["x", "w"], ["y"], name="use")]
    m = _model(nodes, [("x", ["N", 8])], ["y"], [_w("w1", 8, 4), _w("w2", 4, 16)])
    _run(m, {"x": (3, 8)})
    cost = macs.count(m, {"x": (3, 8)})
    assert cost.per_node == {"fold": 0, "use": 3 * 8 * 16}
    assert cost.total == 3 * 8 * 16 and cost.unknown == []
    assert macs.macs_of(cost, ["fold", "use"]) == cost.total


def test_reshape_transpose_chain_on_constants():
    shape = nh.from_array(np.array([8, 3], np.int64), "shape")
    core = h.make_node("Constant", [], ["core"], value=_w("c", 2, 4, 3))  # weight as Constant
    nodes = [core, h.make_node("Reshape", ["core", "shape"], ["w83"]),
             h.make_node("Transpose", ["w83"], ["w38"], perm=[1, 0]),
             h.make_node("Mul", ["w38", "two"], ["w"]),
             h.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    m = _model(nodes, [("x", [5, 3])], ["y"], [shape, nh.from_array(np.float32(2), "two")])
    _run(m, {"x": (5, 3)})
    cost = macs.count(m, {"x": (5, 3)})
    assert cost.total == cost.per_node["mm"] == 5 * 3 * 8
    # unnamed nodes get <op_type>#<index> keys, folded ones stay with 0
    assert {k: v for k, v in cost.per_node.items() if k != "mm"} == {
        "Constant#0": 0, "Reshape#1": 0, "Transpose#2": 0, "Mul#3": 0}


def test_params_and_bytes():
    sub_c = h.make_node("Constant", [], ["k"], value=_w("k", 2, 2))  # 4 floats, in a subgraph
    then_g = h.make_graph([sub_c, h.make_node("Identity", ["k"], ["t"])], "then", [],
                          [h.make_tensor_value_info("t", F, None)])
    else_g = h.make_graph([h.make_node("Identity", ["x"], ["e"])], "else", [],
                          [h.make_tensor_value_info("e", F, None)])
    nodes = [h.make_node("Constant", [], ["c1"], value=_w("c1", 3, 4)),        # 12 floats
             h.make_node("Constant", [], ["c2"], value_floats=[1.0, 2.0, 3.0]),  # 3 floats
             h.make_node("Constant", [], ["c3"], value_int=5),                   # int: 8 bytes
             h.make_node("Constant", [], ["c4"], value_ints=[1, 2]),             # int: 16 bytes
             h.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [nh.from_array(np.zeros(10, np.float16), "half"),               # 10 params, 20 bytes
             nh.from_array(np.array([1, 2], np.int64), "idx")]               # 16 bytes
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", F, [2, 2]),
                                  h.make_tensor_value_info("cond", T.BOOL, [])],
                     [h.make_tensor_value_info("y", F, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
    cost = macs.count(m, {})
    assert cost.params == 12 + 3 + 4 + 10
    assert cost.param_bytes == 48 + 12 + 8 + 16 + 16 + 20 + 16


def test_node_in_if_branch_is_counted():
    then_g = h.make_graph([h.make_node("Constant", [], ["k"], value=_w("k", 3, 4)),
                           h.make_node("MatMul", ["x", "k"], ["t"], name="inner")], "then", [],
                          [h.make_tensor_value_info("t", F, None)])
    else_g = h.make_graph([h.make_node("MatMul", ["x", "v"], ["e"], name="inner_else")], "else",
                          [], [h.make_tensor_value_info("e", F, None)])
    nodes = [h.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", F, ["N", 3]),
                                  h.make_tensor_value_info("cond", T.BOOL, [])],
                     [h.make_tensor_value_info("y", F, None)], [_w("v", 3, 4)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((2, 3), np.float32), "cond": np.array(True)})
    cost = macs.count(m, {"x": (2, 3)})
    assert cost.per_node["if"] == 0
    assert cost.per_node["inner"] == cost.per_node["inner_else"] == 2 * 3 * 4  # each branch's own cost
    # the condition is a graph input: which branch runs is not known, the larger counts
    assert cost.total == 2 * 3 * 4 and cost.unknown == []
    assert cost.notes == ["If if: MACs of its else branch counted (the larger branch, which one runs is not known)"]


def test_loop_body_counted_per_iteration():
    """A constant trip count multiplies the body's MACs. A loop-carried value whose body
    input declares no shape has none after inference: unknown."""
    body = h.make_graph(
        [h.make_node("Identity", ["c_in"], ["c_out"]),
         h.make_node("MatMul", ["x", "w"], ["t"], name="body_mm"),  # x from the outer scope
         h.make_node("Add", ["s_in", "t"], ["s_out"]),
         h.make_node("MatMul", ["s_in", "w"], ["u"], name="carried_mm")], "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("c_in", T.BOOL, []),
         h.make_tensor_value_info("s_in", F, None)],
        [h.make_tensor_value_info(n, t, None) for n, t in
         (("c_out", T.BOOL), ("s_out", F), ("u", F))])
    trips = nh.from_array(np.array(5, np.int64), "trips")
    g = h.make_graph([h.make_node("Loop", ["trips", "", "x"], ["y", "us"], name="loop", body=body)],
                     "g", [h.make_tensor_value_info("x", F, ["N", 3])],
                     [h.make_tensor_value_info(n, F, None) for n in ("y", "us")],
                     [trips, _w("w", 3, 3)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=10)
    _run(m, {"x": (2, 3)})
    cost = macs.count(m, {"x": (2, 3)})
    assert cost.per_node["body_mm"] == cost.total == 5 * 2 * 3 * 3
    assert cost.unknown == ["carried_mm"]
    assert cost.notes == ["Loop loop: body MACs counted 5 times (its trip count)"]


def test_symbolic_fallback_for_old_opset_reshape():
    """onnx's data propagation does not carry Shape->Slice->Concat into Reshape at
    opset <= 13; ORT's symbolic shape inference does."""
    def const(name, v):
        return h.make_node("Constant", [], [name], value=nh.from_array(np.array(v, np.int64)))
    nodes = [h.make_node("Shape", ["x"], ["s"]), const("st", [0]), const("en", [2]),
             const("ax", [0]), h.make_node("Slice", ["s", "st", "en", "ax"], ["s2"]),
             const("m1", [-1]), h.make_node("Concat", ["s2", "m1"], ["shape"], axis=0),
             h.make_node("Reshape", ["x", "shape"], ["r"]),
             h.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    m = _model(nodes, [("x", ["N", 4, "H", "W"])], ["y"], [_w("w", 12, 5)], opset=12)
    m.ir_version = 7
    (y,) = _run(m, {"x": (2, 4, 3, 4)})
    cost = macs.count(m, {"x": (2, 4, 3, 4)})
    assert y.shape == (2, 4, 5)
    assert cost.unknown == [] and cost.per_node["mm"] == cost.total == 2 * 4 * 12 * 5


def test_unknown_shape_is_reported_not_guessed():
    m = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", ["N", 8])], ["y"],
               [_w("w", 8, 4)])
    cost = macs.count(m, {})  # N left symbolic
    assert cost.unknown == ["mm"] and "mm" not in cost.per_node and cost.total == 0
    assert cost.params == 32


def test_bad_input_name():
    m = _model([h.make_node("Relu", ["x"], ["y"])], [("x", [2])], ["y"])
    with pytest.raises(TnonnxError, match="not an input"):
        macs.count(m, {"z": (2,)})
    with pytest.raises(TnonnxError, match="rank"):
        macs.count(m, {"x": (2, 3)})


def test_count_does_not_modify_the_model():
    m = _model([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [("x", ["N", 8])], ["y"],
               [_w("w", 8, 4)])
    before = m.SerializeToString()
    macs.count(m, {"x": (3, 8)})
    assert m.SerializeToString() == before


def _rapidocr_rec():
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models/ch_PP-OCRv4_rec_infer.onnx"
    return path if path.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_rapidocr_rec() is None, reason="rapidocr_onnxruntime is not installed")
def test_rapidocr_recogniser_against_ort_shapes():
    model = onnx.load(_rapidocr_rec())
    shape = (1, 3, 48, 320)
    cost = macs.count(model, {"x": shape})
    assert cost.unknown == [] and cost.total > 0
    # Independent count: run ORT with every Conv/MatMul input and output exposed, and
    # apply the formulas to the tensors it actually produced.
    keyed = [(k, n) for k, n, _ in macs.iter_nodes(model) if n.op_type in ("Conv", "MatMul")]
    assert len(keyed) == 38 + 13
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names = {v for _, n in keyed for v in (*n.input[:2], n.output[0])}
    have = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(h.make_tensor_value_info(v, F, None) for v in sorted(names - have))
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    expected = 0
    for key, node in keyed:
        a, b, y = (values[v].shape for v in (*node.input[:2], node.output[0]))
        if node.op_type == "Conv":
            want = math.prod(y) * math.prod(b[1:])
            assert b[1] * macs_ops._attr(node, "group", 1) == a[1]
        else:
            want = math.prod(y) * a[-1]
        assert cost.per_node[key] == want, key
        expected += want
    assert cost.total == expected  # nothing else in this model costs MACs
    # weights are Constant nodes (paddle2onnx): all float parameters, about 2.7 M
    assert 2_000_000 < cost.params < 4_000_000
