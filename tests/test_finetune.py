"""End-to-end distillation (--finetune): the torch interpreter of ONNX graphs, and the
training of the rewritten layers' cores on calibration data."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import tnonnx
from tnonnx.cli import main
from tnonnx.errors import TnonnxError
from tnonnx.finetune import GraphModule
from tnonnx.validate import run

from onnx_builders import make_model, value
from onnx import helper

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
LENET, FASHION = ROOT / "models" / "lenet5_fashion.onnx", ROOT / "models" / "fashion_test.npz"


def _interpret(model, feeds):
    graph = GraphModule(model, set())
    with torch.no_grad():
        return [t.numpy() for t in graph({k: torch.as_tensor(v) for k, v in feeds.items()})]


@pytest.mark.parametrize("name", ["lenet5", "transformer_block", "small_resnet", "conv_zoo"])
def test_interpreter_matches_onnxruntime_on_reference_models(name, tmp_path):
    from models.export import export
    from tnonnx.calibrate import random_feeds

    model = onnx.load(export(name, tmp_path / f"{name}.onnx"))
    feeds = random_feeds(model, 2, None, 0)
    want = run(model, [feeds])
    got = _interpret(model, feeds)
    for g, (key, w) in zip(got, want.items()):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())), err_msg=key)


@pytest.mark.parametrize("emit", ["matmul", "einsum"])
def test_interpreter_runs_the_emitted_chains(emit):
    small, _ = tnonnx.rewrite(LENET, format="tt", rank=4, emit=emit, validate=False)
    feeds = {"input": np.load(FASHION)["input"][:16]}
    (want,) = run(small, [feeds]).values()
    (got,) = _interpret(small, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_unsupported_ops_are_refused_in_one_line():
    nodes = [helper.make_node("Hardmax", ["x"], ["y"])]
    m = make_model(nodes, [value("x", [2, 3])], [value("y", [2, 3])])
    with pytest.raises(TnonnxError, match="Hardmax"):
        GraphModule(m, set())


def test_finetune_lowers_the_output_error_on_held_out_data():
    data = np.load(FASHION)
    calib = {"input": data["input"][:1000]}
    held_out = {"input": data["input"][1000:], "labels": data["labels"][1000:]}
    _, plain = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=held_out)
    _, tuned = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=held_out, finetune=3)
    assert tuned.totals.params_after == plain.totals.params_after
    assert tuned.validation.outputs[0].rel_l2 < plain.validation.outputs[0].rel_l2
    assert tuned.validation.accuracy_test > plain.validation.accuracy_test
    assert any(n.startswith("finetune:") for n in tuned.notes)


def test_cli_finetune_needs_calibration_data(tmp_path):
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--finetune", "2", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "needs calibration data" in result.output
    out = tmp_path / "y.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "svd", "--rank", "4", "--finetune", "1",
                                       "--calib-random", "32", "-o", str(out), "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "finetune:" in result.output and out.exists()
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "svd", "--rank", "4", "--finetune", "1",
                                       "--finetune-hidden", "0", "--calib-random", "32", "-o", str(out),
                                       "--no-validate"])
    assert result.exit_code == 0, result.output
    assert "outputs only" in result.output
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--finetune", "1", "--finetune-hidden", "-1",
                                       "--calib-random", "8", "-o", str(tmp_path / "z.onnx")])
    assert result.exit_code == 2 and "--finetune-hidden" in result.output


def _hidden_error(model, original, names, feeds) -> float:
    from tnonnx.runtime import with_outputs

    got = run(with_outputs(model, names)[0], [feeds])
    want = run(with_outputs(original, names)[0], [feeds])
    return float(np.mean([np.linalg.norm(got[n] - want[n]) / np.linalg.norm(want[n]) for n in names]))


def test_matching_the_rewritten_layers_inputs_lowers_their_error_on_held_out_data():
    from tnonnx.finetune import finetune
    from tnonnx.graph import find_layers

    data = np.load(FASHION)
    calib = [{"input": data["input"][i:i + 100]} for i in range(0, 1000, 100)]
    held_out = {"input": data["input"][1000:]}
    original = onnx.load(LENET)
    small, _ = tnonnx.rewrite(original, format="svd", rank=4, fit="aware", calib={"input": data["input"][:1000]},
                              validate=False)
    inputs = {i.name for i in original.graph.input}
    hidden = [layer.x for layer in find_layers(original) if layer.kind and layer.x not in inputs]
    assert len(hidden) >= 2
    trainable = {t.name for t in small.graph.initializer} - {t.name for t in original.graph.initializer}
    errors = {}
    for label, names in (("outputs only", ()), ("with hidden", hidden)):
        tuned = onnx.ModelProto()
        tuned.CopyFrom(small)
        finetune(tuned, original, calib, trainable, epochs=3, hidden=names)
        errors[label] = _hidden_error(tuned, original, hidden, held_out)
    start = _hidden_error(small, original, hidden, held_out)
    assert errors["with hidden"] < errors["outputs only"] and errors["with hidden"] < start, (start, errors)


def test_small_models_train_on_one_thread_and_the_thread_count_is_restored(monkeypatch):
    from tnonnx import finetune as ft

    data = np.load(FASHION)
    original = onnx.load(LENET)
    small, _ = tnonnx.rewrite(original, format="svd", rank=4, validate=False)
    trainable = {t.name for t in small.graph.initializer} - {t.name for t in original.graph.initializer}
    calib = [{"input": data["input"][:50]}]
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for limit, want in ((ft.SMALL_MODEL_PARAMS, 1), (0, 2)):  # LeNet's cores are far below the limit
            monkeypatch.setattr(ft, "SMALL_MODEL_PARAMS", limit)
            seen = []
            ft.finetune(small, original, calib, trainable, epochs=1, log=lambda _: seen.append(torch.get_num_threads()))
            assert seen == [want] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


def test_interpreter_runs_conv_transpose_and_its_rewrite():
    """ConvTranspose (asymmetric pads, output_padding, groups, dilations) as onnxruntime runs it."""
    from test_conv_transpose import _feeds, _model

    model = _model()
    for m in (model, tnonnx.rewrite(model, format="svd", rank=2, validate=False, timing=False)[0]):
        want, got = run(m, [_feeds()]), _interpret(m, _feeds())
        for g, (key, w) in zip(got, want.items()):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()), err_msg=key)


def test_a_fine_tuning_that_ends_worse_keeps_the_start(monkeypatch):
    """A learning rate far too large wrecks the cores: the error is measured at the end only,
    found worse than the start, and the start is what the model keeps."""
    from tnonnx import finetune as ft

    data = np.load(FASHION)
    calib = {"input": data["input"][:256]}
    inputs = {"input": data["input"][256:512]}
    plain, report = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=inputs)
    monkeypatch.setattr(ft, "LEARNING_RATE", 1e3)
    wrecked, tuned = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=inputs, finetune=1)
    note = next(n for n in tuned.notes if n.startswith("finetune:"))
    before, after = note.split("data ")[1].split(" after")[0].split(" -> ")
    assert before == after
    for a, b in zip(plain.graph.initializer, wrecked.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_train_precision_auto_is_bf16_only_on_native_hardware_and_large_trainings(tmp_path):
    from tnonnx.finetune import SMALL_MODEL_PARAMS, resolve_precision

    native, emulated, arm = (tmp_path / n for n in ("native", "emulated", "arm"))
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    emulated.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    large, small = SMALL_MODEL_PARAMS, SMALL_MODEL_PARAMS - 1
    assert resolve_precision("auto", large, str(native)) == "bf16"
    assert resolve_precision("auto", large, str(arm)) == "bf16"
    assert resolve_precision("auto", small, str(native)) == "fp32"  # LeNet-5-sized: its steps are overhead
    assert resolve_precision("auto", large, str(emulated)) == "fp32"
    assert resolve_precision("auto", large, str(tmp_path / "absent")) == "fp32"  # not Linux
    assert resolve_precision("bf16", small, str(emulated)) == "bf16"  # asked for: done
    assert resolve_precision("fp32", large, str(native)) == "fp32"
    with pytest.raises(TnonnxError, match="--train-precision fp16"):
        resolve_precision("fp16", large)


def test_bf16_fine_tuning_lowers_the_error_and_saves_float32_weights():
    data = np.load(FASHION)
    calib = {"input": data["input"][:512]}
    held_out = {"input": data["input"][512:1024]}
    plain, before = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=held_out)
    tuned, report = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=held_out,
                                   finetune=2, train_precision="bf16")
    assert report.validation.outputs[0].rel_l2 < before.validation.outputs[0].rel_l2
    assert report.settings["finetune"]["precision_used"] == "bf16"
    assert any(n.startswith("finetune:") and "bf16 products" in n for n in report.notes)
    assert [t.data_type for t in tuned.graph.initializer] == [t.data_type for t in plain.graph.initializer]
    # the same run in float32 says so, and reports no bf16
    _, fp32 = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, validate=False,
                             finetune=1, train_precision="fp32")
    assert fp32.settings["finetune"]["precision_used"] == "fp32"
    assert not any("bf16" in n for n in fp32.notes)


def test_cli_refuses_an_unknown_train_precision(tmp_path):
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "svd", "--rank", "4",
                                       "--train-precision", "fp8", "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2
    assert "fp8" in result.output


def test_stored_hidden_targets_train_as_the_recomputed_ones_and_give_way_to_memory(monkeypatch):
    from tnonnx import finetune as ft
    from tnonnx import runtime
    from tnonnx.graph import find_layers

    data = np.load(FASHION)
    calib = [{"input": data["input"][i:i + 100]} for i in range(0, 600, 100)]
    original = onnx.load(LENET)
    small, _ = tnonnx.rewrite(original, format="svd", rank=4, fit="aware", calib={"input": data["input"][:600]},
                              validate=False)
    inputs = {i.name for i in original.graph.input}
    hidden = [layer.x for layer in find_layers(original) if layer.kind and layer.x not in inputs]
    trainable = {t.name for t in small.graph.initializer} - {t.name for t in original.graph.initializer}
    teacher, names = runtime.with_outputs(original, hidden, inputs=False)
    sess = runtime.session(teacher)
    outputs = [o.name for o in original.graph.output]
    runs = []
    real_run = ft._teacher

    def counting(*args):
        targets, stored = real_run(*args)
        runs.append(stored)
        return targets, stored

    monkeypatch.setattr(ft, "_teacher", counting)
    results = {}
    for share in (0.25, 0.0):  # stored for the whole training; recomputed at every step
        monkeypatch.setattr(ft, "HIDDEN_MEMORY_SHARE", share)
        tuned = onnx.ModelProto()
        tuned.CopyFrom(small)
        results[share] = ft.finetune(tuned, original, calib, trainable, epochs=2, hidden=hidden)
    assert runs[0] is not None and len(runs[0]) == len(calib) and runs[1] is None
    # float16 targets: the same training to far below the errors trained against
    assert results[0.25][0] == results[0.0][0]
    assert results[0.25][1] == pytest.approx(results[0.0][1], rel=1e-3)
    assert all(t.dtype == torch.float16 for batch, _ in runs[0] for t in batch)
    want = sess.run(names, calib[0])
    assert all(np.allclose(t.float().numpy(), w, rtol=1e-3, atol=1e-4) for t, w in zip(runs[0][0][0], want))
    assert np.allclose([float(n) for n in runs[0][0][1]], [float((w.astype(np.float64) ** 2).sum()) for w in want],
                       rtol=1e-3)
    # room for two batches' tensors only: dropped part-way, recomputed per step from then on
    one = sum(t.numel() * t.element_size() for t in runs[0][0][0])
    monkeypatch.setattr(runtime, "available_memory", lambda: 2.5 * one / ft.HIDDEN_MEMORY_SHARE)
    monkeypatch.setattr(ft, "HIDDEN_MEMORY_SHARE", 0.25)
    _, stored = real_run(sess, calib, outputs, [0], names)
    assert stored is None


def test_stored_targets_are_float16_only_where_it_holds_them():
    from tnonnx.finetune import _compact

    small = torch.linspace(-3, 3, 1000)
    half, norm2 = _compact(small)
    assert half.dtype == torch.float16 and float(norm2) == pytest.approx(float((small.double() ** 2).sum()), rel=1e-6)
    large = small * 1e5  # beyond float16's 65504
    kept, norm2 = _compact(large)
    assert kept.dtype == torch.float32 and torch.equal(kept, large)
    assert float(norm2) == pytest.approx(float((large.double() ** 2).sum()), rel=1e-6)
