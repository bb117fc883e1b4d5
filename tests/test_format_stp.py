"""The semi-tensor-product formats (stt, str, sttu): exact on weights with exact STP
structure, error non-increasing in rank, projection + decomposition errors (Pythagoras),
--tol / --ratio / --rank honoured or the layer refused with STPNotApplicable, torch ==
numpy == ONNX, counted params/MACs == the graph's, and a full-rank rewrite end to end."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import tnonnx
from tnonnx import macs
from tnonnx.api import emit_layer
from tnonnx.emit import Builder
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec, str_, stt, sttu, tt
from tnonnx.formats.stp import STPNotApplicable, embed_dense, project_dense, stp_modes
from tnonnx.formats.stp_conv import kron_channels
from tnonnx.graph import find_layers

from onnx_builders import init, make_model, randn, rel_err, run, value

MODULES = {"stt": stt, "str": str_, "sttu": sttu}
NAMES = sorted(MODULES)
FULL = RankSpec(rank=10**6)
CONV_CASES = [
    ((16, 8, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((32, 24, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]}),
    ((20, 18, 5), {"strides": [2], "pads": [2, 2]}),
    ((8, 6, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    ((24, 16, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((8, 6, 3, 1, 3), {"strides": [2, 1, 2], "pads": [1, 0, 0, 1, 0, 1]}),
    ((16, 8, 1, 1), {}),
]


def structured(fmt, shape, rank=3, seed=0, t=2, **kw):
    """A weight or kernel with exact STP structure at `rank`: the format's own low-rank
    fit of a random tensor, rebuilt."""
    w = randn(*shape, seed=seed).astype(np.float64)
    fit = MODULES[fmt].fit_dense if len(shape) == 2 else MODULES[fmt].fit_conv
    return fit(w, RankSpec(rank=rank), stp_t=t, **kw).to_dense()


# ------------------------------------------------------------------ dense


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("shape,t", [((48, 64), 2), ((64, 64), 2), ((96, 128), 2), ((54, 36), 3), ((32, 48), 1)])
def test_dense_exact_on_structured_weights(fmt, shape, t):
    w = structured(fmt, shape, t=t)
    # full rank; and the rank it was built at, where the fit is exact there (TR-ALS is not)
    for spec in (FULL,) if fmt == "str" else (FULL, RankSpec(rank=3)):
        fact = MODULES[fmt].fit_dense(w, spec, stp_t=t)
        assert fact.relative_error(w) < 1e-12


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("noise", [0.0, 0.1, 1.0])
def test_dense_error_non_increasing_in_rank(fmt, noise):
    w = structured(fmt, (64, 96), rank=8) + noise * randn(64, 96, seed=2).astype(np.float64)
    errors = [MODULES[fmt].fit_dense(w, RankSpec(rank=r)).relative_error(w) for r in (1, 2, 3, 4, 8, 16, 64)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("fmt", sorted(set(NAMES) - {"sttu"}))
def test_projection_and_decomposition_errors_add_up(fmt):
    w = randn(64, 96, seed=3).astype(np.float64)
    for r in (1, 4, 100):
        fact = MODULES[fmt].fit_dense(w, RankSpec(rank=r))
        assert abs(np.hypot(fact.projection_error, fact.decomposition_error) - fact.relative_error(w)) < 1e-12
    assert fact.decomposition_error < 1e-12  # full rank: what is left is the projection
    ins, outs = fact.modes
    reduced = project_dense(w, ins, outs, 2)
    # the projection is orthogonal: the residual is orthogonal to every structured weight
    other = embed_dense(randn(*reduced.shape, seed=4).astype(np.float64), ins, outs, 2)
    assert abs(np.sum((w - embed_dense(reduced, ins, outs, 2)) * other)) < 1e-9


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("tol", [0.05, 0.3, 0.7])
def test_tolerance_is_guaranteed_when_the_structure_allows(fmt, tol):
    w = structured(fmt, (96, 128), rank=3 if fmt == "sttu" else 12, seed=5)  # sttu: ranks are factor widths
    w += 0.02 * np.linalg.norm(w) / np.sqrt(w.size) * randn(96, 128, seed=6)  # projection error ~0.02
    fact = MODULES[fmt].fit_dense(w, RankSpec(tol=tol))
    assert fact.relative_error(w) <= tol + 1e-12
    assert fact.params() < w.size


@pytest.mark.parametrize("fmt", sorted(set(NAMES) - {"sttu"}))
def test_tolerance_below_the_projection_error_is_refused(fmt):
    w = randn(64, 96, seed=7).astype(np.float64)  # unstructured: projection error ~0.9
    with pytest.raises(STPNotApplicable, match="tolerance"):
        MODULES[fmt].fit_dense(w, RankSpec(tol=0.5))
    fact = MODULES[fmt].fit_dense(w, RankSpec(tol=0.99))
    assert fact.relative_error(w) <= 0.99


def test_sttu_needs_no_projection():
    w = randn(64, 96, seed=8).astype(np.float64)
    assert sttu.fit_dense(w, FULL).relative_error(w) < 1e-12
    assert sttu.fit_dense(w, RankSpec(tol=0.3)).relative_error(w) <= 0.3


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("ratio", [2, 5, 10, 50])
def test_ratio_reaches_the_requested_reduction(fmt, ratio):
    w = randn(256, 384, seed=9).astype(np.float64)
    fact = MODULES[fmt].fit_dense(w, RankSpec(ratio=ratio))
    assert w.size / fact.params() >= ratio


@pytest.mark.parametrize("fmt", NAMES)
def test_rank_is_a_cap(fmt):
    w = randn(64, 96, seed=10).astype(np.float64)
    assert max(MODULES[fmt].fit_dense(w, RankSpec(rank=3)).ranks) <= 3


def test_modes_divisible_by_t():
    assert stp_modes(384, 1536, 2) == ((4, 4, 4, 6), (4, 6, 8, 8))
    assert stp_modes(40, 24, 2) == ((4, 10), (4, 6))  # 2^3 does not divide 40 and 24: d falls to 2
    assert stp_modes(54, 36, 3, order=1) == ((54,), (36,))
    with pytest.raises(STPNotApplicable, match="divide"):
        stt.fit_dense(randn(7, 30).astype(np.float64), FULL)
    with pytest.raises(STPNotApplicable, match="divisible"):
        stt.fit_dense(randn(48, 64).astype(np.float64), FULL, modes=((4, 12), (8, 8)), stp_t=3)
    with pytest.raises(STPNotApplicable):
        sttu.fit_conv(randn(16, 3, 3, 3).astype(np.float64), FULL)  # RGB input
    fact = stt.fit_dense(randn(64, 48).astype(np.float64), FULL, modes=((4, 4, 4), (2, 4, 6)))
    assert fact.modes == ((4, 4, 4), (2, 4, 6))


def test_t1_is_the_base_format():
    w = randn(64, 96, seed=11).astype(np.float64)
    a, b = stt.fit_dense(w, RankSpec(rank=5), stp_t=1), tt.fit_dense(w, RankSpec(rank=5))
    assert a.params() == b.params() and abs(a.relative_error(w) - b.relative_error(w)) < 1e-12


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 5)])
def test_dense_torch_module_equals_reference(fmt, batch_shape):
    w = randn(48, 64, seed=12).astype(np.float64)
    fact = MODULES[fmt].fit_dense(w, RankSpec(rank=4))
    x = randn(*batch_shape, 48, seed=13).astype(np.float64)
    with torch.no_grad():
        y_torch = fact.torch_module().double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_torch, fact.apply(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fact.apply(x), x @ fact.to_dense(), rtol=1e-9, atol=1e-9)


def _model(shape, attrs, seed):
    w = randn(*shape, seed=seed)
    if len(shape) == 2:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")]
        return make_model(nodes, [value("x", ["b", 5, shape[0]])], [value("y", ["b", 5, shape[1]])], [init("W", w)])
    nsp = len(shape) - 2
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], name="layer", **attrs)]
    return make_model(nodes, [value("x", ["b", shape[1]] + [None] * nsp)], [value("y", ["b", shape[0]] + [None] * nsp)],
                      [init("W", w), init("B", randn(shape[0], seed=seed + 1))])


def _emit_alone(model, fmt, spec, emit="matmul"):
    new = onnx.ModelProto()
    new.CopyFrom(model)
    layer = find_layers(new)[0]
    module = MODULES[fmt]
    fit = module.fit_conv(layer.weight, spec) if layer.kind == "conv" else module.fit_dense(layer.weight, spec)
    b = Builder("layer/" + fmt, np.float32, np.float32)
    emit_layer(b, layer, fit, emit)
    del new.graph.node[:]
    new.graph.node.extend(b.nodes)
    del new.graph.initializer[:]
    new.graph.initializer.extend(b.initializers)
    onnx.checker.check_model(new)
    return new, fit, layer


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("emit", ["matmul", "einsum"])
def test_dense_onnx_equals_torch_and_counts(fmt, emit):
    new, fact, _ = _emit_alone(_model((48, 64), {}, 14), fmt, RankSpec(rank=3), emit)
    x = randn(3, 5, 48, seed=15)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    cost = macs.count(new, {"x": (3, 5, 48)})
    assert cost.params == fact.params()
    assert cost.total == fact.macs(rows=15)


# ------------------------------------------------------------------ conv


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_exact_on_structured_kernels(fmt, kshape, attrs):
    k = structured(fmt, kshape, rank=2, seed=16)
    for spec in (FULL,) if fmt == "str" else (FULL, RankSpec(rank=2)):
        assert MODULES[fmt].fit_conv(k, spec).relative_error(k) < 1e-12


@pytest.mark.parametrize("fmt", NAMES)
def test_conv_error_non_increasing_and_rules(fmt):
    k = structured(fmt, (32, 24, 3, 3), rank=6, seed=17) + 0.1 * randn(32, 24, 3, 3, seed=18)
    errors = [MODULES[fmt].fit_conv(k, RankSpec(rank=r)).relative_error(k) for r in (1, 2, 4, 8, 16, 64)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    fact = MODULES[fmt].fit_conv(k, RankSpec(tol=0.3))
    assert fact.relative_error(k) <= 0.3 + 1e-12
    for ratio in (2, 5, 10):
        assert k.size / MODULES[fmt].fit_conv(k, RankSpec(ratio=ratio)).params() >= ratio


def test_conv_projection_tolerance_and_errors():
    k = randn(32, 24, 3, 3, seed=30).astype(np.float64)  # unstructured: projection error ~0.87
    with pytest.raises(STPNotApplicable, match="tolerance"):
        stt.fit_conv(k, RankSpec(tol=0.5))
    for fmt in ("stt", "str"):
        fact = MODULES[fmt].fit_conv(k, RankSpec(rank=3))
        assert abs(np.hypot(fact.projection_error, fact.decomposition_error) - fact.relative_error(k)) < 1e-12
    assert sttu.fit_conv(k, FULL).relative_error(k) < 1e-12  # sttu: no projection


def test_conv_kernel_is_kron_with_identity():
    k = randn(16, 8, 3, 3, seed=19).astype(np.float64)
    dense = stt.fit_conv(k, FULL).to_dense()
    reduced = dense.reshape(8, 2, 4, 2, 3, 3)
    assert np.allclose(dense, kron_channels(reduced[:, 0, :, 0], 2))


@pytest.mark.parametrize("fmt", NAMES)
@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_onnx_equals_torch_and_counts(fmt, kshape, attrs):
    model = _model(kshape, attrs, 20)
    new, fact, layer = _emit_alone(model, fmt, RankSpec(rank=3))
    spatial = (9,) * (len(kshape) - 2)
    x = randn(2, kshape[1], *spatial, seed=21)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        module = fact.torch_module(layer.geometry, layer.bias)
        y_torch = module(torch.from_numpy(x)).numpy()
        y64 = module.double()(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    # the module computes the conv with the rebuilt dense kernel
    full = torch.nn.functional.__dict__[f"conv{len(spatial)}d"]
    pads = attrs.get("pads", [0] * 2 * len(spatial))
    xp = torch.nn.functional.pad(torch.from_numpy(x.astype(np.float64)),
                                 [p for i in reversed(range(len(spatial))) for p in (pads[i], pads[i + len(spatial)])])
    ref = full(xp, torch.from_numpy(fact.to_dense()), torch.from_numpy(layer.bias.astype(np.float64)),
               attrs.get("strides", 1), 0, attrs.get("dilations", 1)).numpy()
    np.testing.assert_allclose(y64, ref, rtol=1e-5, atol=1e-5)  # float32 cores
    cost = macs.count(new, {"x": x.shape})
    geometry = ConvGeometry(layer.geometry.kernel, layer.geometry.attrs, spatial, tuple(y.shape[2:]))
    assert cost.total == 2 * fact.macs(geometry)
    assert cost.params == fact.params() + kshape[0]  # + the bias


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("fmt", NAMES)
def test_rewrite_end_to_end_at_full_rank(fmt, monkeypatch):
    monkeypatch.setitem(FORMATS, fmt, MODULES[fmt])
    w1 = structured(fmt, (32, 48), seed=22).astype(np.float32)
    w2 = structured(fmt, (48, 16), seed=23).astype(np.float32)
    k = structured(fmt, (8, 4, 3, 3), seed=24, rank=2).astype(np.float32)
    kg = np.concatenate([structured(fmt, (4, 4, 3), seed=s, rank=2) for s in (29, 30)]).astype(np.float32)
    nodes = [helper.make_node("Conv", ["img", "K", "KB"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["seq", "KG"], ["g"], name="grouped", group=2, strides=[2]),
             helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="gemm", transB=1)]
    model = make_model(nodes, [value("img", [2, 4, 6, 6]), value("x", [3, 32]), value("seq", [2, 8, 9])],
                       [value("c", [2, 8, 6, 6]), value("y", [3, 16]), value("g", [2, 8, 4])],
                       [init("K", k), init("KB", randn(8, seed=25)), init("KG", kg), init("W1", w1), init("W2", w2.T.copy()),
                        init("B2", randn(16, seed=26))])
    new, report = tnonnx.rewrite(model, format=fmt, rank=100000, force=True, validate=False, format_options={"stp_t": 2})
    feeds = {"img": randn(2, 4, 6, 6, seed=27), "x": randn(3, 32, seed=28), "seq": randn(2, 8, 9, seed=31)}
    for a, b in zip(run(model, feeds), run(new, feeds)):
        assert rel_err(a, b) < 1e-5
    assert all(row.format == fmt for row in report.rows)
