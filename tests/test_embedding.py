"""Embedding tables (Gather on a constant [V x D] table): svd and tt rewrites through the CLI,
exact at full rank, tied tables, frequency-weighted fitting, the budget over them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_builders import init, make_model, randn, rel_err, run, value
from test_cli import cli
from tnonnx import api
from tnonnx.embedding import EmbeddingData, vocabulary_modes
from tnonnx.graph import find_layers

V, D = 50, 12


def embedding_model(tied: bool = False, index_dtype=TensorProto.INT64) -> onnx.ModelProto:
    """ids [b, s] -> Gather(table) -> MatMul(P) -> (tied: MatMul with the table's transpose)."""
    table = randn(V, D, seed=1)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "P"], ["h"], name="proj")]
    inits = [init("table", table), init("P", randn(D, D, seed=2))]
    out = value("h", ["b", "s", D])
    if tied:  # the output projection is the same table, transposed
        nodes += [helper.make_node("Transpose", ["table"], ["tableT"], perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "tableT"], ["logits"], name="unembed")]
        out = value("logits", ["b", "s", V])
    return make_model(nodes, [value("ids", ["b", "s"], index_dtype)], [out], inits)


def ids(seed=0, shape=(3, 7), dtype=np.int64):
    return np.random.default_rng(seed).integers(-V, V, size=shape).astype(dtype)


def test_gather_table_is_a_layer_other_gathers_are_not():
    m = embedding_model()
    # a Gather on a computed tensor (a shape) is no weight
    m.graph.node.append(helper.make_node("Shape", ["h"], ["hs"]))
    m.graph.node.append(helper.make_node("Gather", ["hs", "zero"], ["hs0"], axis=0))
    m.graph.initializer.append(init("zero", np.asarray(0, np.int64)))
    layers = {l.name: l for l in find_layers(m)}
    assert layers["embed"].kind == "embedding" and layers["embed"].weight.shape == (V, D)
    assert [l.op_type for l in layers.values()].count("Gather") == 1


@pytest.mark.parametrize("fmt,dtype", [("svd", TensorProto.INT64), ("tt", TensorProto.INT64), ("tt", TensorProto.INT32)])
def test_full_rank_exact_through_cli(tmp_path, fmt, dtype):
    m = embedding_model(index_dtype=dtype)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    r = cli("rewrite", src, "-o", out, "--format", fmt, "--rank", 64, "--ops", "Gather", "--force", "--no-validate")
    assert r.exit_code == 0, r.output
    new = onnx.load(out)
    assert not any(n.op_type == "Gather" and "table" in n.input for n in new.graph.node)
    x = ids(dtype=np.int32 if dtype == TensorProto.INT32 else np.int64)  # negative indices included
    assert rel_err(run(m, {"ids": x})[0], run(new, {"ids": x})[0]) < 1e-5


def test_tt_pads_the_vocabulary():
    assert vocabulary_modes(30522, 3) == (31, 31, 32)
    assert np.prod(vocabulary_modes(V, 2)) >= V
    m = embedding_model()
    new, report = api.rewrite(m, format="tt", rank=2, ops="Gather", validate=False, timing=False)
    row = next(r for r in report.rows if r.name == "embed")
    assert row.format == "tt" and 0 < row.params_after < V * D
    x = ids()
    assert rel_err(run(m, {"ids": x})[0], run(new, {"ids": x})[0]) < 1.0


@pytest.mark.parametrize("fit", ["data-free", "aware"])
def test_tied_table_shares_one_factorisation(tmp_path, fit):
    m = embedding_model(tied=True)
    layers = {l.name: l for l in find_layers(m)}
    assert layers["unembed"].kind == "tied" and layers["unembed"].weight_key == layers["embed"].weight_key
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=ids(seed=5, shape=(16, 7)))
    new, report = api.rewrite(m, format="svd", rank=12, ops="Gather,MatMul", include="embed|unembed", force=True,
                              validate=False, timing=False, fit=fit, calib=str(calib) if fit == "aware" else None)
    rows = {r.name: r for r in report.rows}
    assert rows["embed"].format == rows["unembed"].format == "svd"
    assert rows["unembed"].shared_with == "embed" and rows["unembed"].params_after == 0
    assert "table" not in {t.name for t in new.graph.initializer}  # one set of factors, no table
    x = ids()
    assert rel_err(run(m, {"ids": x})[0], run(new, {"ids": x})[0]) < 1e-5


def test_other_formats_refused_with_a_reason():
    m = embedding_model()
    with pytest.raises(Exception, match="svd or tt"):
        api.rewrite(m, format="tucker", rank=4, ops="Gather", validate=False, timing=False)


def test_frequency_weighted_svd_fits_frequent_rows_better(tmp_path):
    m = embedding_model()
    rng = np.random.default_rng(0)
    frequent = rng.choice(V, 3, replace=False)  # the calibration text uses 3 tokens only
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=rng.choice(frequent, size=(64, 7)).astype(np.int64))
    free, _ = api.rewrite(m, format="svd", rank=3, ops="Gather", validate=False, timing=False)
    aware, report = api.rewrite(m, format="svd", rank=3, ops="Gather", validate=False, timing=False,
                                fit="aware", calib=str(calib))
    x = rng.choice(frequent, size=(4, 7)).astype(np.int64)
    want = run(m, {"ids": x})[0]
    assert rel_err(want, run(aware, {"ids": x})[0]) < 0.05 < rel_err(want, run(free, {"ids": x})[0])
    row = next(r for r in report.rows if r.name == "embed")
    assert row.output_error is not None and row.output_error < 0.05


def test_embedding_data_weights_rows_by_count():
    w = np.eye(4, 3)
    data = EmbeddingData(np.asarray([10, 0, 0, 0]), w)
    assert data.row_weights[0] > 50 * data.row_weights[1]


def test_budget_covers_the_table():
    m = embedding_model()
    new, report = api.rewrite(m, format="svd", budget=2, ops="Gather,MatMul", validate=False, timing=False,
                              allow_slower=True)
    assert next(r for r in report.rows if r.name == "embed").format == "svd"
    assert report.totals.params_after <= (V * D + D * D) / 2 + D * D


def test_budget_covers_the_table_with_an_aware_fit(tmp_path):
    """The planner's spectrum estimates need a Gram basis; an embedding's index counts have
    none, so its svd candidates are fitted (this failed on 'EmbeddingData has no basis')."""
    m = embedding_model()
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.random.default_rng(0).integers(0, V, size=(64, 7)).astype(np.int64))
    new, report = api.rewrite(m, format="svd", budget=2, ops="Gather,MatMul", validate=False, timing=False,
                              allow_slower=True, fit="aware", calib=str(calib))
    assert next(r for r in report.rows if r.name == "embed").format == "svd"
    assert report.totals.params_after <= (V * D + D * D) / 2 + D * D
