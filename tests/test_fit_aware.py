"""Data-aware fitting (--fit aware): calibration Gram matrices and the whitened SVD."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

import tnonnx
from tnonnx import activations
from tnonnx.patches import im2col
from tnonnx.formats import FORMATS
from tnonnx.formats.base import ConvGeometry
from tnonnx import fit as fitting
from tnonnx.graph import Layer
from tnonnx.cli import main
from tnonnx.formats import RankSpec, svd

from onnx_builders import init, make_model, randn, run, value

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
    return fitting.layer_data(layer, activations.Capture(x.T @ x, x.shape[0]))


def test_capture_accumulates_over_batches():
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    m = make_model(nodes, [value("x", ["b", 3, 8])], [value("y", ["b", 3, 4])], [init("W", randn(8, 4, seed=5))])
    xs = [randn(2, 3, 8, seed=s) for s in (6, 7, 8)]
    probe = activations.Probe("dense")
    captures = activations.capture(m, {"h": [probe]}, [{"x": x} for x in xs])
    per_sample = np.concatenate([np.maximum(x, 0) for x in xs]).astype(np.float64)  # 6 samples of 3 rows
    rows = per_sample.reshape(-1, 8)
    held = np.arange(6) % activations.HOLDOUT_EVERY == activations.HOLDOUT_EVERY - 1  # sample 3
    fitted, kept = per_sample[~held].reshape(-1, 8), per_sample[held].reshape(-1, 8)
    cap = captures[("h", probe.key)]
    assert (cap.count, cap.held_count) == (15, 3) and cap.cross is None
    np.testing.assert_allclose(cap.gram, fitted.T @ fitted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cap.held_gram, kept.T @ kept, rtol=1e-5, atol=1e-5)
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


# ------------------------------------------------------------------ capture and im2col


@pytest.mark.parametrize("shape, attrs", [
    ((4, 3, 3, 3), {}),
    ((4, 3, 3, 2), {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}),
    ((4, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((4, 3, 3, 3), {"auto_pad": "SAME_LOWER"}),
    ((5, 2, 3), {"pads": [2, 1], "strides": [2]}),
    ((3, 2, 2, 3, 2), {"pads": [1, 0, 1, 0, 1, 1]}),
])
def test_im2col_rows_times_the_kernel_are_the_conv(shape, attrs):
    from onnx_builders import single_layer_model

    model = single_layer_model(shape, attrs, seed=11)
    w = randn(*shape, seed=11).astype(np.float64)
    bias = randn(shape[0], seed=12)
    x = randn(2, shape[1], *([9, 8, 7][:len(shape) - 2]), seed=13)
    (y,) = run(model, {"x": x})
    geometry = ConvGeometry(tuple(shape[2:]), attrs)
    got = fitting.conv_apply(x, w.reshape(shape[0], -1).T, geometry) + bias.reshape((1, -1) + (1,) * (len(shape) - 2))
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def _two_layer_model():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="second")]
    return make_model(nodes, [value("x", ["b", 8])], [value("y", ["b", 4])],
                      [init("W1", randn(8, 6, seed=20)), init("W2", randn(6, 4, seed=21))])


def test_capture_with_a_reference_pairs_rows_and_accumulates_the_cross_gram():
    original = _two_layer_model()
    changed = _two_layer_model()
    changed.graph.initializer[0].CopyFrom(init("W1", randn(8, 6, seed=22)))
    xs = [randn(5, 8, seed=s) for s in (23, 24)]
    probe = activations.Probe("dense")
    cap = activations.capture(changed, {"r": [probe]}, [{"x": x} for x in xs], reference=original)[("r", probe.key)]
    mine = np.concatenate([run(_with_output(changed, "r"), {"x": x})[1] for x in xs]).astype(np.float64)
    theirs = np.concatenate([run(_with_output(original, "r"), {"x": x})[1] for x in xs]).astype(np.float64)
    held = np.arange(10) % activations.HOLDOUT_EVERY == activations.HOLDOUT_EVERY - 1
    np.testing.assert_allclose(cap.gram, mine[~held].T @ mine[~held], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cap.cross, mine[~held].T @ theirs[~held], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cap.held_cross, mine[held].T @ theirs[held], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cap.samples, mine, rtol=1e-6)
    np.testing.assert_allclose(cap.reference, theirs, rtol=1e-6)


def _with_output(model, name):
    from tnonnx.runtime import with_outputs

    return with_outputs(model, [name])[0]


def test_capture_keeps_a_bounded_uniform_sample(monkeypatch):
    monkeypatch.setattr(activations, "MAX_SAMPLE_ROWS", 7)
    m = _two_layer_model()
    xs = [randn(10, 8, seed=s) for s in range(30, 34)]
    probe = activations.Probe("dense")
    cap = activations.capture(m, {"x": [probe]}, [{"x": x} for x in xs])[("x", probe.key)]
    assert (cap.count, cap.held_count) == (30, 10) and cap.samples.shape == (7, 8)
    everything = np.concatenate(xs)
    for row in cap.samples:  # every kept row is a real row of the data
        assert np.min(np.abs(everything - row).max(axis=1)) == 0
    assert len({r.tobytes() for r in cap.samples}) == 7


# ------------------------------------------------------------------ refinement of every linear format

LINEAR_FORMATS = [f for f, m in FORMATS.items() if f != "svd" and not getattr(m, "NONLINEAR", False)
                  and not getattr(m, "DATA_FREE", False)]


def _dense_data(w, seed=40):
    x = _correlated_inputs(w.shape[0], 400, seed=seed)
    return x, _data(x, w)


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_refinement_lowers_the_output_error_of_every_chain_format(fmt):
    w = randn(64, 48, seed=41).astype(np.float64)
    x, data = _dense_data(w)
    spec = RankSpec(rank=3 if fmt not in ("cp",) else 12)
    fact = FORMATS[fmt].fit_dense(w, spec)
    start = data.output_error(fact)
    params = fact.params()
    before, after = fitting.refine(fact, data, iterations=60)
    assert before == pytest.approx(start, rel=1e-6)
    assert after < 0.99 * before
    assert data.output_error(fact) == pytest.approx(after, rel=1e-4)
    # measured on the raw calibration rows, not only through the Gram basis
    measured = np.linalg.norm(fact.apply(x) - x @ w) / np.linalg.norm(x @ w)
    assert measured == pytest.approx(after, rel=1e-3)
    assert fact.params() == params


def _conv_data(kernel, attrs, seed=50):
    layer = Layer("conv", "Conv", None, None, kind="conv", weight=kernel,
                  geometry=ConvGeometry(tuple(kernel.shape[2:]), attrs))
    maps = _correlated_inputs(kernel.shape[1] * 64, 40, seed=seed).reshape(40, kernel.shape[1], 8, 8)
    cols = im2col(maps.astype(np.float32), tuple(kernel.shape[2:]), attrs).astype(np.float64)
    return fitting.layer_data(layer, activations.Capture(cols.T @ cols, cols.shape[0]))


CONV_FORMATS = [f for f in LINEAR_FORMATS if f not in ("stt", "str", "sttu")] + ["svd"]


@pytest.mark.parametrize("fmt", CONV_FORMATS)
def test_refinement_lowers_the_output_error_of_every_conv_format(fmt):
    kernel = randn(16, 8, 3, 3, seed=51).astype(np.float64)
    data = _conv_data(kernel, {"pads": [1, 1, 1, 1], "strides": [2, 2], "dilations": [1, 1]})
    fact = FORMATS[fmt].fit_conv(kernel, RankSpec(rank=3))
    start = data.output_error(fact)
    before, after = fitting.refine(fact, data, iterations=60)
    assert before == pytest.approx(start, rel=1e-4)
    assert after < 0.99 * before
    assert data.output_error(fact) == pytest.approx(after, rel=1e-4)


def test_refinement_keeps_an_exact_factorisation_exact():
    w = randn(32, 24, seed=42).astype(np.float64)
    _, data = _dense_data(w)
    fact = FORMATS["tt"].fit_dense(w, RankSpec(rank=10**6))
    before, after = fitting.refine(fact, data, iterations=20)
    assert before < 1e-7 and after <= before
    assert fact.relative_error(w) < 1e-6


def test_whitened_conv_svd_never_has_a_larger_calibration_output_error():
    kernel = randn(12, 6, 3, 3, seed=52).astype(np.float64)
    data = _conv_data(kernel, {"pads": [1, 1, 1, 1]})
    for rank in (1, 2, 4, 8, 16):
        plain = svd.fit_conv(kernel, RankSpec(rank=rank))
        aware = svd.fit_conv(kernel, RankSpec(rank=rank), data=data)
        assert aware.params() == plain.params()
        assert data.output_error(aware) <= data.output_error(plain) + 1e-9


# ------------------------------------------------------------------ whole models


def _lenet_split():
    data = np.load(FASHION)
    return {"input": data["input"][:1000]}, {"input": data["input"][1000:], "labels": data["labels"][1000:]}


def test_sequential_fitting_beats_independent_fitting_on_lenet():
    calib, held_out = _lenet_split()
    _, aware = tnonnx.rewrite(LENET, format="svd", rank=4, fit="aware", calib=calib, inputs=held_out)
    _, sequential = tnonnx.rewrite(LENET, format="svd", rank=4, fit="sequential", calib=calib, inputs=held_out)
    assert sequential.totals.params_after == aware.totals.params_after
    assert sequential.validation.outputs[0].cosine > aware.validation.outputs[0].cosine + 0.02
    assert sequential.validation.accuracy_test > aware.validation.accuracy_test
    # the first layer sees the same inputs either way
    assert sequential.rewritten[0].output_error == pytest.approx(aware.rewritten[0].output_error, rel=1e-6)


def _mlp_model():
    """x[b, 32] -> 64 -> 64 -> 16 with ReLUs; weights with decaying spectra, like trained ones."""
    sizes, nodes, inits, h = [32, 64, 64, 16], [], [], "x"
    for i, (n, m) in enumerate(zip(sizes, sizes[1:])):
        w = randn(n, m, seed=70 + i) * np.exp(-np.arange(m) / 8.0)
        inits.append(init(f"W{i}", w.astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"z{i}"], name=f"fc{i}"))
        h = f"z{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"a{i}"]))
            h = f"a{i}"
    nodes[-1].output[0] = "y"
    return make_model(nodes, [value("x", ["b", 32])], [value("y", ["b", 16])], inits)


def test_sequential_fitting_of_a_chain_format_beats_independent_fitting():
    m = _mlp_model()
    feeds = {"x": _correlated_inputs(32, 256, seed=60).astype(np.float32)}
    held = {"x": _correlated_inputs(32, 128, seed=61).astype(np.float32)}
    _, aware = tnonnx.rewrite(m, format="tt", rank=2, fit="aware", calib=feeds, inputs=held)
    _, sequential = tnonnx.rewrite(m, format="tt", rank=2, fit="sequential", calib=feeds, inputs=held)
    assert sequential.validation.outputs[0].rel_l2 < aware.validation.outputs[0].rel_l2


def test_budget_with_calibration_spends_where_the_output_error_is():
    """Two layers with the same weight spectrum; one sees inputs confined to a few
    directions. Data-free, the allocator treats them alike; with calibration it gives the
    layer whose inputs use every direction the larger rank."""
    w = randn(48, 48, seed=80) * np.exp(-np.arange(48) / 12.0)
    nodes = [helper.make_node("MatMul", ["a", "W1"], ["ya"], name="narrow"),
             helper.make_node("MatMul", ["b", "W2"], ["yb"], name="wide")]
    m = make_model(nodes, [value("a", ["n", 48]), value("b", ["n", 48])], [value("ya", ["n", 48]), value("yb", ["n", 48])],
                   [init("W1", w.astype(np.float32)), init("W2", w[:, ::-1].copy().astype(np.float32))])
    rng = np.random.default_rng(81)
    calib = {"a": (rng.standard_normal((300, 4)) @ rng.standard_normal((4, 48))).astype(np.float32),
             "b": rng.standard_normal((300, 48)).astype(np.float32)}
    ranks = {}
    for fit in ("data-free", "aware"):
        _, report = tnonnx.rewrite(m, format="svd", budget=3, fit=fit, calib=calib, validate=False, allow_slower=True)
        ranks[fit] = {r.name: r.ranks[0] for r in report.rewritten}
        if fit == "aware":
            assert all(r.output_error is not None for r in report.rewritten)
    assert ranks["data-free"]["narrow"] == ranks["data-free"]["wide"]
    assert ranks["aware"]["narrow"] < ranks["aware"]["wide"]


def test_lenet_budget_with_calibration_keeps_more_accuracy():
    calib, held_out = _lenet_split()
    _, free = tnonnx.rewrite(LENET, format="svd", budget=3, inputs=held_out)
    _, aware = tnonnx.rewrite(LENET, format="svd", budget=3, fit="aware", calib=calib, inputs=held_out)
    assert aware.totals.params_after <= free.totals.params_after * 1.01
    assert aware.validation.accuracy_test > free.validation.accuracy_test


def test_cli_fit_sequential_and_its_errors(tmp_path):
    out = tmp_path / "seq.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "tt", "--rank", "4", "--fit", "sequential",
                                       "--calib", str(FASHION), "-o", str(out), "--no-validate", "--report",
                                       str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "output err" in result.output and "fit sequential" in result.output
    import json

    layers = [l for l in json.loads((tmp_path / "r.json").read_text())["layers"] if l["format"]]
    assert layers and all(l["output_error"] is not None for l in layers)
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--fit", "aware", "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "needs calibration data" in result.output
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "tt", "--act", "tanh",
                                       "-o", str(tmp_path / "y.onnx")])
    assert result.exit_code == 2 and "--act applies to the nonlinear formats" in result.output


def test_torch_threads_sets_the_count_and_restores_it_even_on_error():
    import torch

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with fitting.torch_threads(target):
            assert torch.get_num_threads() == target
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with fitting.torch_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
