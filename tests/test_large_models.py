"""Models past protobuf's 2 GB limit, on small external-data models with the limits lowered:
weights read on demand, untouched weights copied byte for byte, outputs over the limit
written with external data, memory bounded by one layer."""

import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper

import tnonnx
from tnonnx import external, runtime
from tnonnx import model as model_io
from tnonnx.cli import main

from onnx_builders import init, make_model, rng, value

N, M = 48, 64


def low_rank(a: int, b: int, seed: int, rank: int = 6) -> np.ndarray:
    g = rng(seed)
    return (g.standard_normal((a, rank)) @ g.standard_normal((rank, b)) / np.sqrt(a * rank)).astype(np.float32)


def chain(layers: int, n: int = N, m: int = M) -> onnx.ModelProto:
    """x (batch, n) through `layers` MatMuls (n x m, m x n, ...) with Relu between them."""
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        a, b = (n, m) if i % 2 == 0 else (m, n)
        inits.append(init(f"W{i}", low_rank(a, b, seed=i)))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    out = m if layers % 2 else n
    return make_model(nodes, [value("x", ["batch", n])], [value(x, ["batch", out])], inits)


def saved(tmp_path, model: onnx.ModelProto, name: str = "model.onnx"):
    path = tmp_path / "in" / name
    path.parent.mkdir(exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    """Every tensor of these models counts as large: none is read in at load time."""
    monkeypatch.setattr(external, "EAGER_BELOW", 0)
    external.traffic.reset()


def run_path(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def spans(path):
    """name -> bytes of each external tensor of the model saved at `path`."""
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if external.is_external(t):
            file, offset, length = external.span(t, str(path.parent))
            with open(file, "rb") as f:
                f.seek(offset)
                out[t.name] = f.read(length)
    return out


def test_inspect_reads_no_weight(tmp_path):
    path = saved(tmp_path, chain(4))
    loaded = model_io.load(path)
    assert loaded.ByteSize() < 4000  # the graph only: weights are still references
    (path.parent / "weights.bin").unlink()  # inspect cannot read what is no longer there
    report = tnonnx.inspect(loaded)
    assert [r.params_before for r in report.rows] == [N * M] * 4
    assert report.totals.bytes_before > 4 * N * M * 4
    assert external.traffic.read == 0


def test_rewrite_reads_only_the_layers_it_rewrites(tmp_path):
    path = saved(tmp_path, chain(4))
    tnonnx.rewrite(path, format="svd", rank=6, include="fc[13]", validate=False, timing=False)
    assert sorted(external.traffic.tensors_read) == ["W1", "W3"]
    assert external.traffic.read == 2 * N * M * 4


def test_untouched_weights_are_copied_byte_for_byte(tmp_path):
    path = saved(tmp_path, chain(4))
    new, report = tnonnx.rewrite(path, format="svd", rank=6, include="fc[13]", timing=False)
    assert report.validation.outputs[0].rel_l2 < 1e-5  # rank 6 is exact for these weights
    out = tnonnx.save(new, tmp_path / "out" / "small.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    before, after = spans(path), spans(out)
    assert after["W0"] == before["W0"] and after["W2"] == before["W2"]
    assert "W1" not in after and "W3" not in after
    x = rng(5).standard_normal((3, N)).astype(np.float32)
    np.testing.assert_allclose(run_path(out, x), run_path(path, x), rtol=1e-4, atol=1e-5)


def test_output_over_the_limit_is_written_with_external_data(tmp_path, monkeypatch):
    model = chain(4)  # inline weights: 4 x 12 kB
    new, _ = tnonnx.rewrite(model, format="svd", rank=6, include="fc0", validate=False, timing=False)
    out = tnonnx.save(new, tmp_path / "a" / "small.onnx")
    assert [p.name for p in out.parent.iterdir()] == ["small.onnx"]  # under the limit: one file
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 20_000)
    out = tnonnx.save(new, tmp_path / "b" / "small.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    assert out.stat().st_size < 20_000
    x = rng(6).standard_normal((2, N)).astype(np.float32)
    np.testing.assert_allclose(run_path(out, x), runtime.session(new).run(None, {"x": x})[0], rtol=1e-5)


def test_cli_rewrites_an_external_data_model_into_one_data_file(tmp_path):
    path = saved(tmp_path, chain(3))
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(path), "-o", str(out), "--format", "svd", "--rank", "6",
                                       "--no-timing"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.onnx", "out.onnx.data"]
    assert "weights read from the input's data file" in result.output
    x = rng(7).standard_normal((2, N)).astype(np.float32)
    np.testing.assert_allclose(run_path(out, x), run_path(path, x), rtol=1e-4, atol=1e-5)


def test_truncated_data_file_is_one_clear_line(tmp_path):
    path = saved(tmp_path, chain(2))
    data = path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:-100])
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "cannot read its external data" in result.output and "truncated" in result.output
    assert "Traceback" not in result.output


def test_model_too_large_for_memory_is_refused_before_running(tmp_path, monkeypatch):
    path = saved(tmp_path, chain(2))
    monkeypatch.setattr(runtime, "available_memory", lambda: 10_000)
    with pytest.raises(tnonnx.TnonnxError, match="too large to run on this machine") as info:
        tnonnx.rewrite(path, format="svd", rank=6, timing=False)
    assert "\n" not in str(info.value)


def peak_rewrite_bytes(tmp_path, layers: int) -> int:
    path = saved(tmp_path / str(layers), chain(layers, 192, 256), f"m{layers}.onnx")
    tracemalloc.start()
    try:
        tnonnx.rewrite(path, format="svd", rank=6, validate=False, timing=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_rewrite_memory_does_not_grow_with_the_number_of_layers(tmp_path):
    (tmp_path / "2").mkdir()
    (tmp_path / "10").mkdir()
    layer = 192 * 256 * 8  # one weight in float64: 393 kB
    few, many = peak_rewrite_bytes(tmp_path, 2), peak_rewrite_bytes(tmp_path, 10)
    # eight more layers held at once would add 8 x 393 kB; one layer at a time adds nothing
    assert many - few < layer, (few, many)


@pytest.mark.parametrize("shape", [(40, 130), (130, 40), (60, 60)])
def test_large_weight_svd_through_the_gram_matrix_matches_lapack(monkeypatch, shape):
    from tnonnx.formats import svd
    from tnonnx.formats.base import RankSpec

    g = rng(3)
    w = g.standard_normal(shape) * np.exp(-np.arange(shape[1]) / 8)  # decaying spectrum
    lapack = svd.balanced_factors(w, RankSpec(rank=12))
    monkeypatch.setattr(svd, "GRAM_ABOVE", 0)
    u, v = svd.balanced_factors(w, RankSpec(rank=12))
    assert u.shape == (shape[0], 12) and v.shape == (12, shape[1])
    np.testing.assert_allclose(u @ v, lapack[0] @ lapack[1], atol=1e-8 * np.abs(w).max())
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.linalg.norm(v, axis=1), rtol=1e-8)  # balanced
    full = svd.balanced_factors(w, RankSpec(rank=min(shape)))
    np.testing.assert_allclose(full[0] @ full[1], w, atol=1e-9 * np.abs(w).max())  # exact at full rank


def test_a_remembered_svd_is_reused_instead_of_the_gram_matrix(monkeypatch):
    """The planner reads a layer's spectrum (thin_svd, remembered) and then fits svd at
    many ranks: those fits truncate the remembered SVD, whatever the weight's size."""
    from tnonnx.formats import svd
    from tnonnx.formats.base import RankSpec

    w = rng(4).standard_normal((50, 70)) * np.exp(-np.arange(70) / 8)
    monkeypatch.setattr(svd, "GRAM_ABOVE", 0)
    u, s, vt = svd.thin_svd(w)

    def no_gram(*args):
        raise AssertionError("the Gram matrix was formed although the SVD was remembered")
    monkeypatch.setattr(svd, "_gram_factors", no_gram)
    for r in (1, 7, 50):
        a, b = svd.balanced_factors(w, RankSpec(rank=r))
        np.testing.assert_allclose(a @ b, (u[:, :r] * s[:r]) @ vt[:r], atol=1e-10 * np.abs(w).max())
    with pytest.raises(AssertionError, match="Gram matrix"):  # another matrix: nothing remembered for it
        svd.balanced_factors(w + 1.0, RankSpec(rank=3))


def test_gram_eigenpairs_are_kept_for_the_next_cap(monkeypatch):
    """The planner fits one large weight at cap after cap: the first cap's eigenpairs, then
    all of them once a larger cap is asked for, each cap truncating them."""
    import scipy.linalg

    from tnonnx.formats import svd
    from tnonnx.formats.base import RankSpec

    w = rng(5).standard_normal((40, 130)) * np.exp(-np.arange(130) / 8)
    u0, s0, vt0 = np.linalg.svd(w, full_matrices=False)  # not through thin_svd, which would be remembered
    monkeypatch.setattr(svd, "GRAM_ABOVE", 0)
    calls = []
    real = scipy.linalg.eigh
    monkeypatch.setattr(scipy.linalg, "eigh", lambda *a, **k: calls.append(k.get("subset_by_index")) or real(*a, **k))
    for r in (3, 12, 5, 40):
        u, v = svd.balanced_factors(w, RankSpec(rank=r))
        np.testing.assert_allclose(u @ v, (u0[:, :r] * s0[:r]) @ vt0[:r], atol=1e-8 * np.abs(w).max())
    assert calls == [[37, 39], None]  # cap 3's eigenpairs, then all of them for cap 12; 5 and 40 reuse them
