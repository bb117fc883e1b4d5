"""Data-aware fitting (--fit aware): calibration Gram matrices and the whitened SVD."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

import tnonnx
from tnonnx import calibrate
from tnonnx import fit as fitting
from tnonnx.graph import Layer
from tnonnx.cli import main
from tnonnx.formats import RankSpec, svd

from onnx_builders import init, make_model, randn, value

ROOT = Path(__file__).resolve().parents[1]
LENET, FASHION = ROOT / "models" / "lenet5_fashion.onnx", ROOT / "models" / "fashion_test.npz"


def _correlated_inputs(n: int, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 6.0)  # a few dominant directions
    return rng.standard_normal((rows, n)) @ mix


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16, 32])
def test_whitened_svd_never_has_a_larger_calibration_output_error(rank):
    w = randn(64, 48, seed=1).astype(np.float64)
    x = _correlated_inputs(64, 500, seed=2)
    plain = svd.fit_dense(w, RankSpec(rank=rank))
    aware = svd.fit_dense(w, RankSpec(rank=rank), data=_data(x, w))
    error = lambda f: np.linalg.norm(x @ w - f.apply(x)) / np.linalg.norm(x @ w)
    assert aware.params() == plain.params()
    assert error(aware) <= error(plain) + 1e-9


def test_whitened_svd_is_exact_at_full_rank():
    w = randn(32, 24, seed=3).astype(np.float64)
    x = _correlated_inputs(32, 200, seed=4)
    fact = svd.fit_dense(w, RankSpec(rank=10**6), data=_data(x, w))
    assert fact.relative_error(w) < 1e-8


def _data(x: np.ndarray, w: np.ndarray) -> fitting.LayerData:
    layer = Layer("mm", "MatMul", None, None, kind="dense", weight=w)
    return fitting.layer_data(layer, calibrate.Capture(x.T @ x, x.shape[0]))


def test_capture_accumulates_over_batches():
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    m = make_model(nodes, [value("x", ["b", 3, 8])], [value("y", ["b", 3, 4])], [init("W", randn(8, 4, seed=5))])
    xs = [randn(2, 3, 8, seed=s) for s in (6, 7, 8)]
    probe = calibrate.Probe("dense")
    captures = calibrate.capture(m, {"h": [probe]}, [{"x": x} for x in xs])
    rows = np.concatenate([np.maximum(x, 0).reshape(-1, 8) for x in xs]).astype(np.float64)
    cap = captures[("h", probe.key)]
    assert cap.count == 18 and cap.cross is None
    np.testing.assert_allclose(cap.gram, rows.T @ rows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cap.samples, rows, rtol=1e-6)  # fewer rows than the sample bound: all kept


def test_aware_svd_keeps_more_of_lenet_on_held_out_images():
    data = np.load(FASHION)
    calib = {"input": data["input"][:1000]}
    held_out = {"input": data["input"][1000:], "labels": data["labels"][1000:]}
    _, plain = tnonnx.rewrite(LENET, format="svd", rank=8, inputs=held_out)
    _, aware = tnonnx.rewrite(LENET, format="svd", rank=8, fit="aware", calib=calib, inputs=held_out)
    assert aware.totals.params_after == plain.totals.params_after
    assert aware.validation.outputs[0].cosine > plain.validation.outputs[0].cosine
    assert aware.validation.accuracy_test > plain.validation.accuracy_test


def test_cli_fit_aware_with_random_calibration(tmp_path):
    out = tmp_path / "small.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "svd", "--rank", "8", "--fit", "aware",
                                       "--calib-random", "64", "-o", str(out), "--no-validate"])
    assert result.exit_code == 0, result.output
    assert out.exists()
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--fit", "aware", "--calib", str(FASHION),
                                       "--calib-random", "8", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "one of --calib" in result.output
