"""--budget and --format auto consider every rewritable weight by default (embedding tables,
recurrent input weights), the planner deciding per layer; a fixed rank rule keeps to the
plain layers. A factorised table is always slower than one Gather: under --budget it is
chosen only where the other rewritten layers save the time it costs (tnonnx/choose.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_builders import init, make_model, randn, run, value
from tnonnx import api
from tnonnx.errors import TnonnxError

MODELS = Path(__file__).resolve().parents[1] / "models"
V, D, F, S = 2000, 64, 512, 32


def table_mlp() -> onnx.ModelProto:
    """ids [1, S] -> Gather(table V x D) -> MatMul(D x F) -> Relu -> MatMul(F x D): the table
    holds 2/3 of the parameters, so 3x fewer parameters needs it factorised."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    # low-rank table and weights, so that small ranks keep the error low
    table = randn(V, 8, seed=1) @ randn(8, D, seed=2)
    inits = [init("table", table), init("W1", randn(D, 16, seed=3) @ randn(16, F, seed=4) / 16),
             init("W2", randn(F, 16, seed=5) @ randn(16, D, seed=6) / 64)]
    return make_model(nodes, [value("ids", [1, S], TensorProto.INT64)], [value("y", [1, S, D])], inits)


def _rows(report):
    return {r.name: r for r in report.rows}


def test_budget_selects_the_table_by_default_and_pays_for_its_time():
    model = table_mlp()
    new, report = api.rewrite(model, format="svd", budget=3, timing=False, validate=False)
    rows = _rows(report)
    assert report.settings["ops"] == ["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN"]
    assert rows["embed"].format == "svd"  # no --ops, no --allow-slower
    assert report.totals.params_before / report.totals.params_after >= 3
    note = next(n for n in report.notes if n.startswith("never slower than dense: 1 embedding table"))
    after, before = (float(v.split(" ms")[0]) for v in note.split("take ")[1].split(" against "))
    assert after <= before
    # the table's replacement alone is slower than its Gather, the MatMuls' are faster
    assert rows["embed"].ms_after > rows["embed"].ms_before
    assert rows["up"].ms_after < rows["up"].ms_before
    ids = np.random.default_rng(0).integers(0, V, (1, S))
    want, got = run(model, {"ids": ids})[0], run(new, {"ids": ids})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3


def test_a_table_alone_is_never_paid_for():
    """With nothing else rewritten, no time is saved that a slower table could spend: the
    budget is refused under the never-slower rule, and --allow-slower lifts it."""
    with pytest.raises(TnonnxError, match="together no slower than dense"):
        api.rewrite(table_mlp(), format="svd", budget=2, ops="Gather", timing=False, validate=False)
    _, report = api.rewrite(table_mlp(), format="svd", budget=2, ops="Gather", timing=False, validate=False,
                            allow_slower=True)
    assert _rows(report)["embed"].format == "svd"


def test_auto_without_a_budget_keeps_the_table_to_the_per_layer_rule():
    _, report = api.rewrite(table_mlp(), format="auto", rank=8, timing=False, validate=False)
    rows = _rows(report)
    assert "slower than the dense layer" in rows["embed"].reason
    assert rows["up"].format is not None


def test_a_fixed_rank_keeps_to_the_plain_layers():
    """--format svd --rank 8 without --ops: one rank cap would also truncate the table."""
    _, report = api.rewrite(table_mlp(), format="svd", rank=8, timing=False, validate=False)
    rows = _rows(report)
    assert rows["embed"].reason == "op Gather not selected (--ops)"
    assert rows["up"].format == "svd" and rows["down"].format == "svd"


def test_budget_on_the_lstm_model_considers_the_recurrent_weights():
    """The real LSTM model: --budget without --ops plans the node's W (hoisted svd) with the
    head; its R row says how it could be rewritten."""
    _, report = api.rewrite(str(MODELS / "lstm_fashion.onnx"), format="svd", budget=1.5, timing=False,
                            validate=False, allow_slower=True)
    rows = _rows(report)
    assert rows["/rnn/LSTM"].format == "svd"
    assert "--recurrent scan" in rows["/rnn/LSTM/R"].reason
    w = rows["/rnn/LSTM"]
    assert w.params_after < w.params_before and rows["/rnn/LSTM/R"].params_after is None
    # the W row's MACs after count the hoisted chain and the node's new W, not R
    assert w.macs_after < w.macs_before + rows["/rnn/LSTM/R"].macs_before


def test_budget_with_aware_fitting_weights_the_table_by_its_index_counts():
    """The planner reads the frequency-weighted table's errors off one SVD (estimate.py)."""
    calib = {"ids": np.random.default_rng(1).integers(0, V // 4, (24, S))}  # a quarter of the rows in use
    _, report = api.rewrite(table_mlp(), format="svd", budget=3, fit="aware", calib=calib, timing=False,
                            validate=False)
    row = _rows(report)["embed"]
    assert row.format == "svd" and row.output_error is not None and row.output_error < row.weight_error
