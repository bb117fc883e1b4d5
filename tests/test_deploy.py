"""--target and --quantize: the edge rules on every format's emission, the .ort round trip,
fp16 with an overflowing node kept in fp32, int8/int4 after factorisation with the three
comparisons, and the wheel carrying the custom-op sources."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_builders import init, make_model, randn, run, single_layer_model, value
from tnonnx import api, fp16, targets
from tnonnx.emit import Builder
from tnonnx.errors import TnonnxError
from tnonnx.formats import FORMATS
from tnonnx.formats.base import RankSpec
from tnonnx.graph import find_layers
from tnonnx.replace import replace_nodes
from tnonnx.plan import Fitter
from tnonnx.quantize import Quantization, _describe, constant_weights, quantize

ROOT = Path(__file__).resolve().parents[1]


def _emitted(model, fmt, emission, rank=4):
    """`model` with every layer replaced by `fmt` in `emission`; the names of the new nodes.
    Nonlinear formats are distilled for a few iterations only: the emission is what counts."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    layers = find_layers(new)
    reps, names = {}, set()
    options = {"iters": 3} if getattr(FORMATS[fmt], "NONLINEAR", False) else {}
    for layer in layers:
        fact = Fitter(options).fit(layer, fmt, RankSpec(rank=rank))
        b = Builder(f"{layer.name}/{fmt}", layer.store_dtype, layer.compute_dtype)
        api.emit_layer(b, layer, fact, emission)
        reps[id(layer.node)] = (layer.graph, b.nodes, b.initializers)
        names |= {n.name for n in b.nodes}
    replace_nodes(new, reps, layers)
    return new, names


# the semi-tensor-product convs reshape to rank 5 (the identity factor): edge keeps them dense
CONV_RANK5 = ("str", "stt", "sttu")


@pytest.mark.filterwarnings("ignore:.*needs calibration data")
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("shape", [(96, 60), (12, 8, 3, 3)])
def test_edge_rules_hold_on_every_format(fmt, shape):
    """The rows emission (edge) of every format: default-domain ops, no Einsum, rank <= 4,
    depthwise or group-1 convs, and the same outputs as the plain MatMul emission."""
    if len(shape) == 4 and fmt in CONV_RANK5:
        pytest.skip("left dense by --target edge (test_edge_keeps_rank5_convs_dense)")
    small = getattr(FORMATS[fmt], "NONLINEAR", False)  # fitted in torch: kept small
    model = single_layer_model(((24, 20) if len(shape) == 2 else (6, 4, 3, 3)) if small else shape)
    try:
        edge, names = _emitted(model, fmt, "rows", rank=2 if small else 4)
        plain, _ = _emitted(model, fmt, "matmul", rank=2 if small else 4)
    except Exception as exc:  # formats that do not apply to this shape say so
        if type(exc).__name__ == "NotApplicable":
            pytest.skip(str(exc))
        raise
    assert targets.edge_violations(edge, names) == []
    x = randn(3, 5, model.graph.input[0].type.tensor_type.shape.dim[2].dim_value, seed=1) if len(shape) == 2 \
        else randn(3, model.graph.initializer[0].dims[1], 10, 10, seed=1)
    np.testing.assert_allclose(run(edge, {"x": x})[0], run(plain, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_edge_keeps_rank5_convs_dense():
    """A layer whose emission would break the edge rules is left dense, with the reason."""
    model = single_layer_model((12, 8, 3, 3))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 10
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 10
    new_model = onnx.ModelProto()
    new_model.CopyFrom(model)
    with pytest.raises(TnonnxError, match="left dense for --target edge: .*rank 5"):
        api.rewrite(new_model, format="stt", rank=4, force=True, timing=False, target="edge")


def test_edge_violations_are_found():
    """A rank-5 tensor, an Einsum, a contrib op and a grouped non-depthwise conv are named."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"], name="emitted/reshape"),
             helper.make_node("Einsum", ["r"], ["e"], name="e", equation="abcde->abcde"),
             helper.make_node("Reshape", ["e", "s2"], ["y0"], name="back"),
             helper.make_node("Conv", ["c", "W"], ["cy"], name="emitted/conv", group=2),
             helper.make_node("FusedMatMul", ["y0", "y0"], ["y"], name="fm", domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [value("x", [2, 48]), value("c", [1, 4, 5, 5])],
                              [value("y", None), value("cy", None)],
                              [init("s", np.array([2, 2, 2, 2, 6])), init("s2", np.array([2, 48])),
                               init("W", randn(4, 2, 3, 3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    found = " ".join(targets.edge_violations(model, {"emitted/reshape", "emitted/conv"}))
    for what in ("rank 5", "Einsum", "com.microsoft", "not depthwise"):
        assert what in found


def _mlp(n=64, hidden=48, out=10, seed=0):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["logits"], name="fc2")]
    return make_model(nodes, [value("x", ["b", n])], [value("logits", ["b", out])],
                      [init("W1", _low_rank(n, hidden, seed)), init("W2", randn(hidden, out, seed=seed + 1) / 7)])


def _low_rank(n, m, seed, rank=10):
    """A weight close to rank `rank` (what a factorisation at that rank keeps)."""
    return (randn(n, rank, seed=seed) @ randn(rank, m, seed=seed + 2) / 25 + randn(n, m, seed=seed + 3) / 200
            ).astype(np.float32)


def test_edge_ort_round_trip(tmp_path):
    """--target edge with fixed shapes writes a .ort and its config; the .ort loads and agrees;
    --max-model-bytes refuses an output too large, listing the largest tensors."""
    from click.testing import CliRunner

    from tnonnx.cli import main

    src = tmp_path / "mlp.onnx"
    onnx.save(_mlp(), src)
    out = tmp_path / "small.onnx"
    res = CliRunner().invoke(main, ["rewrite", str(src), "--format", "tt", "--rank", "4", "--no-timing", "--force",
                                    "--target", "edge", "--shape", "x:4x64", "--min-cosine", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "ok .ort loads and agrees with the .onnx" in res.output
    ort_file, config = tmp_path / "small.ort", tmp_path / "small.required_operators.config"
    assert ort_file.stat().st_size > 0 and "ai.onnx;" in config.read_text()
    small = onnx.load(out)
    assert [d.dim_value for d in small.graph.input[0].type.tensor_type.shape.dim] == [4, 64]
    sess = targets.ort_session(ort_file.read_bytes())
    x = randn(4, 64, seed=3)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], run(small, {"x": x})[0], rtol=1e-5, atol=1e-5)

    res = CliRunner().invoke(main, ["rewrite", str(src), "--format", "svd", "--rank", "4", "--no-timing",
                                    "--max-model-bytes", "100", "-o", str(tmp_path / "big.onnx")])
    assert res.exit_code == 2 and "largest tensors" in res.output and "svd/core" in res.output
    assert not (tmp_path / "big.onnx").exists()


def test_fp16_keeps_an_overflowing_node_in_fp32():
    """A seeded node whose output reaches 1e5 (beyond fp16) stays fp32; inputs and outputs
    stay fp32; converted without the measured ranges, the same model overflows."""
    w1 = randn(16, 16, seed=4) * 2e4
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["big"], name="big"),
             helper.make_node("Relu", ["big"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="small")]
    model = make_model(nodes, [value("x", ["b", 16])], [value("y", ["b", 4])],
                       [init("W1", w1), init("W2", randn(16, 4, seed=5) * 1e-4)])
    batches = [{"x": randn(32, 16, seed=6)}]
    half, kept, largest = fp16.to_fp16(model, batches)
    assert set(kept) == {"big", "relu", "small"} and largest > fp16.FP16_MAX  # producers and readers
    assert {v.type.tensor_type.elem_type for v in (*half.graph.input, *half.graph.output)} == {onnx.TensorProto.FLOAT}
    x = randn(8, 16, seed=7)
    ref, got = run(model, {"x": x})[0], run(half, {"x": x})[0]
    assert np.all(np.isfinite(got))
    assert float(np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got))) > 0.999
    # nothing between the kept nodes goes through fp16 (no Cast to fp16 reads their outputs)
    to_half = [n for n in half.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]
    assert not {i for n in to_half for i in n.input} & {"big", "r"}
    # converted without the measured ranges, the same nodes compute in fp16
    from onnxruntime.transformers.float16 import convert_float_to_float16

    naive = convert_float_to_float16(model, keep_io_types=True)
    assert {t.name: t.data_type for t in naive.graph.initializer}["W1"] == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("fmt", ["tt", "svd", "tucker"])
def test_balanced_cores_keep_the_weight(fmt):
    layer = find_layers(single_layer_model((96, 60)))[0]
    fact = Fitter().fit(layer, fmt, RankSpec(rank=6))
    dense = fact.to_dense()
    assert fp16.balance_cores(fact)
    norms = [np.linalg.norm(c) for c in fact.cores.values()]
    assert max(norms) / min(norms) < 1 + 1e-9
    np.testing.assert_allclose(fact.to_dense(), dense, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_after_factorisation_three_comparisons(mode):
    """int8 (static, calibrated) and int4 on a factorised MLP: every weight quantized, the
    four comparisons reported, the final model smaller than the int8/int4 baseline."""
    model = _mlp()
    calib = {"x": randn(256, 64, seed=8)}
    new, report = api.rewrite(model, format="svd", rank=40 if mode == "int4" else 12, force=True, timing=False,
                              calib=calib, quantize=mode, inputs={"x": randn(64, 64, seed=9)}, min_cosine=0.9)
    d = report.deploy
    assert d.quantization.ok and not d.quantization.left_float
    assert set(d.comparisons) == {"original → factorised", "factorised → final", "original → final",
                                  "original → baseline"}
    assert all(r.outputs[0].cosine > 0.9 for r in d.comparisons.values())
    assert d.comparisons["original → final"] is report.validation
    if mode == "int4":  # factors of at least 32 rows (one block) in 4 bits, fc2's 10-row factor in int8
        assert d.quantization.int4 and d.quantization.int8 and 4 < d.quantization.bits_per_weight < 8
        assert any(n.op_type == "MatMulNBits" for n in new.graph.node)
    else:
        assert "QuantizeLinear" in {n.op_type for n in new.graph.node}
        assert 8 < d.quantization.bits_per_weight < 12  # int8 data and per-channel scales
    assert report.ok


def test_weights_left_float_are_reported():
    """The check that every weight was quantized can fail: weights still float are named."""
    model = _mlp()
    weights = constant_weights(model)
    info = _describe(model, Quantization("int8"), weights, {k: 1 for k in weights})
    assert sorted(info.left_float) == ["W1", "W2"] and not info.ok


def test_int8_dynamic_without_calibration():
    q, info = quantize(_mlp(), Quantization("int8"))
    assert info.ok and {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in q.graph.node}


def test_bad_combinations_exit_2():
    with pytest.raises(TnonnxError, match="contrib op"):
        api.rewrite(_mlp(), format="svd", rank=4, target="edge", quantize="int4", calib=8, timing=False)
    with pytest.raises(TnonnxError, match="measures activation ranges"):
        api.rewrite(_mlp(), format="svd", rank=4, target="gpu", timing=False)
    with pytest.raises(TnonnxError, match="--emit einsum"):
        api.rewrite(_mlp(), format="svd", rank=4, quantize="int8", emit="einsum", timing=False)


def test_wheel_carries_the_custom_op_sources(tmp_path):
    """`pip wheel` of the checkout puts the C++ sources in the package, where
    custom_ops.SOURCE looks for them outside a checkout."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("tnonnx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tnonnx/_custom_ops/tnonnx_ops.cc", "tnonnx/_custom_ops/tnonnx_kernels.h"} <= names
    assert "tnonnx/custom_ops.py" in names


def test_cuda_kernel_check():
    """Ops without a CUDA kernel at their precision are named: a float16 Range, a custom op."""
    from tnonnx import cuda_kernels

    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Range", ["a", "b", "c"], ["r"], name="range"),
             helper.make_node("ContractionChain", ["y"], ["z"], name="custom", domain="ai.tnonnx")]
    graph = helper.make_graph(nodes, "g", [value("x", [2, 4], onnx.TensorProto.FLOAT16),
                                           value("a", [], onnx.TensorProto.FLOAT16),
                                           value("b", [], onnx.TensorProto.FLOAT16),
                                           value("c", [], onnx.TensorProto.FLOAT16)],
                              [value("z", None), value("r", None)],
                              [init("W", randn(4, 3).astype(np.float16))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tnonnx", 1)])
    found = cuda_kernels.fallbacks(model)
    assert len(found) == 2 and "range" in found[0] and "custom" in found[1]


# ------------------------------------------------------------------ int4 blocks, int8 choice, latency note


def test_rank_alignment_rules():
    """Ranks at or above the block become whole blocks: a --tol rank up (the tolerance
    stays met), a --ratio cap down (the ratio stays met); narrower ones stay."""
    from tnonnx.choose import ladder
    from tnonnx.formats.svd import svd_rank

    spec = RankSpec(align=32)
    assert [spec.aligned(r, up=True, full=100) for r in (8, 31, 32, 33, 99)] == [8, 31, 32, 64, 100]
    assert [spec.aligned(r, up=False) for r in (8, 31, 32, 63, 100)] == [8, 31, 32, 32, 96]
    s = np.linspace(10, 1, 200)
    assert svd_rank(s, 400, 300, RankSpec(ratio=2)) == 85  # 400*300 / (2*700)
    assert svd_rank(s, 400, 300, RankSpec(ratio=2, align=32)) == 64
    assert svd_rank(s, 400, 300, RankSpec(tol=0.5)) == 82
    assert svd_rank(s, 400, 300, RankSpec(tol=0.5, align=32)) == 96
    caps = [spec.rank for _, spec in ladder(["svd"], align=32)]
    assert all(c < 32 or c % 32 == 0 for c in caps) and 48 not in caps and {16, 32, 64} <= set(caps)


@pytest.mark.parametrize("rank,narrow", [(40, False), (20, True)])
def test_int4_ranks_fill_whole_blocks(rank, narrow):
    """--rank 40 with int4 becomes 64 (two whole blocks): every factor's contracted
    dimension a multiple of 32, nothing padded; --rank 20 stays, and its 20-row factor,
    too narrow for a block, goes to int8."""
    model = _mlp(n=128, hidden=96)
    new, report = api.rewrite(model, format="svd", rank=rank, force=True, timing=False, quantize="int4",
                              inputs={"x": randn(32, 128, seed=9)}, min_cosine=0.5)
    q = report.deploy.quantization
    fc1 = next(r for r in report.rows if r.name == "fc1")
    assert list(fc1.ranks) == [20 if narrow else 64]
    assert q.ok and not q.int4_padded and q.int4
    nbits = [n for n in new.graph.node if n.op_type == "MatMulNBits"]
    assert all(a.i % 32 == 0 for n in nbits for a in n.attribute if a.name == "K")
    assert len(q.int8) == (2 if narrow else 1)  # fc2's 10-row factor always; fc1's 20-row one when narrow
    assert not any("--quantize int4" in n for n in report.notes)


def test_int4_notes_ranks_that_leave_a_block_part_empty():
    """A rank bounded by the layer (fc1 48 wide: rank 48, not 64) is named in a note, and
    its int4 factor in int4_padded."""
    new, report = api.rewrite(_mlp(), format="svd", rank=40, force=True, timing=False, quantize="int4",
                              inputs={"x": randn(32, 64, seed=9)}, min_cosine=0.5)
    assert any(n.startswith("--quantize int4 (block 32): ranks not multiples of 32") and "fc1 48" in n
               for n in report.notes)
    assert report.deploy.quantization.int4_padded


def test_int8_static_or_dynamic():
    """Static with calibration data (and always on gpu/edge), dynamic without; --int8
    chooses on cpu."""
    from tnonnx import deploy

    assert not deploy.plan("cpu", "int8", "auto", False)[1].static
    assert deploy.plan("cpu", "int8", "auto", True)[1].static
    assert not deploy.plan("cpu", "int8", "auto", True, int8="dynamic")[1].static
    assert deploy.plan("edge", "int8", "auto", True)[1].static
    with pytest.raises(TnonnxError, match="dynamic int8 is for cpu"):
        deploy.plan("gpu", "int8", "auto", True, int8="dynamic")
    with pytest.raises(TnonnxError, match="only with --quantize"):
        deploy.plan("cpu", None, "auto", True, int8="dynamic")
    with pytest.raises(TnonnxError, match="needs calibration data"):
        deploy.plan("cpu", "int8", "auto", False, int8="static")
    calib = {"x": randn(64, 64, seed=8)}
    new, report = api.rewrite(_mlp(), format="svd", rank=12, force=True, timing=False, calib=calib, fit="aware",
                              quantize="int8", int8="dynamic", inputs={"x": randn(32, 64, seed=9)}, min_cosine=0.9)
    ops = {n.op_type for n in new.graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    assert report.deploy.quantization.method == "int8 dynamic" and report.ok


def test_a_slower_quantized_model_gets_the_quantization_note():
    """Fixed timings: the factorised model is faster than the original, the quantized one
    slower. The note blames the quantized form, not the factorisation, and does not send
    the user to --speedup."""
    from tnonnx import latency

    def ms(model, feeds):
        if any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in model.graph.node):
            return 9.0
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer) / 1000

    calib = {"x": randn(64, 64, seed=8)}
    _, report = api.rewrite(_mlp(), format="svd", rank=8, calib=calib, quantize="int8", timer=latency.CallableTimer(ms),
                            inputs={"x": randn(32, 64, seed=9)}, min_cosine=0.5, timing_cache=False)
    t = report.totals
    assert t.ms_factorised < t.ms_before < t.ms_after == 9.0
    slower = [n for n in report.notes if "SLOWER" in n]
    assert len(slower) == 1 and "quantized form" in slower[0] and "leave out --quantize" in slower[0]
    assert "to avoid it use" not in slower[0]


def test_short_names_keep_the_function_and_the_interface():
    """--short-names: a smaller file, the same outputs, graph inputs and outputs named as
    before, and a tensor an If branch reads from the outer graph left alone."""
    model = _mlp()
    q, _ = quantize(model, Quantization("int8"))
    x = randn(5, 64, seed=3)
    want = run(q, {"x": x})[0]
    saved = targets.short_names(q)
    assert saved > 0 and q.ByteSize() > 0
    assert [v.name for v in q.graph.input] == ["x"] and [v.name for v in q.graph.output] == ["logits"]
    assert all(len(n.name) <= 4 for n in q.graph.node)
    np.testing.assert_array_equal(run(q, {"x": x})[0], want)

    branch = helper.make_graph([helper.make_node("Relu", ["h"], ["o"], name="inner")], "b", [], [value("o", ["b", 3])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Constant", [], ["c"],
             value=helper.make_tensor("c", onnx.TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    m = make_model(nodes, [value("x", ["b", 4])], [value("y", ["b", 3])], [init("W", randn(4, 3, seed=1))])
    want = run(m, {"x": randn(2, 4, seed=2)})[0]
    targets.short_names(m)
    assert "h" in {x for n in m.graph.node for x in n.output}
    np.testing.assert_array_equal(run(m, {"x": randn(2, 4, seed=2)})[0], want)

    _, report = api.rewrite(_mlp(), format="svd", rank=8, timing=False, quantize="int8", short_names=True,
                            inputs={"x": randn(32, 64, seed=9)}, min_cosine=0.5)
    assert any(c["check"] == "short names" and c["ok"] for c in report.deploy.target.checks)
    assert report.deploy.sizes["final"] < report.deploy.sizes["baseline"]


def test_cli_int8_dynamic_with_calibration_and_short_names(tmp_path):
    """Through the CLI: --calib for the fit, --int8 dynamic for the quantization, short
    names; --int8 dynamic on gpu is one line and exit 2."""
    from click.testing import CliRunner

    from tnonnx.cli import main

    src, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    onnx.save_model(_mlp(), src)
    np.savez(calib, x=randn(64, 64, seed=8))
    done = CliRunner().invoke(main, ["rewrite", str(src), "--format", "svd", "--rank", "12", "--force", "--no-timing",
                                     "--calib", str(calib), "--fit", "aware", "--quantize", "int8", "--int8",
                                     "dynamic", "--short-names", "--min-cosine", "0.9", "-o", str(out)])
    assert done.exit_code == 0, done.output
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "DynamicQuantizeLinear" in ops and "QuantizeLinear" not in ops
    assert "quantized: int8 dynamic" in done.output and "ok short names" in done.output
    done = CliRunner().invoke(main, ["rewrite", str(src), "--format", "svd", "--rank", "8", "--target", "gpu",
                                     "--calib", str(calib), "--quantize", "int8", "--int8", "dynamic", "-o", str(out)])
    assert done.exit_code == 2 and "dynamic int8 is for cpu" in done.output and "Traceback" not in done.output
