"""Models that do not run on arbitrary feeds (speech-model oddities): the feeds tnonnx makes
up follow what the graph says, a rewrite whose original still cannot run on them skips
validation and says so, and MACs inside If/Scan bodies are counted as they run."""

import json

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper
from onnx_builders import init, make_model, randn, rel_err, run, speech_model, value

from tnonnx import calibrate, macs
from tnonnx.cli import main


def _rewrite(tmp_path, model, *extra):
    src, out, report = tmp_path / "m.onnx", tmp_path / "m.svd.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["rewrite", str(src), "--format", "svd", "--rank", "16", "--force",
                                       "--no-timing", "-o", str(out), "--report", str(report), *map(str, extra)])
    return result, out, report


def test_feeds_take_the_compared_rate_and_the_length_a_reflect_pad_needs():
    model = speech_model("Unsqueeze", pad=96)
    feeds = calibrate.random_feeds(model)
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000
    assert feeds["x"].shape == (1, 97)  # reflect Pad of 96 needs more than 96 samples
    assert calibrate.assumed_dims(model) == ["assumed samples = 97 for input x (axis 1); set it with --shape x:1x97"]
    run(model, feeds)  # the original runs on them
    # a short pad leaves the default length alone
    assert calibrate.random_feeds(speech_model("Unsqueeze", pad=8))["x"].shape == (1, calibrate.DEFAULT_FREE_DIM)


def test_rewrite_validates_on_feeds_that_follow_the_graph(tmp_path):
    result, out, report = _rewrite(tmp_path, speech_model("Unsqueeze"))
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["validation"]["ok"] and data["validation_skipped"] is None


def test_rewrite_skips_validation_when_the_original_cannot_run_on_made_up_feeds(tmp_path):
    model = speech_model("Reshape")  # the pad is reached through a Reshape: length not inferred
    result, out, report = _rewrite(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert "validation skipped" in result.output and "Pad reflect" in result.output
    assert "--inputs" in result.output and "--shape" in result.output
    data = json.loads(report.read_text())
    assert data["validation"] is None and "pre-pad (96)" in data["validation_skipped"]
    # what was written is correct: full rank reproduces the original on inputs that run
    feeds = {"x": randn(3, 300, seed=7), "sr": np.array(16000, np.int64)}
    assert rel_err(run(model, feeds)[0], run(onnx.load(out), feeds)[0]) < 1e-5


def test_checks_the_user_asked_for_still_fail_with_exit_2(tmp_path):
    result, out, _ = _rewrite(tmp_path, speech_model("Reshape"), "--min-cosine", "0.99")
    assert result.exit_code == 2 and "onnxruntime failed to run it" in result.output
    feeds = tmp_path / "short.npz"
    np.savez(feeds, x=randn(2, 50), sr=np.array(16000, np.int64))
    result, _, _ = _rewrite(tmp_path, speech_model("Reshape"), "--inputs", feeds)
    assert result.exit_code == 2 and "Pad reflect" in result.output


def test_macs_count_the_if_branch_that_runs():
    model = speech_model("Unsqueeze")
    cost = macs.count(model, {"x": (1, 97), "sr": ()})
    # then branch: conv1 16x1x5 and conv2 16x16x3 over 97 + 2*96 samples, head 16x8
    length = 97 + 2 * 96
    assert cost.per_node["conv1"] == 16 * 5 * length and cost.per_node["conv2"] == 16 * 16 * 3 * length
    assert cost.total == cost.per_node["conv1"] + cost.per_node["conv2"] + 16 * 8
    assert cost.notes == ["If If#1: MACs of its then branch counted (the branch that runs on these inputs)"]
    # the condition cannot be read when the model does not run: the larger branch, said so
    cost = macs.count(speech_model("Reshape"), {"x": (1, 64), "sr": ()})
    assert cost.notes == ["If If#1: MACs of its then branch counted (the larger branch, which one runs is not known)"]


def test_macs_count_a_scan_body_once_per_step():
    body = helper.make_graph([helper.make_node("MatMul", ["s", "W"], ["o"], name="step")], "body",
                             [value("s", [4])], [value("o", [3])])
    scan = helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1)
    model = make_model([scan], [value("x", [5, 4])], [value("y", [5, 3])], [init("W", randn(4, 3))])
    cost = macs.count(model, {"x": (5, 4)})
    assert cost.per_node["step"] == 5 * 4 * 3 and cost.total == 60
    assert cost.notes == ["Scan Scan#0: body MACs counted 5 times (its trip count)"]
    assert len(run(model, {"x": randn(5, 4)})[0]) == 5
