"""The C++ custom operator ai.tnonnx::ContractionChain (--emit custom).

The library is built once (and kept between runs: rebuilt only when its source changes).
One fused node must compute what the standard-op chain computes (same plan, float32
sums), what the numpy reference and the torch module compute, for every kind of step:
TT chains in several absorption orders, SVD, TR, CP (batched "keep" steps), activations
between steps, batch ranks 1 to 3. Then the pipeline around it: the rewrite declares the
domain and passes the checker, MACs are counted, validate/bench/ORT sessions load the
library on their own, bad input fails in one line.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import tnonnx
from onnx_builders import init, make_model, randn, rel_err, value
from tnonnx import custom_ops, ort_headers, runtime
from tnonnx.cli import main
from tnonnx.emit import Builder, Chain, Core, NumpyOps, emit_chain, run_chain
from tnonnx.errors import TnonnxError
from tnonnx.formats import FORMATS, svd, tt
from tnonnx.formats.base import RankSpec

TOL = 1e-5
NO_HEADERS = "the onnxruntime headers cannot be fetched (network unreachable) and ORT_INCLUDE_DIR is unset"


@pytest.fixture(scope="module")
def library():
    if custom_ops._compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or clang++) on this machine")
    try:
        return custom_ops.build()
    except ort_headers.HeadersUnreachable:
        if os.environ.get(ort_headers.ENV_INCLUDE):
            raise
        pytest.skip(NO_HEADERS)


# ------------------------------------------------------------------------- helpers


def chain_model(chain: Chain, cores: dict, batch_shape, emit: str, store=np.float32, compute=np.float32):
    """One layer x[*batch, N] -> y[*batch, M] emitted as a custom node or standard ops."""
    b = Builder("layer", np.dtype(store), np.dtype(compute))
    emitter = custom_ops.emit_chain_custom if emit == "custom" else emit_chain
    emitter(b, "x", chain, cores, len(batch_shape))
    b.rename_output("y")
    dtype = helper.np_dtype_to_tensor_dtype(np.dtype(compute))
    graph = helper.make_graph(b.nodes, "chain", [value("x", list(batch_shape) + [chain.in_features], dtype)],
                              [value("y", list(batch_shape) + [chain.out_features], dtype)], b.initializers)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(custom_ops.DOMAIN, 1)] if emit == "custom" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model, x, threads: int = 1, optimize: bool = True):
    sess = runtime.session(model, threads=threads, optimize=optimize)
    return sess.run(None, {"x": x})[0]


def reference(chain: Chain, cores: dict, x: np.ndarray) -> np.ndarray:
    return run_chain(NumpyOps(x.ndim - 1), x.astype(np.float64), chain, cores)


def check(chain: Chain, cores: dict, batch_shape, seed: int = 0, scale: float = 1.0):
    """custom == standard-op chain == numpy reference (relative L2, float32 sums)."""
    x = (scale * randn(*[int(d) for d in batch_shape], chain.in_features, seed=seed)).astype(np.float32)
    names = [f"b{i}" for i in range(len(batch_shape))]
    got = run(chain_model(chain, cores, names, "custom"), x)
    want = run(chain_model(chain, cores, names, "matmul"), x)
    assert got.shape == want.shape == tuple(batch_shape) + (chain.out_features,)
    assert rel_err(want, got) < TOL
    assert rel_err(reference(chain, cores, x), got) < TOL
    return got


def tt_fact(n: int, m: int, rank: int, seed: int = 0, **options):
    return tt.fit_dense(randn(n, m, seed=seed).astype(np.float64), RankSpec(rank=rank), **options)


def reordered(chain: Chain, order) -> Chain:
    return Chain(chain.in_labels, chain.out_labels, chain.sizes, [chain.steps[i] for i in order], chain.activation)


# ------------------------------------------------------------------------- the kernel


@pytest.mark.parametrize("batch_shape", [(5,), (2, 3), (2, 1, 3)])
@pytest.mark.parametrize("order", ["best", "reversed", "middle-out"])
def test_tt_chain_in_any_absorption_order_equals_the_standard_op_chain(library, batch_shape, order):
    fact = tt_fact(256, 384, 6, modes=((4, 8, 8), (8, 8, 6)))
    chain = fact.chain
    d = len(chain.steps)
    steps = {"best": list(range(d)), "reversed": list(range(d))[::-1], "middle-out": [1, 0, 2]}[order]
    check(reordered(chain, steps), fact.cores, batch_shape)


@pytest.mark.parametrize("n, m, rank, modes", [(64, 48, 100, None), (512, 512, 8, None), (384, 1536, 4, None),
                                               (1536, 384, 5, None), (60, 90, 3, ((3, 4, 5), (5, 3, 6)))])
def test_tt_chains_of_several_shapes(library, n, m, rank, modes):
    fact = tt_fact(n, m, rank, modes=modes)
    check(fact.chain, fact.cores, (7,))


def test_full_rank_tt_reproduces_the_dense_layer(library):
    w = randn(48, 40, seed=3).astype(np.float64)
    fact = tt.fit_dense(w, RankSpec(rank=10**6))
    x = randn(9, 48, seed=4)
    got = run(chain_model(fact.chain, fact.cores, ["b"], "custom"), x)
    assert rel_err(x.astype(np.float64) @ w, got) < TOL


@pytest.mark.parametrize("name", ["svd", "tr", "cp", "ht", "tucker", "stt", "str", "sttu"])
@pytest.mark.parametrize("batch_shape", [(1,), (4, 3)])
def test_chains_of_every_dense_format(library, name, batch_shape):
    """SVD, TR (a ring bond), CP (its rank label stays open over several steps: batched
    (K, C, N) cores), HT, Tucker, and the semi-tensor chains (sub-index labels that no core
    holds ride through every step)."""
    fact = FORMATS[name].fit_dense(randn(128, 96, seed=5).astype(np.float64), RankSpec(rank=4))
    if name == "cp":
        assert any(keep for keep, *_ in fact.chain.plan()), "the CP chain has no batched step"
    check(fact.chain, fact.cores, batch_shape)


def test_torch_module_equals_the_custom_op(library):
    torch = pytest.importorskip("torch")
    fact = tt_fact(256, 192, 5, seed=6)
    x = randn(3, 4, 256, seed=7)
    got = run(chain_model(fact.chain, fact.cores, ["a", "b"], "custom"), x)
    with torch.no_grad():
        want = fact.torch_module()(torch.from_numpy(x)).numpy()
    assert rel_err(want, got) < TOL


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
def test_nonlinear_chain_equals_standard_ops_torch_and_numpy(library, activation):
    """An NTT-like chain: the activation after every step but the last."""
    torch = pytest.importorskip("torch")
    from tnonnx.nn.modules import ChainLinear

    fact = tt_fact(256, 384, 6, seed=8)
    chain = reordered(fact.chain, range(len(fact.chain.steps)))
    chain.activation = activation
    for scale in (0.3, 3.0):  # the activations' small- and large-argument branches
        got = check(chain, fact.cores, (6, 2), seed=9, scale=scale)
        x = (scale * randn(6, 2, 256, seed=9)).astype(np.float32)
        with torch.no_grad():
            want = ChainLinear(chain, fact.cores)(torch.from_numpy(x)).numpy()
        assert rel_err(want, got) < TOL


@pytest.mark.parametrize("fmt, batch", [(tt, 32), (svd, 1)])
def test_parallel_steps_give_the_same_bits_as_one_thread(library, fmt, batch):
    """Row blocks split over threads (TT, batch 32); column panels split (SVD, batch 1)."""
    fact = fmt.fit_dense(randn(1024, 1024, seed=10).astype(np.float64), RankSpec(rank=8 if fmt is tt else 128))
    x = randn(batch, 1024, seed=11)
    model = chain_model(fact.chain, fact.cores, ["b"], "custom")
    one, two = run(model, x, threads=1), run(model, x, threads=2)
    assert np.array_equal(one, two)
    assert rel_err(reference(fact.chain, fact.cores, x), one) < TOL


def test_rows_not_a_multiple_of_the_block_size(library):
    """37 rows of a 384x1536 TT (widest step 4608 + 1536 floats per row): blocks of a few
    rows, the last one shorter; the same bits on one and two threads."""
    fact = tt_fact(384, 1536, 4, seed=26)
    x = randn(37, 384, seed=27)
    check(fact.chain, fact.cores, (37,), seed=27)
    model = chain_model(fact.chain, fact.cores, ["b"], "custom")
    assert np.array_equal(run(model, x, threads=1), run(model, x, threads=2))


@pytest.mark.parametrize("name, order, activation", [("tt", "reversed", None), ("tt", "best", "gelu"),
                                                     ("cp", None, None)])
def test_many_rows_in_blocks_equal_the_standard_op_chain(library, name, order, activation):
    """1000 rows (3-D batch 8 x 125) go through the chain block by block, the blocks spread
    over threads: a reversed TT, an NTT (its output modes permuted at the end: the final
    gather runs per block), a CP chain (batched steps)."""
    fact = FORMATS[name].fit_dense(randn(256, 384, seed=28).astype(np.float64), RankSpec(rank=6))
    chain = fact.chain
    if order is not None:
        steps = list(range(len(chain.steps)))
        chain = reordered(chain, steps[::-1] if order == "reversed" else steps)
    chain.activation = activation
    x = randn(8, 125, 256, seed=29)
    model = chain_model(chain, fact.cores, ["a", "b"], "custom")
    want = run(chain_model(chain, fact.cores, ["a", "b"], "matmul"), x)
    one, two = run(model, x, threads=1), run(model, x, threads=2)
    assert np.array_equal(one, two)
    assert rel_err(want, one) < TOL
    assert rel_err(reference(chain, fact.cores, x), one) < TOL
    # every row as computed alone
    single = chain_model(chain, fact.cores, ["b"], "custom")
    rows = x.reshape(1000, 256)[[0, 1, 499, 998, 999]]
    assert rel_err(np.stack([run(single, r[None])[0] for r in rows]), one.reshape(1000, -1)[[0, 1, 499, 998, 999]]) < TOL


def test_one_step_chain_and_an_empty_batch(library):
    chain = Chain(("n",), ("m",), {"n": 40, "m": 24}, [Core("W", ("n", "m"))])
    cores = {"W": randn(40, 24, seed=25).astype(np.float64)}
    check(chain, cores, (3,))
    y = run(chain_model(chain, cores, ["b"], "custom"), np.zeros((0, 40), np.float32))
    assert y.shape == (0, 24)


def test_cores_computed_at_run_time_are_packed_per_call(library):
    """float16 storage: Cast nodes feed the cores; with graph optimisation off they are not
    constant when the session loads."""
    fact = tt_fact(96, 80, 4, seed=12)
    x = randn(5, 96, seed=13)
    custom = chain_model(fact.chain, fact.cores, ["b"], "custom", store=np.float16)
    standard = chain_model(fact.chain, fact.cores, ["b"], "matmul", store=np.float16)
    for optimize in (False, True):
        assert rel_err(run(standard, x, optimize=optimize), run(custom, x, optimize=optimize)) < TOL


def test_float64_layers_run_in_float32_between_casts(library):
    fact = tt_fact(64, 72, 4, seed=14)
    x = randn(3, 64, seed=15, dtype=np.float64)
    got = run(chain_model(fact.chain, fact.cores, ["b"], "custom", store=np.float64, compute=np.float64), x)
    assert got.dtype == np.float64
    assert rel_err(reference(fact.chain, fact.cores, x), got) < TOL


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction-set variants")
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_lesser_instruction_sets_compute_the_same(library, isa, tmp_path):
    """TNONNX_ISA picks a lesser kernel when the library loads (a fresh process)."""
    fact = tt_fact(256, 384, 6, seed=16)
    chain = reordered(fact.chain, range(len(fact.chain.steps)))
    chain.activation = "gelu"
    x = randn(11, 256, seed=17)
    onnx.save(chain_model(chain, fact.cores, ["b"], "custom"), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np, onnxruntime as ort
        opts = ort.SessionOptions()
        opts.register_custom_ops_library({str(library)!r})
        sess = ort.InferenceSession({str(tmp_path / 'm.onnx')!r}, opts, providers=["CPUExecutionProvider"])
        np.save({str(tmp_path / 'y.npy')!r}, sess.run(None, {{"x": np.load({str(tmp_path / 'x.npy')!r})}})[0])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ, TNONNX_ISA=isa), timeout=120)
    assert rel_err(reference(chain, fact.cores, x), np.load(tmp_path / "y.npy")) < TOL


def test_plain_onnxruntime_loads_the_library(library):
    fact = tt_fact(64, 48, 3, seed=18)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(chain_model(fact.chain, fact.cores, ["b"], "custom").SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    x = randn(2, 64, seed=19)
    assert rel_err(reference(fact.chain, fact.cores, x), sess.run(None, {"x": x})[0]) < TOL


def test_wrong_feature_count_fails_in_one_clear_line(library):
    fact = tt_fact(64, 48, 3, seed=20)
    model = chain_model(fact.chain, fact.cores, ["b"], "custom")
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    sess = runtime.session(model)
    with pytest.raises(TnonnxError, match="x has 63 features on its last axis, expected 64"):
        runtime.infer(sess, {"x": randn(2, 63, seed=21)})


def test_inconsistent_attributes_are_refused_at_load(library):
    fact = tt_fact(64, 48, 3, seed=22)
    model = chain_model(fact.chain, fact.cores, ["b"], "custom")
    node = next(n for n in model.graph.node if n.domain == custom_ops.DOMAIN)
    perms = next(a for a in node.attribute if a.name == "perms")
    perms.ints[0] = perms.ints[1]
    with pytest.raises(TnonnxError, match="perms is not a permutation"):
        runtime.session(model)


def test_other_dtypes_are_refused(library):
    """The op is float32 only: a double input is refused when the session loads."""
    fact = tt_fact(64, 48, 3, seed=23)
    model = chain_model(fact.chain, fact.cores, ["b"], "custom")
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    with pytest.raises(TnonnxError, match="cannot load it"):
        runtime.session(model)


def test_unsupported_activation_is_refused_when_emitting():
    fact = tt_fact(64, 48, 3, seed=24)
    chain = reordered(fact.chain, range(len(fact.chain.steps)))
    chain.activation = "softplus"
    with pytest.raises(TnonnxError, match="activation 'softplus'"):
        custom_ops.emit_chain_custom(Builder("l", np.float32, np.float32), "x", chain, fact.cores, 1)


# ------------------------------------------------------------------------- the pipeline


def mlp_model() -> onnx.ModelProto:
    """x[b, 64] -> 96 -> 80 -> 10: MatMul + bias, Gemm, MatMul; ReLUs between."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["h1", "B1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "W2", "B2"], ["h2"], name="fc2", transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "W3"], ["y"], name="fc3")]
    inits = [init("W1", randn(64, 96, seed=30)), init("B1", randn(96, seed=31)), init("W2", randn(80, 96, seed=32)),
             init("B2", randn(80, seed=33)), init("W3", randn(80, 10, seed=34))]
    return make_model(nodes, [value("x", ["batch", 64])], [value("y", ["batch", 10])], inits)


@pytest.fixture(scope="module")
def reference_mlp(tmp_path_factory):
    """models/reference.py's MLP (784-256-128-10), exported by the legacy exporter."""
    pytest.importorskip("torch")
    from models import export

    return onnx.load(str(export.export("mlp", tmp_path_factory.mktemp("mlp") / "mlp.onnx")))


def test_rewrite_emit_custom_declares_the_domain_and_matches_the_matmul_emission(library, reference_mlp):
    custom, report = tnonnx.rewrite(reference_mlp, format="tt", rank=4, emit="custom")
    matmul, report_mm = tnonnx.rewrite(reference_mlp, format="tt", rank=4, emit="matmul")
    onnx.checker.check_model(custom, full_check=True)
    assert custom_ops.needs_library(custom) and not custom_ops.needs_library(matmul)
    assert (custom_ops.DOMAIN, 1) in [(i.domain, i.version) for i in custom.opset_import]
    assert sum(n.domain == custom_ops.DOMAIN for n in custom.graph.node) == 3
    assert report.validation is not None
    assert any("custom-op library" in n for n in report.notes) and not report_mm.notes
    x = randn(6, 784, seed=35)
    assert rel_err(run_model(matmul, x), run_model(custom, x)) < TOL
    # the report counts the custom nodes' MACs like the MatMul chains'
    assert [r.macs_after for r in report.rows] == [r.macs_after for r in report_mm.rows]
    assert all(r.macs_after > 0 for r in report.rows)


def run_model(model, x):
    sess = runtime.session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_rewrite_emit_custom_at_full_rank_validates_against_the_original(library, reference_mlp):
    new, report = tnonnx.rewrite(reference_mlp, format="tt", rank=10**6, force=True, emit="custom")
    assert report.validation.ok
    assert report.validation.outputs[0].rel_l2 < TOL


def test_cli_validate_and_bench_load_the_library_without_flags(library, tmp_path):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), src)
    out = tmp_path / "mlp.tt.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["rewrite", str(src), "--format", "tt", "--rank", "100000", "--force",
                                  "--emit", "custom", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert custom_ops.needs_library(onnx.load(str(out)))
    # outputs reach ~1e3: float32 rounding of a different summation order is ~1e-3 absolute
    # (6.7e-4 seen on one CPU), 6e-7 relative to the output's scale
    result = runner.invoke(main, ["validate", str(src), str(out), "--rtol", "1e-4", "--atol", "1e-2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["bench", str(src), str(out), "--batch", "4", "--repeats", "3", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output


def test_cli_without_the_library_fails_in_one_line(library, tmp_path, monkeypatch):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), src)
    new, _ = tnonnx.rewrite(src, format="tt", rank=4, emit="custom", validate=False)
    out = tmp_path / "mlp.tt.onnx"
    tnonnx.save(new, out)
    monkeypatch.setenv(custom_ops.ENV_LIBRARY, str(tmp_path / "missing.so"))
    result = CliRunner().invoke(main, ["validate", str(src), str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"tnonnx: error: {custom_ops.ENV_LIBRARY}='{tmp_path / 'missing.so'}': no such file"]


def test_build_ops_command_prints_the_library(library):
    result = CliRunner().invoke(main, ["build-ops"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(library)


def test_build_ops_with_a_folder_without_headers_fails_in_one_line(library, tmp_path):
    result = CliRunner().invoke(main, ["build-ops", "--include-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"tnonnx: error: --include-dir '{tmp_path}': no onnxruntime_cxx_api.h")


def test_build_is_cached_until_the_source_changes(library):
    stamp = library.stat().st_mtime_ns
    assert custom_ops.build() == library
    assert library.stat().st_mtime_ns == stamp
    assert custom_ops.library_path() == library
    assert custom_ops.ensure_library() == library


def test_unreachable_mirror_is_reported_as_missing_headers(tmp_path, monkeypatch):
    """No network (or no mirror): one line naming what failed and how to give headers."""
    monkeypatch.setattr(ort_headers, "DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    monkeypatch.setattr(ort_headers, "_POOL_URL", "http://127.0.0.1:9/debian/pool/x.deb")
    with pytest.raises(ort_headers.HeadersUnreachable, match="cannot fetch the onnxruntime headers.*ORT_INCLUDE_DIR"):
        ort_headers.fetch_headers(tmp_path)
