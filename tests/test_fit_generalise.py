"""Data-aware fits on fewer calibration rows than input features: the Gram matrix is shrunk
towards the scaled identity, candidates are judged on held-out samples, the user is warned.
Where no planner judges candidates, the final fit uses all rows (LayerData.pooled)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import tnonnx
from tnonnx import activations
from tnonnx import fit as fitting
from tnonnx.formats import RankSpec, svd
from tnonnx.graph import Layer

from onnx_builders import init, make_model, run, value

N, M, ROWS = 64, 48, 32  # fewer calibration rows than input features


def _case(seed: int = 0):
    """Inputs spread over many directions (a slowly decaying spectrum): 32 rows see only part
    of them. Returns (model, weight, calibration rows, fresh rows from the same law)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((N, N)) * np.exp(-np.arange(N) / 64.0)[:, None]
    w = rng.standard_normal((N, M))
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [value("x", ["b", N])],
                       [value("y", ["b", M])], [init("W", w.astype(np.float32))])
    return model, w, rng.standard_normal((ROWS, N)) @ mix, rng.standard_normal((4000, N)) @ mix


def _capture(model, x):
    probe = activations.Probe("dense")
    return activations.capture(model, {"x": [probe]}, [{"x": x.astype(np.float32)}])[("x", probe.key)]


def test_an_undersampled_fit_beats_the_data_free_fit_on_new_inputs(monkeypatch):
    model, w, x, fresh = _case()
    layer = Layer("mm", "MatMul", None, None, kind="dense", weight=w)
    cap = _capture(model, x)
    assert cap.count == 24 and cap.held_count == 8  # a quarter of the samples held out
    error = lambda f: np.linalg.norm(fresh @ w - f.apply(fresh)) / np.linalg.norm(fresh @ w)  # noqa: E731
    data = fitting.layer_data(layer, cap)
    assert 0 < data.shrinkage < 1
    spec = RankSpec(rank=16)
    shrunk, free = svd.fit_dense(w, spec, data=data), svd.fit_dense(w, spec)
    monkeypatch.setattr(fitting, "shrinkage", lambda capture: 0.0)
    trusting = svd.fit_dense(w, spec, data=fitting.layer_data(layer, cap))
    assert error(trusting) > error(free)  # the Gram matrix taken at its word: worse than no data
    assert error(shrunk) < error(free)


def test_well_sampled_gram_matrices_are_not_shrunk():
    model, w, _, fresh = _case(seed=1)
    cap = _capture(model, fresh[:400])
    assert fitting.shrinkage(cap) == 0.0


def test_the_rewrite_warns_and_reports_the_held_out_error():
    model, w, x, fresh = _case(seed=2)
    small, report = tnonnx.rewrite(model, format="svd", rank=16, fit="aware", calib={"x": x.astype(np.float32)},
                                   validate=False, timing=False)
    assert any("fewer calibration rows than input features" in n and "mm (24 < 64)" in n for n in report.notes)
    row = next(r for r in report.rows if r.format)
    assert row.held_out_error is not None and row.output_error is not None
    assert "held_out_error" in report.to_dict()["layers"][0]
    y = run(small, {"x": fresh[:64].astype(np.float32)})[0]
    assert np.isfinite(y).all()


def test_pooled_data_is_the_data_of_all_calibration_rows(monkeypatch):
    model, w, _, fresh = _case(seed=3)
    x = fresh[:400]  # well sampled: no shrinkage, so the pooled Gram matrix is the plain one
    layer = Layer("mm", "MatMul", None, None, kind="dense", weight=w)
    data = fitting.layer_data(layer, _capture(model, x))
    assert data.held_basis is not None and (data.rows, data.held_rows) == (300, 100)
    pooled = data.pooled()
    monkeypatch.setattr(activations, "HOLDOUT_EVERY", 10**9)
    whole = fitting.layer_data(layer, _capture(model, x))
    assert whole.held_basis is None and pooled.held_basis is None and pooled.rows == whole.rows == 400
    gram = whole.basis.T @ whole.basis
    np.testing.assert_allclose(pooled.basis.T @ pooled.basis, gram, rtol=1e-6, atol=1e-6 * np.abs(gram).max())
    np.testing.assert_allclose(pooled.basis.T @ pooled.target, gram @ w, rtol=1e-6, atol=1e-6 * np.abs(gram @ w).max())
    assert whole.pooled() is whole


def _fits(pool_final: bool, rank: int = 6, format: str = "svd"):
    """(layer, its data, split fit, final fit): LeNet-5's fc1 at a rank, 96 calibration images."""
    from pathlib import Path

    import onnx

    from tnonnx import api, calibrate
    from tnonnx.graph import find_layers
    from tnonnx.plan import Fitter

    root = Path(__file__).resolve().parents[1]
    model = onnx.load(root / "models" / "lenet5_fashion.onnx")
    with np.load(root / "models" / "fashion_calib.npz") as f:
        rows = {"input": f["input"][:96]}
    layer = next(layer for layer in find_layers(model) if layer.kind == "dense")
    batches, _ = calibrate.feed_batches(rows, model, batch=32, shapes=None, what="--calib")
    data = api.layer_data(model, [layer], batches)
    fitter = Fitter(None, data, pool_final=pool_final)
    split = fitter.fit(layer, format, RankSpec(rank=rank), pool=False)
    return layer, data[layer.name], split, fitter.fit(layer, format, RankSpec(rank=rank))


def test_a_fixed_rank_fit_is_made_again_on_all_rows():
    layer, data, split, final = _fits(pool_final=True)
    pooled = data.pooled()
    assert final is not split
    want = svd.fit_dense(layer.weight, RankSpec(rank=6), data=pooled)
    np.testing.assert_allclose(final.to_dense(), want.to_dense(), rtol=1e-9, atol=1e-12)
    # better on all rows than the fit without the held-out ones; its held-out error is that fit's
    assert final.output_error < pooled.output_error(split)
    assert final.held_out_error == split.held_out_error == data.held_out_error(split)


def test_the_split_fit_behind_a_pooled_one_is_measured_on_its_held_out_rows_only():
    """Asked first for the final fit, the fitter measures the split fit's held-out error and
    nothing else of it (its output and weight errors would be an extra product per layer)."""
    from tnonnx.plan import Fitter

    layer, data, measured_split, want = _fits(pool_final=True)
    fitter = Fitter(None, {layer.name: data}, pool_final=True)
    final = fitter.fit(layer, "svd", RankSpec(rank=6))
    split = fitter.fit(layer, "svd", RankSpec(rank=6), pool=False, measure=False)
    assert not split.measured and split.output_error is None and split.weight_error is None
    assert final.held_out_error == pytest.approx(measured_split.held_out_error, rel=1e-12)
    assert (final.output_error, final.weight_error) == pytest.approx((want.output_error, want.weight_error), rel=1e-12)


def test_a_refined_chain_keeps_its_fit():
    _, _, split, final = _fits(pool_final=True, rank=4, format="tt")
    assert final is split  # refining again on all rows cost time for no gain (docs/RESULTS.md)


def test_without_pool_final_the_final_fit_is_the_split_fit():
    _, _, split, final = _fits(pool_final=False)
    assert final is split


def test_a_rewrite_refits_on_all_rows_only_where_no_planner_judged():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with np.load(root / "models" / "fashion_calib.npz") as f:
        rows = {"input": f["input"][:96]}
    lenet = root / "models" / "lenet5_fashion.onnx"
    _, fixed = tnonnx.rewrite(lenet, format="svd", rank=6, fit="aware", calib=rows, validate=False, timing=False)
    _, planned = tnonnx.rewrite(lenet, format="svd", budget="3x", fit="aware", calib=rows, validate=False,
                                timing=False, allow_slower=True)
    layer, data, split, final = _fits(pool_final=True)
    row = next(r for r in fixed.rows if r.name == layer.name)
    assert row.output_error == final.output_error and row.held_out_error == split.held_out_error
    # the planner's fit is emitted as judged, on the rows without the held-out ones
    row = next(r for r in planned.rows if r.name == layer.name)
    _, _, judged, emitted = _fits(pool_final=False, rank=row.ranks[0])
    assert emitted is judged and (row.output_error, row.held_out_error) == (judged.output_error, judged.held_out_error)
