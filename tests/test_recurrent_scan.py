"""--recurrent scan: LSTM/GRU/RNN nodes written as MatMul + Scan compute what the fused
kernels compute, and their recurrent weights R are then rewritten like any dense layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_builders import rel_err, run
from test_cli import cli
from test_recurrent import CASES, H, I, T, feeds, recurrent_model
from tnonnx import api
from tnonnx.graph import find_layers
from tnonnx.recurrent_scan import to_scan

SCAN_CASES = [c for c in CASES if not c.get("layout")]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_scan_form_equals_the_fused_node(case):
    m = recurrent_model(**case)
    scan = onnx.ModelProto()
    scan.CopyFrom(m)
    notes, _ = to_scan(scan)
    onnx.checker.check_model(scan)
    assert case["op"] not in [n.op_type for n in scan.graph.node] and "Scan" in [n.op_type for n in scan.graph.node]
    assert any("MatMul + Scan" in n for n in notes)
    x = feeds(m)
    for a, b in zip(run(m, x), run(scan, x)):
        assert rel_err(a, b) < 1e-5


def test_layout_one_stays_fused_with_a_note():
    m = recurrent_model("LSTM", layout=1)
    notes, _ = to_scan(m)
    assert "LSTM" in [n.op_type for n in m.graph.node] and any("layout 1" in n for n in notes)


def test_recurrent_weights_become_dense_layers():
    m = recurrent_model("GRU", direction="bidirectional", linear_before_reset=1)
    to_scan(m)
    layers = {l.name: l for l in find_layers(m) if l.reason is None}
    assert layers["rnn/W0"].weight.shape == (I, 3 * H) and layers["rnn/R1"].weight.shape == (H, 3 * H)


@pytest.mark.parametrize("fmt", ["svd", "tt"])
def test_full_rank_rewrite_of_w_and_r_through_cli(tmp_path, fmt):
    m = recurrent_model("LSTM", direction="bidirectional", lens=True, states=True)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    r = cli("rewrite", src, "-o", out, "--format", fmt, "--rank", 64, "--recurrent", "scan", "--force",
            "--no-validate", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    new = onnx.load(out)
    bodies = [a.g for n in new.graph.node if n.op_type == "Scan" for a in n.attribute if a.name == "body"]
    assert len(bodies) == 2 and all(sum(n.op_type == "MatMul" for n in g.node) >= 2 for g in bodies)
    x = feeds(m)
    for a, b in zip(run(m, x), run(new, x)):
        assert rel_err(a, b) < 1e-4
    import json

    rows = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert {"rnn/R0", "rnn/R1", "rnn/W0", "rnn/W1"} <= {r["name"] for r in rows if r.get("format") == fmt}


def test_low_rank_r_shrinks_the_cell():
    m = recurrent_model("LSTM")
    new, report = api.rewrite(m, format="svd", rank=2, recurrent="scan", validate=False, timing=False)
    row = next(r for r in report.rows if r.name == "rnn/R0")
    assert row.params_after == 2 * (H + 4 * H) < row.params_before == 4 * H * H
    x = feeds(m)
    assert np.isfinite(run(new, x)[0]).all()


def test_aware_fit_calibrates_r_on_the_state_sequence(tmp_path):
    m = recurrent_model("GRU", linear_before_reset=1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=np.random.default_rng(3).standard_normal((T, 32, I)).astype(np.float32))
    scan = onnx.ModelProto()
    scan.CopyFrom(m)
    _, states = to_scan(scan)
    assert set(states) == {"rnn/R0"}
    _, report = api.rewrite(m, format="svd", rank=4, recurrent="scan", validate=False, timing=False,
                            fit="aware", calib=str(calib))
    rows = {r.name: r for r in report.rows}
    assert rows["rnn/R0"].output_error is not None and rows["rnn/W0"].output_error is not None


def test_finetune_interpreter_runs_the_scan_form():
    import torch

    from tnonnx.finetune import GraphModule

    m = recurrent_model("LSTM", direction="bidirectional", lens=True, states=True)
    x = feeds(m)
    to_scan(m)
    got = GraphModule(m, set())({k: torch.as_tensor(v) for k, v in x.items()})
    for a, b in zip(run(m, x), got):
        assert rel_err(a, b.detach().numpy()) < 1e-5


def _recurrent_in_if() -> onnx.ModelProto:
    """cond ? LSTM(X) : reverse GRU(X), each inside an If branch, with the weights of the
    main graph (the LSTM's) or of the branch (the GRU's)."""
    from onnx import TensorProto, helper

    from onnx_builders import init, make_model, randn, value

    lstm = helper.make_graph(
        [helper.make_node("LSTM", ["X", "Wl", "Rl", "Bl"], ["", "h_then"], name="lstm", hidden_size=H)],
        "then", [], [value("h_then", [1, "b", H])])
    gru = helper.make_graph(
        [helper.make_node("GRU", ["X", "Wg", "Rg"], ["", "h_else"], name="gru", hidden_size=H, direction="reverse",
                          linear_before_reset=1)],
        "else", [], [value("h_else", [1, "b", H])],
        [init("Wg", randn(1, 3 * H, I, seed=4) * 0.4), init("Rg", randn(1, 3 * H, H, seed=5) * 0.4)])
    node = helper.make_node("If", ["cond"], ["h"], then_branch=lstm, else_branch=gru)
    inits = [init("Wl", randn(1, 4 * H, I, seed=1) * 0.4), init("Rl", randn(1, 4 * H, H, seed=2) * 0.4),
             init("Bl", randn(1, 8 * H, seed=3) * 0.1)]
    return make_model([node], [value("cond", [], TensorProto.BOOL), value("X", [T, "b", I])],
                      [value("h", [1, "b", H])], inits, opset=14)


def test_nodes_inside_if_branches_are_written_as_scans():
    m = _recurrent_in_if()
    scan = onnx.ModelProto()
    scan.CopyFrom(m)
    notes, states = to_scan(scan)
    onnx.checker.check_model(scan)
    assert any("2 recurrent node(s)" in n for n in notes) and not states  # no main-graph state to calibrate on
    branches = [a.g for a in scan.graph.node[0].attribute]
    assert all("Scan" in [n.op_type for n in g.node] for g in branches)
    assert not {t.name for t in scan.graph.initializer} & {"Wl", "Rl"}  # replaced by the Scan form's weights
    names = {l.name for l in find_layers(scan) if l.reason is None}
    assert {"lstm/W0", "lstm/R0", "gru/W0", "gru/R0"} <= names
    new, report = api.rewrite(m, format="svd", rank=64, recurrent="scan", force=True, validate=False, timing=False)
    x = np.random.default_rng(0).standard_normal((T, 3, I)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "X": x}
        assert rel_err(run(m, feeds)[0], run(new, feeds)[0]) < 1e-4
    assert {"lstm/R0", "gru/R0"} <= {r.name for r in report.rows if r.format == "svd"}
