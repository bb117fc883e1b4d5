"""LSTM, GRU and RNN nodes: input weights hoisted in front of the node (tnonnx/recurrent.py),
exact at full rank through the CLI in every direction, with sequence_lens, initial states,
layout 1, GRU's linear_before_reset, and weights behind Unsqueeze/Concat/Slice or Constants."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_builders import init, make_model, randn, rel_err, run, value
from test_cli import cli
from tnonnx import api
from tnonnx.graph import find_layers

T, B, I, H = 6, 3, 10, 8
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op="LSTM", direction="forward", lens=False, states=False, layout=0, chain=None, **attrs):
    """X -> op -> Y (and Y_h). chain: how W reaches the node ("constant": a Constant node;
    "concat": per-gate slices of an initializer, concatenated, then Unsqueezed)."""
    d = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    w, r = randn(d, g * H, I, seed=1) * 0.4, randn(d, g * H, H, seed=2) * 0.4
    bias = randn(d, 2 * g * H, seed=3) * 0.1
    inits, nodes = [init("R", r), init("Bias", bias)], []
    if chain == "constant":
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "Wv")))
    elif chain == "concat":
        inits += [init("W2", w[0]), init("starts", np.asarray([0], np.int64)), init("axes", np.asarray([0], np.int64))]
        parts = []
        for k in range(g):
            inits += [init(f"s{k}", np.asarray([k * H], np.int64)), init(f"e{k}", np.asarray([(k + 1) * H], np.int64))]
            nodes.append(helper.make_node("Slice", ["W2", f"s{k}", f"e{k}", "axes"], [f"w{k}"]))
            parts.append(f"w{k}")
        nodes.append(helper.make_node("Concat", parts, ["Wcat"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", ["Wcat", "axes"], ["W"]))
        assert d == 1
    else:
        inits.append(init("W", w))
    xshape = [T, "b", I] if layout == 0 else ["b", T, I]
    inputs = [value("X", xshape)]
    extra = ["", ""]
    if lens:
        inputs.append(value("L", ["b"], TensorProto.INT32))
        extra[0] = "L"
    if states:
        inputs.append(value("h0", [d, "b", H] if layout == 0 else ["b", d, H]))
        extra[1] = "h0"
    node_inputs = ["X", "W", "R", "Bias"] + extra
    outputs = ["Y", "Yh"]
    if op == "LSTM" and states:
        inputs.append(value("c0", [d, "b", H] if layout == 0 else ["b", d, H]))
        node_inputs.append("c0")
    nodes.append(helper.make_node(op, node_inputs, outputs, name="rnn", hidden_size=H, direction=direction,
                                  layout=layout, **attrs))
    y, yh = ([T, d, "b", H], [d, "b", H]) if layout == 0 else (["b", T, d, H], ["b", d, H])
    return make_model(nodes, inputs, [value("Y", y), value("Yh", yh)], inits, opset=14)


def feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    layout = next(a.i for a in model.graph.node[-1].attribute if a.name == "layout")
    out = {"X": rng.standard_normal((T, B, I) if layout == 0 else (B, T, I)).astype(np.float32)}
    for vi in model.graph.input[1:]:
        if vi.name == "L":
            out["L"] = np.asarray([T, 3, 1], np.int32)
        else:
            d = vi.type.tensor_type.shape.dim[0 if layout == 0 else 1].dim_value
            out[vi.name] = rng.standard_normal((d, B, H) if layout == 0 else (B, d, H)).astype(np.float32)
    return out


CASES = [
    dict(op="LSTM"), dict(op="LSTM", direction="reverse", lens=True, states=True),
    dict(op="LSTM", direction="bidirectional", lens=True, states=True), dict(op="LSTM", layout=1, states=True),
    dict(op="GRU", linear_before_reset=1, direction="bidirectional", lens=True, states=True),
    dict(op="GRU", linear_before_reset=0, direction="reverse"), dict(op="RNN", direction="bidirectional", states=True),
    dict(op="LSTM", chain="constant"), dict(op="GRU", chain="concat", linear_before_reset=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_full_rank_exact_through_cli(tmp_path, case):
    m = recurrent_model(**case)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    r = cli("rewrite", src, "-o", out, "--format", "svd", "--rank", I, "--ops", "LSTM,GRU,RNN", "--force",
            "--no-validate")
    assert r.exit_code == 0, r.output
    new = onnx.load(out)
    ops = [n.op_type for n in new.graph.node]
    assert ops.count(case["op"]) == 1 and "MatMul" in ops  # the hoisted factor in front of the node
    x = feeds(m)
    # onnxruntime runs no layout-1 recurrent node: onnx's reference evaluator checks that one
    execute = run if not case.get("layout") else lambda model, f: ReferenceEvaluator(model).run(None, f)
    for a, b in zip(execute(m, x), execute(new, x)):
        assert rel_err(a, b) < 1e-4


def test_low_rank_keeps_the_node_and_shrinks_w():
    m = recurrent_model("LSTM", direction="bidirectional")
    layer = next(l for l in find_layers(m) if l.name == "rnn")
    assert layer.kind == "recurrent" and layer.weight.shape == (I, 2 * 4 * H)
    new, report = api.rewrite(m, format="svd", rank=3, ops="LSTM", validate=False, timing=False)
    row = next(r for r in report.rows if r.name == "rnn")
    assert row.params_after == 3 * (I + 2 * 4 * H) < I * 2 * 4 * H
    x = feeds(m)
    assert rel_err(run(m, x)[0], run(new, x)[0]) < 0.9


def test_train_formats_refused_with_a_reason():
    m = recurrent_model("LSTM")
    with pytest.raises(Exception, match="last core"):
        api.rewrite(m, format="tt", rank=2, ops="LSTM", validate=False, timing=False)


def test_weight_behind_concat_chain_is_found():
    m = recurrent_model("GRU", chain="concat", linear_before_reset=1)
    layer = next(l for l in find_layers(m) if l.name == "rnn")
    assert layer.reason is None and layer.weight.shape == (I, 3 * H)
    assert "W2" in layer.weight_path


def test_data_aware_fit_uses_the_node_input(tmp_path):
    m = recurrent_model("LSTM")
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((2, I))  # inputs live in a 2-D subspace
    x = (rng.standard_normal((T, 64, 2)) @ basis).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=x)
    aware, _ = api.rewrite(m, format="svd", rank=2, ops="LSTM", validate=False, timing=False, fit="aware",
                           calib=str(calib))
    free, _ = api.rewrite(m, format="svd", rank=2, ops="LSTM", validate=False, timing=False)
    test = {"X": (rng.standard_normal((T, B, 2)) @ basis).astype(np.float32)}
    want = run(m, test)[0]
    assert rel_err(want, run(aware, test)[0]) < 1e-3 < rel_err(want, run(free, test)[0])
