"""bench/latency.py: the synthetic layer, one case end to end (cost-model timings), table rows."""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from tnonnx import runtime

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "bench" / "latency.py")
bl = importlib.util.module_from_spec(_spec)
sys.modules["bench_latency"] = bl  # dataclasses look their module up there
_spec.loader.exec_module(bl)


def test_layer_model_runs_and_has_a_decaying_spectrum():
    model = bl.layer_model(64)
    w = numpy_helper.to_array(model.graph.initializer[0])
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    (y,) = runtime.session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-5)
    s = np.linalg.svd(w, compute_uv=False)
    assert s[8] < 0.5 * s[0] and s[16] < 0.01 * s[0]  # exp(-k/8) for k < 16, then the floor


def test_run_case_and_rows(tmp_path):
    path = tmp_path / "layer.onnx"
    import onnx

    onnx.save(bl.layer_model(256), str(path))
    x = {"x": np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)}
    case = bl.Case("layer", path, "4 x 256", batch=4, shapes={"x": (4, 256)}, kwargs=lambda: dict(inputs=x),
                   metric=lambda new, report: f"err {report.validation.outputs[0].rel_l2:.3f}")
    args = Namespace(threads=1, no_timing_cache=True, ops=None)
    row = bl.run_case(case, "svd", 2.0, None, args, tmp_path)
    assert "error" not in row, row
    assert row["params"].endswith("x") and row["accuracy"].startswith("err ")
    assert all(v > 0 for v in row["ms"] + row["retimed"])
    line = bl.format_row(row)
    assert line.count("|") == bl.HEAD.count("|") and "svd" in line
    missed = bl.run_case(case, "svd", 2.0, 1000.0, args, tmp_path)  # no rewrite is 1000x faster
    assert "--speedup 1000" in missed["error"]
    assert bl.format_row(missed).count("|") == bl.HEAD.count("|")
    assert not list(tmp_path.glob("rewritten-*.onnx"))


def test_unknown_model_is_refused():
    with pytest.raises(SystemExit):
        bl.main(["--models", "lenet,nonsense"])
