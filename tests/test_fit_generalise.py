"""Data-aware fits on fewer calibration rows than input features: the Gram matrix is shrunk
towards the scaled identity, candidates are judged on held-out samples, the user is warned."""

from __future__ import annotations

import numpy as np
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
