"""Hierarchical Tucker (ht) and the hybrid policy (HT for dense, TT for conv): exact at
full rank, error non-increasing in rank, --tol / --ratio / --rank honoured, torch ==
numpy == ONNX, counted params and MACs == the emitted graph's, end to end rewrites."""

import math

import numpy as np
import pytest
import torch
from onnx import helper
from threadpoolctl import threadpool_limits

import tnonnx
from tnonnx import macs
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec, hybrid, ht, tt

from onnx_builders import emit_alone, init, make_model, randn, rel_err, run, single_layer_model, value

FULL = RankSpec(rank=10**6)
MODULES = {"ht": ht, "hybrid": hybrid}
DENSE_SHAPES = [(48, 60), (64, 64), (120, 84), (7, 30), (96, 256)]
CONV_CASES = [
    ((16, 8, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((32, 24, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]}),
    ((20, 18, 5), {"strides": [2], "pads": [2, 2]}),
    ((8, 6, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    ((24, 16, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((64, 48, 1, 1), {}),
    ((48, 64, 3, 1), {"strides": [1, 2], "pads": [1, 0, 1, 0]}),
    ((18, 20, 5), {"dilations": [2], "pads": [3, 1]}),
    ((6, 8, 3, 2, 3), {"strides": [2, 1, 2], "pads": [1, 0, 1, 1, 1, 0]}),
]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Small SVDs run far slower multi-threaded in OpenBLAS (as tnonnx.rewrite knows)."""
    with threadpool_limits(1, user_api="blas"):
        yield


def decaying(n, m, seed, scale=10.0):
    """A weight whose spectrum decays, so truncation bites at different ranks."""
    u, _ = np.linalg.qr(randn(n, min(n, m), seed=seed).astype(np.float64))
    v, _ = np.linalg.qr(randn(m, min(n, m), seed=seed + 1).astype(np.float64))
    return (u * np.exp(-np.arange(min(n, m)) / scale)) @ v.T


# ---------------------------------------------------------------------- dense


@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("order", [2, 3, 4])
def test_dense_exact_at_full_rank(shape, order):
    w = randn(*shape, seed=1).astype(np.float64)
    fact = ht.fit_dense(w, FULL, order=order)
    assert fact.relative_error(w) < 1e-12


def test_dense_network_is_a_balanced_tree_of_frames_and_transfers():
    w = randn(256, 384, seed=2).astype(np.float64)
    fact = ht.fit_dense(w, RankSpec(rank=5), order=4)
    labels = {c.key: c.labels for c in fact.chain.steps}
    # leaves (n_k, m_k, u_k); B over ((0,1),(2,3)); the root (r x r) is stored inside one child
    assert {k: len(v) for k, v in labels.items()} == {"U0": 3, "U1": 3, "U2": 3, "U3": 3, "B0_2": 3, "B2_4": 3}
    assert fact.ranks == (5, 5, 5, 5, 5, 5)
    ins, outs = fact.modes
    assert fact.params() == sum(5 * a * b for a, b in zip(ins, outs)) + 2 * 5**3


def test_modes_override_and_order():
    w = randn(64, 48, seed=3).astype(np.float64)
    fact = ht.fit_dense(w, FULL, modes=((4, 4, 4), (3, 4, 4)))
    assert fact.modes == ((4, 4, 4), (3, 4, 4)) and fact.relative_error(w) < 1e-12
    with pytest.raises(tnonnx.TnonnxError):
        ht.fit_dense(w, FULL, order=1)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_dense_error_non_increasing_in_rank(order):
    w = randn(64, 96, seed=4).astype(np.float64)
    errors = [ht.fit_dense(w, RankSpec(rank=r), order=order).relative_error(w) for r in (1, 2, 3, 4, 6, 8, 16, 32, 64)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("order", [2, 3, 4, 5])
@pytest.mark.parametrize("tol", [0.01, 0.05, 0.3, 0.7])
def test_tolerance_is_guaranteed(order, tol):
    w = decaying(96, 128, seed=5)
    fact = ht.fit_dense(w, RankSpec(tol=tol), order=order)
    assert fact.relative_error(w) <= tol + 1e-12
    if tol >= 0.3 and order == 2 or tol >= 0.7:
        assert fact.params() < w.size


def test_tolerance_is_not_wasted():
    """Grasedyck's bound splits eps over 2d-3 SVDs: the error is within sqrt(2d-3) of tol."""
    w = decaying(256, 256, seed=6, scale=30.0)
    for tol in (0.1, 0.3):
        err = ht.fit_dense(w, RankSpec(tol=tol), order=4).relative_error(w)
        assert tol / math.sqrt(5) / 2 < err <= tol


@pytest.mark.parametrize("ratio", [2, 5, 10, 20])
def test_ratio_is_reached_with_the_largest_cap(ratio):
    w = randn(256, 384, seed=7).astype(np.float64)
    fact = ht.fit_dense(w, RankSpec(ratio=ratio))
    assert w.size / fact.params() >= ratio
    cap = max(fact.ranks)
    assert w.size / ht.fit_dense(w, RankSpec(rank=cap + 1)).params() < ratio


def test_ratio_on_a_rank_deficient_weight():
    w = randn(128, 8, seed=8).astype(np.float64) @ randn(8, 128, seed=9).astype(np.float64)
    fact = ht.fit_dense(w, RankSpec(ratio=4))
    assert w.size / fact.params() >= 4


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 5)])
def test_dense_torch_module_equals_reference(batch_shape):
    w = randn(48, 60, seed=10).astype(np.float64)
    fact = ht.fit_dense(w, RankSpec(rank=6), order=3)
    x = randn(*batch_shape, 48, seed=11).astype(np.float64)
    with torch.no_grad():
        y_torch = fact.torch_module().double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_torch, fact.apply(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fact.apply(x), x @ fact.to_dense(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------- conv


@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_exact_at_full_rank(kshape, attrs):
    k = randn(*kshape, seed=12).astype(np.float64)
    fact = ht.fit_conv(k, FULL)
    assert fact.relative_error(k) < 1e-12
    assert [s.spatial for s in fact.stages].count(True) == 1


@pytest.mark.parametrize("t,s", [(64, 32), (32, 64)])
def test_conv_stages(t, s):
    """1x1 S -> r_in (S-side subtree), k conv r_in -> r_out (kernel leaf and B_c), 1x1 r_out
    -> T (T-side subtree); the kernel leaf joins the smaller side, the root the larger."""
    k = randn(t, s, 3, 3, seed=13).astype(np.float64)
    fact = ht.fit_conv(k, RankSpec(rank=6))
    assert [w.shape for w in fact.stage_weights()] == [(6, s, 1, 1), (6, 6, 3, 3), (t, 6, 1, 1)]
    assert [s.spatial for s in fact.stages] == [False, True, False]
    assert fact.relative_error(k) < 1


@pytest.mark.parametrize("order", [1, 2, 4, 8, 16, 64, 256])
def test_conv_error_non_increasing_in_rank(order):
    k = randn(32, 24, 3, 3, seed=14).astype(np.float64)
    ranks = [r for r in (1, 2, 3, 4, 6, 8, 16, 64, 256) if r <= order * 4]
    errors = [ht.fit_conv(k, RankSpec(rank=r)).relative_error(k) for r in ranks]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("tol", [0.05, 0.3, 0.6])
def test_conv_tolerance_and_ratio(tol):
    k = decaying(64, 32 * 9, seed=15, scale=8.0).reshape(64, 32, 3, 3)
    assert ht.fit_conv(k, RankSpec(tol=tol)).relative_error(k) <= tol + 1e-12
    for ratio in (2, 5, 10):
        assert k.size / ht.fit_conv(k, RankSpec(ratio=ratio)).params() >= ratio


def _single_layer_model(kind, shape, attrs, seed):
    return single_layer_model(shape, attrs, seed)


def _emit_alone(model, module, spec, emit="matmul", **kw):
    return emit_alone(model, module, spec, emit, dense_options=kw)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("emit", ["matmul", "einsum"])
@pytest.mark.parametrize("order", [2, 3, 4])
def test_dense_onnx_equals_torch_and_counts(name, emit, order):
    model = _single_layer_model("dense", (48, 60), {}, 16)
    new, fact, _ = _emit_alone(model, MODULES[name], RankSpec(rank=5), emit, order=order)
    x = randn(3, 5, 48, seed=17)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    cost = macs.count(new, {"x": (3, 5, 48)})
    assert cost.params == fact.params()
    assert cost.total == fact.macs(rows=15)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("kshape,attrs,rank", [(k, a, r) for k, a in CONV_CASES for r in (4, 10**6)]
                         + [((256, 192, 3, 3), {"pads": [1, 1, 1, 1]}, 4)])
def test_conv_onnx_equals_torch_and_counts(name, kshape, attrs, rank):
    model = _single_layer_model("conv", kshape, attrs, 18)
    new, fact, layer = _emit_alone(model, MODULES[name], RankSpec(rank=rank))
    spatial = (9,) * (len(kshape) - 2)
    x = randn(2, kshape[1], *spatial, seed=19)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module(layer.geometry, layer.bias)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5 * np.abs(y_torch).max())
    (y_ref,) = run(model, {"x": x})
    assert y.shape == y_ref.shape
    if rank > 1000:
        assert rel_err(y_ref, y) < 1e-5
    cost = macs.count(new, {"x": x.shape})
    geometry = ConvGeometry(layer.geometry.kernel, layer.geometry.attrs, spatial, tuple(y.shape[2:]))
    assert cost.total == 2 * fact.macs(geometry)
    assert cost.params == fact.params() + kshape[0]  # + the bias


def test_conv_stage_cores_are_merged_in_graph_when_smaller():
    k = randn(256, 192, 3, 3, seed=20).astype(np.float64)
    fact = ht.fit_conv(k, RankSpec(rank=4))
    weights = fact.stage_weights()
    stored = [min(w.size, sum(fact.cores[key].size for key in s.train)) for s, w in zip(fact.stages, weights)]
    assert fact.params() == sum(stored)
    assert any(st < w.size for st, w in zip(stored, weights))  # channel subtrees beat their merged 1x1 weights


# ---------------------------------------------------------------------- hybrid and end to end


def test_hybrid_is_ht_for_dense_and_tt_for_conv():
    w = randn(96, 128, seed=21).astype(np.float64)
    k = randn(32, 24, 3, 3, seed=22).astype(np.float64)
    spec = RankSpec(rank=6)
    fd, fc = hybrid.fit_dense(w, spec), hybrid.fit_conv(k, spec)
    assert fd.format == fc.format == "hybrid"
    np.testing.assert_array_equal(fd.to_dense(), ht.fit_dense(w, spec).to_dense())
    np.testing.assert_array_equal(fc.to_dense(), tt.fit_conv(k, spec).to_dense())


@pytest.fixture
def registered(monkeypatch):
    for name, module in MODULES.items():
        monkeypatch.setitem(FORMATS, name, module)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_rewrite_end_to_end_at_full_rank(registered, name):
    nodes = [
        helper.make_node("Conv", ["x", "K", "KB"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "W1"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="gemm", transB=1),
    ]
    inits = [init("K", randn(16, 8, 3, 3, seed=23)), init("KB", randn(16, seed=24)), init("W1", randn(256, 48, seed=25)),
             init("W2", randn(32, 48, seed=26)), init("b2", randn(32, seed=27))]
    m = make_model(nodes, [value("x", [2, 8, 8, 8])], [value("y", [2, 32])], inits)
    new, report = tnonnx.rewrite(m, format=name, rank=10**5, force=True, validate=False)
    assert [r.format for r in report.rows] == [name] * 3
    x = randn(2, 8, 8, 8, seed=28)
    assert rel_err(run(m, {"x": x})[0], run(new, {"x": x})[0]) < 1e-5
    small, report = tnonnx.rewrite(m, format=name, ratio=4, validate=False)
    assert report.totals.params_after < report.totals.params_before
    run(small, {"x": x})
