"""`tnonnx inspect` lists every node that carries a constant weight, with parameters, MACs
and either "candidate" or the reason it is left alone, and says which share of the model
is rewritable; the table stays within 80 columns."""

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx_builders import init, randn, run, value

from tnonnx import api
from tnonnx.cli import main

H, IN, SEQ = 8, 6, 5


def _zoo() -> onnx.ModelProto:
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "W"], ["a"], name="dense"),  # candidate
        n("Transpose", ["a"], ["a_t"], perm=[1, 0]),
        n("MatMul", ["a", "a_t"], ["scores"], name="attention"),  # both inputs computed
        n("Conv", ["img", "Wdw"], ["dw"], name="depthwise", group=4),
        n("ConvTranspose", ["img", "Wup"], ["up"], name="upsample", strides=[2, 2]),  # candidate
        n("LSTM", ["seq", "Wl", "Rl", "Bl"], ["hl"], name="lstm", hidden_size=H),
        n("GRU", ["seq", "Wg", "Rg"], ["hg"], name="gru", hidden_size=H),
        n("RNN", ["seq", "Wr", "Rr"], ["hr"], name="rnn", hidden_size=H),
        n("Gather", ["table", "ids"], ["emb"], name="embedding"),
        n("Shape", ["emb"], ["emb_shape"]),
        n("Gather", ["emb_shape", "zero"], ["emb_rows"], name="shape_gather"),  # no weight: no row
        n("MatMulInteger", ["q", "Wq"], ["qi"], name="int8_matmul"),
        n("DequantizeLinear", ["Wq8", "scale"], ["Wdq"]),
        n("MatMul", ["x", "Wdq"], ["dq"], name="dequantized"),
    ]
    inits = [init("W", randn(IN, 4)), init("Wdw", randn(4, 1, 3, 3)), init("Wup", randn(4, 3, 2, 2)),
             init("Wl", randn(1, 4 * H, IN)), init("Rl", randn(1, 4 * H, H)), init("Bl", randn(1, 8 * H)),
             init("Wg", randn(1, 3 * H, IN)), init("Rg", randn(1, 3 * H, H)), init("Wr", randn(1, H, IN)),
             init("Rr", randn(1, H, H)), init("table", randn(50, 4)), init("zero", np.array(0, np.int64)),
             init("Wq", np.ones((4, 3), np.int8)), init("Wq8", np.ones((IN, 3), np.int8)),
             init("scale", np.array(0.1, np.float32))]
    inputs = [value("x", [2, IN]), value("img", [1, 4, 6, 6]), value("seq", [SEQ, 2, IN]),
              value("ids", [2, 3], TensorProto.INT64), value("q", [2, 4], TensorProto.UINT8)]
    outputs = [value("scores", [2, 2]), value("dw", [1, 4, 4, 4]), value("up", [1, 3, 12, 12]),
               *(value(o, [SEQ, 1, 2, H]) for o in ("hl", "hg", "hr")), value("emb_rows", [], TensorProto.INT64),
               value("qi", [2, 3], TensorProto.INT32), value("dq", [2, 3])]
    graph = helper.make_graph(nodes, "zoo", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_every_weight_gets_a_row_with_its_reason():
    report = api.inspect(_zoo())
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {"dense", "attention", "depthwise", "upsample", "lstm", "gru", "rnn", "embedding",
                         "int8_matmul", "dequantized", "lstm/R", "gru/R", "rnn/R"}
    assert rows["dense"].reason is None and rows["upsample"].reason is None
    assert "both inputs are computed" in rows["attention"].reason and rows["attention"].params_before == 0
    assert rows["depthwise"].reason.startswith("depthwise conv")
    # recurrent nodes and embedding tables are candidates (tnonnx/recurrent.py, tnonnx/embedding.py)
    assert rows["lstm"].reason is rows["gru"].reason is rows["rnn"].reason is rows["embedding"].reason is None
    assert rows["int8_matmul"].reason == "already quantized"
    assert rows["dequantized"].reason == "weight is quantized (DequantizeLinear)"
    assert rows["dequantized"].weight_shape == [IN, 3] and rows["dequantized"].params_before == IN * 3
    # a recurrent node has a row for W (a candidate: hoisted in front of the node) and one for
    # R (left alone unless --recurrent scan), each with its share of the node's MACs
    assert rows["lstm"].params_before == 4 * H * IN and rows["lstm/R"].params_before == 4 * H * H
    assert rows["lstm"].weight_shape == [IN, 4 * H] and rows["lstm/R"].weight_shape == [H, 4 * H]
    assert rows["lstm"].macs_before == SEQ * 2 * 4 * H * IN and rows["lstm/R"].macs_before == SEQ * 2 * 4 * H * H
    assert rows["gru"].macs_before + rows["gru/R"].macs_before == SEQ * 2 * (3 * H * IN + 3 * H * H)
    for op in ("lstm", "gru", "rnn"):
        assert "--recurrent scan" in rows[f"{op}/R"].reason
    assert rows["embedding"].params_before == 200 and rows["embedding"].macs_before == 0
    assert rows["upsample"].weight_shape == [4, 3, 2, 2] and rows["upsample"].macs_before == 4 * 36 * 3 * 4
    assert report.rewritable_params == IN * 4 + 4 * 3 * 2 * 2 + IN * H * (4 + 3 + 1) + 200


def test_inspect_prints_the_rewritable_share_within_80_columns(tmp_path):
    path = tmp_path / "zoo.onnx"
    onnx.save(_zoo(), path)
    result = CliRunner().invoke(main, ["inspect", str(path)], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    total = api.inspect(_zoo()).totals.params_before
    assert f"rewritable: 656 parameters in 6 candidate layers ({100 * 656 / total:.1f}% of the model)" in result.output
    assert "lstm" in result.output and "candidate" in result.output
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    data = json.loads(result.output)
    assert data["totals"]["params_rewritable"] == 656 and len(data["layers"]) == 13


def test_inspect_recurrent_scan_lists_w_and_r_as_candidates(tmp_path):
    """--recurrent scan: the recurrent nodes as the rewrite would see them, W and R rewritable;
    the rewritable share grows by the R weights."""
    fused, scan = api.inspect(_zoo()), api.inspect(_zoo(), recurrent="scan")
    rows = {r.name: r for r in scan.rows}
    assert rows["lstm/W0"].reason is None and rows["lstm/R0"].reason is None
    assert rows["lstm/R0"].params_before == 4 * H * H and rows["gru/R0"].params_before == 2 * H * H
    r_params = 4 * H * H + 3 * H * H + H * H  # GRU's R splits into z,r (used on h) and h (on r*h)
    assert 0 <= scan.totals.params_before - fused.totals.params_before < 20  # the Scan form's index constants
    assert scan.rewritable_params == fused.rewritable_params + r_params
    path = tmp_path / "zoo.onnx"
    onnx.save(_zoo(), path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--recurrent", "scan", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["totals"]["params_rewritable"] == 656 + r_params


def test_the_zoo_runs():
    feeds = {"x": randn(2, IN), "img": randn(1, 4, 6, 6), "seq": randn(SEQ, 2, IN),
             "ids": np.array([[1, 2, 3], [4, 5, 6]]), "q": np.ones((2, 4), np.uint8)}
    assert len(run(_zoo(), feeds)) == 9
