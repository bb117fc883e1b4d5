"""Loading and saving: external data in and out, IR clamping, atomic writes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import tnonnx
from tnonnx import model as model_io

from onnx_builders import init, make_model, randn, value


def _mlp():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return make_model(nodes, [value("x", ["batch", 64])], [value("y", ["batch", 32])],
                      [init("W1", randn(64, 96, seed=1)), init("W2", randn(96, 32, seed=2))])


def test_model_with_external_data_is_read_and_written_with_external_data(tmp_path):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(_mlp(), src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    new, report = tnonnx.rewrite(src, format="tt", rank=100000, force=True)
    assert report.validation.outputs[0].rel_l2 < 1e-5
    out = tmp_path / "out" / "small.onnx"
    tnonnx.save(new, out)
    assert (tmp_path / "out" / "small.onnx.data").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    x = randn(3, 64, seed=3)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not any(p.key.startswith("tnonnx.") for p in onnx.load(out).metadata_props)


def test_plain_model_is_written_as_one_file_with_a_loadable_ir_version(tmp_path):
    m = _mlp()
    m.ir_version = 14  # what onnx 1.23 writes by default; onnxruntime 1.31 refuses it
    new, _ = tnonnx.rewrite(m, format="svd", rank=4, validate=False)
    out = tnonnx.save(new, tmp_path / "small.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]
    max_ir, _ = model_io.runtime_limits()
    assert onnx.load(out).ir_version <= max_ir
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    new, _ = tnonnx.rewrite(_mlp(), format="svd", rank=4, validate=False)
    real_replace = model_io.os.replace

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(model_io.os, "replace", broken)
    with pytest.raises(tnonnx.TnonnxError, match="cannot write"):
        tnonnx.save(new, tmp_path / "small.onnx")
    monkeypatch.setattr(model_io.os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []
