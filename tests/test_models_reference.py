"""Reference models in models/: export with both exporters, compare with torch,
and check the committed LeNet-5/Fashion-MNIST demo model."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import reference
from models.export import MAX_IR_VERSION, export

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _check_against_torch(name, path):
    module, example, inputs, outputs, _ = reference.build(name)
    model = onnx.load(str(path))
    assert model.ir_version <= MAX_IR_VERSION
    assert [i.name for i in model.graph.input] == inputs
    assert [o.name for o in model.graph.output] == outputs
    # the batch axis is symbolic and named "batch"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = _session(path)
    gen = torch.Generator().manual_seed(1)
    for batch in (example.shape[0], 3):  # example batch and another one
        x = torch.randn((batch,) + tuple(example.shape[1:]), generator=gen)
        with torch.no_grad():
            want = module(x).numpy()
        (got,) = sess.run(None, {inputs[0]: x.numpy()})
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(reference.MODELS))
def test_legacy_export_matches_torch(name, tmp_path):
    path = export(name, tmp_path / f"{name}.onnx", dynamo=False)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert not list(tmp_path.glob("*.data"))
    _check_against_torch(name, path)


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_dynamo_export_matches_torch(name, tmp_path):
    path = export(name, tmp_path / f"{name}.dynamo.onnx", dynamo=True)
    assert not list(tmp_path.glob("*.data")), "dynamo export must be a single file"
    _check_against_torch(name, path)


def test_conv_zoo_has_all_conv_ranks(tmp_path):
    path = export("conv_zoo", tmp_path / "conv_zoo.onnx")
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    ranks = sorted(len(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "Conv")
    assert ranks == [3, 4, 5]


def test_committed_lenet5_fashion_accuracy():
    path = MODELS_DIR / "lenet5_fashion.onnx"
    model = onnx.load(str(path))
    assert model.ir_version <= MAX_IR_VERSION
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    data = np.load(MODELS_DIR / "fashion_test.npz")
    x, y = data["input"], data["labels"]
    assert x.dtype == np.float32 and x.shape == (2000, 1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (2000,)
    (logits,) = _session(path).run(["logits"], {"input": x})
    acc = float((logits.argmax(1) == y).mean())
    assert acc > 0.85, acc
