import json
import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tnonnx import model as tmodel
import sys

import tnonnx.validate  # noqa: F401  (the package's `validate` attribute is the function)
from tnonnx import runtime

validation = sys.modules["tnonnx.validate"]
from tnonnx.errors import TnonnxError

W = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, -1.0, 1.0], [1.0, 1.0, 1.0]], np.float32)


def classifier(w=W, batch_dim="N", input_name="x"):
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "w"], ["logits"])],
        "clf",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, 3])],
        initializer=[numpy_helper.from_array(np.asarray(w, np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


# --- metrics ---


def test_identical_outputs():
    a = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    (o,) = validation.compare({"y": a}, {"y": a.copy()})
    assert (o.name, o.shape) == ("y", (5, 3))
    assert o.max_abs == 0 and o.max_rel == 0 and o.rel_l2 == 0
    assert o.cosine == pytest.approx(1.0) and o.snr_db == math.inf and o.top1 == 1.0
    assert o.allclose(0, 0)


def test_known_perturbation():
    a = np.array([[3.0, 4.0]])
    b = np.array([[3.0, 4.5]])
    (o,) = validation.compare({"y": a}, {"y": b})
    assert o.max_abs == 0.5
    assert o.max_rel == pytest.approx(0.5 / 4, rel=1e-12)
    assert o.rel_l2 == pytest.approx(0.1, rel=1e-12)  # 0.5 / 5
    assert o.snr_db == pytest.approx(20.0, rel=1e-12)  # 10 log10(25 / 0.25)
    assert o.cosine == pytest.approx(27.0 / (5.0 * math.sqrt(29.25)), rel=1e-12)
    assert o.top1 == 1.0  # argmax is the last column in both
    assert o.allclose(atol=0.5, rtol=0) and not o.allclose(atol=0.49, rtol=0)
    assert o.allclose(atol=0, rtol=0.125) and not o.allclose(atol=0, rtol=0.12)  # relative to the reference


def test_zero_outputs():
    z = np.zeros((2, 3), np.float32)
    (o,) = validation.compare({"y": z}, {"y": z})
    assert o.cosine == 1.0 and o.snr_db == math.inf and o.max_rel == 0 and o.rel_l2 == 0
    (o,) = validation.compare({"y": z}, {"y": z + 1})
    assert o.cosine == 0.0 and o.snr_db == -math.inf and o.max_rel == math.inf and o.rel_l2 == math.inf


def test_top1_only_for_class_scores():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 3))
    b = a.copy()
    b[0] = -b[0]  # flips the argmax of row 0
    (o,) = validation.compare({"y": a}, {"y": b})
    assert o.top1 == 0.75
    for x in (rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 1)), np.arange(6).reshape(2, 3)):
        assert validation.compare({"y": x}, {"y": x})[0].top1 is None


def test_compare_rejects_different_outputs():
    a = np.zeros((2, 3))
    with pytest.raises(TnonnxError, match="different outputs"):
        validation.compare({"y": a}, {"z": a})
    with pytest.raises(TnonnxError, match=r"shape \[2, 3\] in the reference but \[3, 2\]"):
        validation.compare({"y": a}, {"y": a.T})


def test_run_concatenates_batches():
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    out = validation.run(classifier(), [{"x": x[:2]}, {"x": x[2:]}])
    np.testing.assert_allclose(out["logits"], x @ W, rtol=1e-6)


# --- validate() ---


def test_validate_identical_models_pass():
    result = validation.validate(classifier(), classifier(), batch=4, atol=0, min_cosine=0.9999)
    assert result.ok and result.failures == []
    # made-up feeds: at least RANDOM_SAMPLES samples in batches of 4, and the result says so
    assert result.samples == validation.RANDOM_SAMPLES and (result.atol, result.rtol) == (0, 0)
    assert result.random_feeds and result.to_dict()["feeds"] == "random"
    d = result.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["outputs"][0]["snr_db"] == "inf" and d["ok"] is True


def test_validate_thresholds(tmp_path):
    path = tmp_path / "ref.onnx"
    tmodel.save(classifier(), path)
    perturbed = classifier(W + 0.01)
    loose = validation.validate(path, perturbed, batch=8, atol=1.0, min_cosine=0.99)
    assert loose.ok
    tight = validation.validate(str(path), perturbed, batch=8, atol=1e-4, rtol=1e-4, min_cosine=0.999999)
    assert not tight.ok
    assert len(tight.failures) == 2
    assert tight.failures[0].startswith("output 'logits': not within atol=0.0001 rtol=0.0001")
    assert tight.failures[1].startswith("output 'logits': cosine")
    assert validation.validate(path, perturbed, batch=8).ok  # no thresholds, nothing fails


def test_validate_accuracy_with_labels(tmp_path):
    x = np.eye(4, dtype=np.float32)  # logits are the rows of W: argmax 0, 1, 2, 0
    labels = np.array([0, 1, 2, 2])
    path = tmp_path / "data.npz"
    np.savez(path, x=x.astype(np.float64), labels=labels)
    w2 = W.copy()
    w2[1] = [3, 0, 0]  # sample 1 now predicts class 0
    result = validation.validate(classifier(), classifier(w2), inputs=path)
    assert result.accuracy_ref == 0.75 and result.accuracy_test == 0.5
    assert result.outputs[0].top1 == 0.75
    # explicit labels win over the file's
    result = validation.validate(classifier(), classifier(w2), inputs={"x": x}, labels=[0, 0, 2, 0])
    assert result.accuracy_ref == 0.75 and result.accuracy_test == 1.0
    with pytest.raises(TnonnxError, match="labels"):
        validation.validate(classifier(), classifier(), inputs={"x": x}, labels=[0, 1])


def test_validate_chunks_many_samples():
    x = np.random.default_rng(0).standard_normal((150, 4)).astype(np.float32)
    result = validation.validate(classifier(), classifier(), inputs={"x": x}, atol=0)
    assert result.samples == 150 and result.outputs[0].shape == (150, 3) and result.ok
    fixed = validation.validate(classifier(batch_dim=2), classifier(batch_dim=2), inputs={"x": x[:6]})
    assert fixed.samples == 6 and fixed.outputs[0].shape == (6, 3)


def test_validate_with_reader():
    class Reader:
        def __init__(self):
            self.items = iter([{"x": np.ones((2, 4), np.float32)}, {"x": np.zeros((3, 4), np.float32)}])

        def get_next(self):
            return next(self.items, None)

    result = validation.validate(classifier(), classifier(), inputs=Reader())
    assert result.samples == 5 and result.outputs[0].shape == (5, 3)


def test_validate_errors(tmp_path):
    with pytest.raises(TnonnxError, match="different inputs"):
        validation.validate(classifier(), classifier(input_name="input"))
    with pytest.raises(TnonnxError, match="candidate '.*missing.onnx': no such file"):
        validation.validate(classifier(), tmp_path / "missing.onnx")
    with pytest.raises(TnonnxError, match="expected None, a number of random samples, an .npz path"):
        validation.validate(classifier(), classifier(), inputs=[42])
    assert validation.validate(classifier(), classifier(), inputs=42).samples == 42


def test_session_errors_are_one_line():
    broken = classifier()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(TnonnxError) as info:
        runtime.session(broken, what="candidate")
    msg = str(info.value)
    assert msg.startswith("candidate (graph 'clf'): onnxruntime cannot load it:") and "\n" not in msg
    assert "NoSuchOp" in msg and "[ONNXRuntimeError]" not in msg


def test_session_from_large_proto_and_new_ir(monkeypatch):
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    big = classifier(w)
    big.graph.initializer.append(numpy_helper.from_array(np.zeros((64, 64), np.float32), "unused"))
    x = np.ones((2, 4), np.float32)
    monkeypatch.setattr(tmodel, "PROTO_LIMIT", 0)  # take the external-data route
    np.testing.assert_allclose(runtime.session(big).run(None, {"x": x})[0], x @ w, rtol=1e-6)
    monkeypatch.undo()
    newer = classifier()
    newer.ir_version = 14  # onnx 1.23's default, which onnxruntime 1.31 refuses
    runtime.session(newer).run(None, {"x": x})
    assert newer.ir_version == 14  # the caller's proto is left as it was


# --- --max-accuracy-drop, random feeds, thresholds ---


def test_max_accuracy_drop_on_labels_and_on_agreement():
    x = np.eye(4, dtype=np.float32)  # logits are the rows of W: argmax 0, 1, 2, 0
    w2 = W.copy()
    w2[1] = [3, 0, 0]  # sample 1 now predicts class 0: accuracy 0.75 -> 0.5, agreement 0.75
    feeds = {"x": x, "labels": np.array([0, 1, 2, 2])}
    failed = validation.validate(classifier(), classifier(w2), inputs=feeds, max_accuracy_drop=10)
    assert not failed.ok and failed.accuracy_basis == "accuracy"
    assert failed.failures == ["accuracy dropped 25.00 points (0.7500 -> 0.5000), more than --max-accuracy-drop 10"]
    assert validation.validate(classifier(), classifier(w2), inputs=feeds, max_accuracy_drop=25).ok
    # no labels: applied to top-1 agreement with the original (0.75 < 0.9)
    unlabelled = validation.validate(classifier(), classifier(w2), inputs={"x": x}, max_accuracy_drop=10)
    assert unlabelled.accuracy_basis == "top-1 agreement" and not unlabelled.ok
    assert "top-1 agreement with the original 0.7500 < 0.9000" in unlabelled.failures[0]
    assert "no labels" in unlabelled.failures[0]
    assert validation.validate(classifier(), classifier(w2), inputs={"x": x}, max_accuracy_drop=25).ok
    d = unlabelled.to_dict()
    assert d["thresholds"]["max_accuracy_drop"] == 10 and d["accuracy_basis"] == "top-1 agreement"


def test_random_feeds_use_enough_samples_in_batches():
    seen = []
    run = validation.run

    def spy(model, batches, what="model", **kwargs):
        seen.append([b["x"].shape[0] for b in batches])
        return run(model, batches, what=what, **kwargs)

    validation.run = spy
    try:
        result = validation.validate(classifier(), classifier(), batch=5)
    finally:
        validation.run = run
    assert seen[0] == [5] * 7 and result.samples == 35 and result.random_feeds
    fixed = validation.validate(classifier(batch_dim=2), classifier(batch_dim=2))
    assert fixed.samples == validation.RANDOM_SAMPLES  # 16 runs of the model's fixed batch of 2
    assert not validation.validate(classifier(), classifier(), inputs={"x": np.eye(4, dtype=np.float32)}).random_feeds


@pytest.mark.parametrize("kwargs,fragment", [
    ({"min_cosine": 2}, "--min-cosine 2: must be in [-1, 1]"), ({"atol": -1}, "--atol -1"),
    ({"rtol": -1}, "--rtol -1"), ({"batch": 0}, "--batch 0"), ({"max_accuracy_drop": -1}, "--max-accuracy-drop -1")])
def test_impossible_thresholds(kwargs, fragment):
    with pytest.raises(TnonnxError) as info:
        validation.validate(classifier(), classifier(), **kwargs)
    assert fragment in str(info.value)
