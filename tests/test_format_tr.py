"""Tensor ring (tnonnx.formats.tr, fitted by tr_fit): exact at full rank, error non-increasing in rank, rank
rules honoured, ring bond > 1, ALS never worse than TR-SVD, torch == numpy == ONNX, counted
params/MACs == the emitted graph's, and an end-to-end rewrite through onnxruntime."""

import math

import numpy as np
import pytest
import torch
from onnx import helper

import tnonnx
from tnonnx import macs
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec, tr, tr_fit

from onnx_builders import emit_alone, init, make_model, randn, rel_err, run, single_layer_model, value

FULL = RankSpec(rank=10**6)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """The raw numerics below (tr_svd, tr_als) are called outside fit_ring's own limit."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def _structured(n, m, k, seed, noise=0.1):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)) @ rng.standard_normal((k, m))
    return w + noise * np.linalg.norm(w) / math.sqrt(w.size) * rng.standard_normal((n, m))


# ------------------------------------------------------------------ the ring numerics


@pytest.mark.parametrize("p_need,p_max,cap,expected", [
    (16, 48, 4, (4, 4)), (48, 48, None, (6, 8)), (12, 12, 8, (3, 4)), (7, 8, None, (2, 4)),
    (7, 7, None, (1, 7)), (7, 7, 3, (2, 3)), (1, 10, 1, (1, 1)), (1, 10, None, (1, 1)), (13, 13, 8, (3, 4)),
])
def test_ring_split(p_need, p_max, cap, expected):
    assert tr_fit.ring_split(p_need, p_max, cap) == expected


@pytest.mark.parametrize("dims", [(36, 80), (8, 12, 10, 24), (4, 6, 9, 4, 8), (5, 42), (3, 3, 3), (1, 7, 2)])
def test_tr_svd_exact_and_tolerance_bound(dims):
    t = np.random.default_rng(0).standard_normal(dims)
    assert tr_fit.ring_error(t, tr_fit.tr_svd(t)) < 1e-12
    for tol in (0.01, 0.1, 0.3, 0.7):  # TR-SVD alone already guarantees the tolerance, from any start
        for start in range(len(dims)):
            assert tr_fit.ring_error(t, tr_fit.tr_svd(t, tol=tol, start=start)) <= tol + 1e-12


def test_svd_params_predicts_tr_svd():
    dims = [16, 24, 32, 48]
    t = np.random.default_rng(1).standard_normal(dims)
    for cap in (1, 2, 3, 5, 8, 13, 30):
        assert tr_fit.svd_params(dims, cap) == sum(c.size for c in tr_fit.tr_svd(t, cap=cap))


def test_als_improves_on_tr_svd_and_gives_uniform_ranks():
    t = np.random.default_rng(2).standard_normal((12, 10, 14))
    start = tr_fit.tr_svd(t, cap=3)
    cores, err = tr_fit.tr_als(t, tr_fit.pad_ring(start, [3, 3, 3]), sweeps=10)
    assert [c.shape[0] for c in cores] == [3, 3, 3]
    assert err < tr_fit.ring_error(t, start)
    assert err == pytest.approx(tr_fit.ring_error(t, cores))


# ------------------------------------------------------------------ dense


@pytest.mark.parametrize("shape,order", [((48, 60), None), ((64, 64), None), ((120, 84), None), ((7, 30), None),
                                         ((64, 96), 3), ((96, 128), 4), ((20, 12), 1)])
def test_dense_exact_at_full_rank(shape, order):
    w = randn(*shape, seed=1).astype(np.float64)
    fact = tr.fit_dense(w, FULL, order=order)
    assert fact.relative_error(w) < 1e-12


def test_dense_ring_bond_is_closed_and_larger_than_one():
    w = _structured(64, 96, 40, seed=3)
    fact = tr.fit_dense(w, RankSpec(rank=4), order=3)
    assert fact.ranks == (4, 4, 4)  # uniform: TR-ALS, r0 = r_d = 4 > 1
    labels = [c.labels for c in fact.chain.steps]
    assert sum("r0" in l for l in labels) == 2
    t = w.reshape(fact.modes[0] + fact.modes[1]).transpose(0, 3, 1, 4, 2, 5).reshape([a * b for a, b in zip(*fact.modes)])
    assert fact.relative_error(w) < tr_fit.ring_error(t, tr_fit.tr_svd(t, cap=4))  # ALS beat TR-SVD


@pytest.mark.parametrize("shape,order", [((64, 96), None), ((96, 128), 3)])
def test_dense_error_non_increasing_in_rank(shape, order):
    w = _structured(*shape, 24, seed=2)
    errors = [tr.fit_dense(w, RankSpec(rank=r), order=order).relative_error(w) for r in (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-12  # the cap saturates: exact


def test_dense_rank_is_a_cap():
    w = randn(96, 128, seed=4).astype(np.float64)
    for r in (2, 5, 40):
        assert max(tr.fit_dense(w, RankSpec(rank=r), order=3).ranks) <= r


@pytest.mark.parametrize("tol", [0.05, 0.3, 0.7])
def test_tolerance_is_guaranteed(tol):
    u, _ = np.linalg.qr(randn(96, 96, seed=3).astype(np.float64))
    v, _ = np.linalg.qr(randn(128, 96, seed=4).astype(np.float64))
    w = (u * np.exp(-np.arange(96) / 10.0)) @ v.T
    for order in (2, 3):
        fact = tr.fit_dense(w, RankSpec(tol=tol), order=order)
        assert fact.relative_error(w) <= tol + 1e-12
        assert fact.params() < w.size or tol < 0.1 or order == 3  # (tt needs 12624 at order 3, tol 0.3)


@pytest.mark.parametrize("ratio", [2, 5, 10, 40])
def test_ratio_reaches_the_requested_reduction(ratio):
    w = randn(256, 384, seed=5).astype(np.float64)
    fact = tr.fit_dense(w, RankSpec(ratio=ratio))
    assert w.size / fact.params() >= ratio
    # the largest ranks that fit: one more on every bond (uniform) or on the cap (TR-SVD) would not
    dims = [a * b for a, b in zip(*fact.modes)]
    if len(set(fact.ranks)) == 1 and fact.ranks[0] < tr_fit.ALS_MAX_RANK:
        assert (fact.ranks[0] + 1) ** 2 * sum(dims) > w.size / ratio


@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 5)])
def test_dense_torch_module_equals_reference(batch_shape):
    w = randn(48, 60, seed=7).astype(np.float64)
    fact = tr.fit_dense(w, RankSpec(rank=4), order=3)
    x = randn(*batch_shape, 48, seed=8).astype(np.float64)
    with torch.no_grad():
        y_torch = fact.torch_module().double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_torch, fact.apply(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fact.apply(x), x @ fact.to_dense(), rtol=1e-9, atol=1e-9)


def _single_layer_model(kind, shape, attrs, seed):
    return single_layer_model(shape, attrs, seed)


def _emit_alone(model, spec, emit="matmul"):
    return emit_alone(model, tr, spec, emit, dense_options={"order": 3})


@pytest.mark.parametrize("emit", ["matmul", "einsum"])
def test_dense_onnx_equals_torch_and_counts(emit):
    model = _single_layer_model("dense", (48, 60), {}, 11)
    new, fact, _ = _emit_alone(model, RankSpec(rank=3), emit)
    x = randn(3, 5, 48, seed=12)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    cost = macs.count(new, {"x": (3, 5, 48)})
    assert cost.params == fact.params()
    if emit == "matmul":
        assert cost.total == fact.macs(rows=15)


# ------------------------------------------------------------------ conv


CONV_CASES = [
    ((16, 8, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((32, 24, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]}),
    ((20, 18, 5), {"strides": [2], "pads": [2, 2]}),
    ((8, 6, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    ((24, 16, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    ((64, 32, 1, 1), {}),
]


@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_exact_at_full_rank(kshape, attrs):
    k = randn(*kshape, seed=9).astype(np.float64)
    fact = tr.fit_conv(k, FULL)
    assert fact.relative_error(k) < 1e-12


@pytest.mark.parametrize("structured", [False, True])
def test_conv_error_non_increasing_in_rank_and_ring_bond(structured):
    if structured:  # where TR-ALS and TR-SVD take turns as the rank grows
        k, ladder = _structured(64, 32 * 9, 16, seed=1).reshape(64, 32, 3, 3), (1, 2, 4, 8, 16, 24, 32, 48, 64, 96)
    else:
        k, ladder = randn(32, 24, 3, 3, seed=10).astype(np.float64), (1, 2, 4, 8, 16, 64, 256)
    facts = [tr.fit_conv(k, RankSpec(rank=r)) for r in ladder]
    errors = [f.relative_error(k) for f in facts]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-12
    assert facts[2].bonds[0] == 4  # the ring bond that rides along the batch


@pytest.mark.parametrize("tol", [0.1, 0.5])
@pytest.mark.parametrize("ratio", [3, 10])
def test_conv_tol_and_ratio(tol, ratio):
    k = _structured(64, 32 * 9, 20, seed=11).reshape(64, 32, 3, 3)
    assert tr.fit_conv(k, RankSpec(tol=tol)).relative_error(k) <= tol + 1e-12
    assert k.size / tr.fit_conv(k, RankSpec(ratio=ratio)).params() >= ratio


@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
@pytest.mark.parametrize("rank", [3, 10**6])
def test_conv_onnx_equals_torch_and_counts(kshape, attrs, rank):
    model = _single_layer_model("conv", kshape, attrs, 13)
    new, fact, layer = _emit_alone(model, RankSpec(rank=rank))
    spatial = (9,) * (len(kshape) - 2)
    x = randn(3, kshape[1], *spatial, seed=14)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module(layer.geometry, layer.bias)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    (y_ref,) = run(model, {"x": x})
    assert y.shape == y_ref.shape
    if rank > 100:
        assert rel_err(y_ref, y) < 1e-4
    cost = macs.count(new, {"x": x.shape})
    geometry = ConvGeometry(layer.geometry.kernel, layer.geometry.attrs, spatial, tuple(y.shape[2:]))
    assert cost.total == 3 * fact.macs(geometry)
    assert cost.params == fact.params() + kshape[0]  # + the bias


# ------------------------------------------------------------------ end to end


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(FORMATS, tr.NAME, tr)


def test_rewrite_matmul_gemm_conv_end_to_end(registered):
    nodes = [
        helper.make_node("Conv", ["x", "K", "KB"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "W1"], ["h"], name="fc1"),
        helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="fc2", transB=1),
    ]
    inits = [init("K", randn(16, 8, 3, 3, seed=30)), init("KB", randn(16, seed=31)),
             init("W1", randn(16 * 16, 48, seed=32)), init("W2", randn(24, 48, seed=33)), init("B2", randn(24, seed=34))]
    m = make_model(nodes, [value("x", [2, 8, 8, 8])], [value("y", [2, 24])], inits)
    feeds = {"x": randn(2, 8, 8, 8, seed=35)}
    new, report = tnonnx.rewrite(m, format="tr", rank=10**5, force=True, validate=False)
    assert {row.format for row in report.rows if row.format} == {"tr"}
    assert rel_err(run(m, feeds)[0], run(new, feeds)[0]) < 1e-4
    small, report = tnonnx.rewrite(m, format="tr", ratio=4, validate=False)
    assert report.totals.params_after < report.totals.params_before


def test_grouped_conv_rewrite(registered):
    k = randn(16, 8, 3, 3, seed=25)
    nodes = [helper.make_node("Conv", ["x", "K", "B"], ["y"], name="conv", group=2, pads=[1, 1, 1, 1])]
    m = make_model(nodes, [value("x", [2, 16, 7, 7])], [value("y", [2, 16, 7, 7])],
                   [init("K", k), init("B", randn(16, seed=26))])
    feeds = {"x": randn(2, 16, 7, 7, seed=27)}
    new, _ = tnonnx.rewrite(m, format="tr", rank=10**5, force=True, validate=False)
    assert rel_err(run(m, feeds)[0], run(new, feeds)[0]) < 1e-4


@pytest.mark.parametrize("cap", [1, 2, 3, 5, 40])
def test_tr_svd_error_from_its_last_core_is_the_true_error(cap):
    t = np.random.default_rng(5).standard_normal((6, 7, 5, 8)) + 3.0
    cores, err = tr_fit.tr_svd_measured(t, cap=cap)
    assert err == pytest.approx(tr_fit.ring_error(t, cores), rel=1e-6, abs=1e-12)
