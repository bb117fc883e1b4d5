"""Tucker (tnonnx.formats.tucker): exact at full rank, error non-increasing in rank, never
worse than truncated HOSVD, --tol guaranteed, --ratio reached with the largest ranks,
Tucker-2 convs, vbmf ranks, torch == numpy == ONNX, counted params/MACs == the graph's,
and an end-to-end rewrite through onnxruntime."""

import math

import numpy as np
import pytest
import torch
from onnx import helper

import tnonnx
from tnonnx import macs
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec, tucker

from onnx_builders import emit_alone, init, make_model, randn, rel_err, run, single_layer_model, value

FULL = RankSpec(rank=10**6)


@pytest.fixture(autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def _decaying(n, m, seed, scale=10.0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, min(n, m))))
    v, _ = np.linalg.qr(rng.standard_normal((m, min(n, m))))
    return (u * np.exp(-np.arange(min(n, m)) / scale)) @ v.T


def _hosvd_error(tensor, ranks):
    """Plain truncated HOSVD, for comparison."""
    approx = tensor
    for k, r in enumerate(ranks):
        u = np.linalg.svd(tucker.unfold(tensor, k), full_matrices=False)[0][:, :r]
        approx = np.moveaxis(np.tensordot(u @ u.T, np.moveaxis(approx, k, 0), axes=1), 0, k)
    return np.linalg.norm(tensor - approx) / np.linalg.norm(tensor)


# ------------------------------------------------------------------ dense


@pytest.mark.parametrize("shape", [(48, 60), (64, 64), (120, 84), (7, 30)])
def test_dense_exact_at_full_rank_and_no_square_factors(shape):
    w = randn(*shape, seed=1).astype(np.float64)
    fact = tucker.fit_dense(w, FULL)
    assert fact.relative_error(w) < 1e-12
    assert set(fact.cores) == {"C"} and fact.params() == w.size  # full-size modes carry no factor


def test_dense_recovers_low_multilinear_rank():
    rng = np.random.default_rng(2)
    dims, ranks = (6, 8, 6, 10), (2, 3, 4, 3)
    t = rng.standard_normal(ranks)
    for k, (d, r) in enumerate(zip(dims, ranks)):
        t = np.moveaxis(np.tensordot(rng.standard_normal((d, r)), np.moveaxis(t, k, 0), axes=1), 0, k)
    w = t.reshape(48, 60)
    fact = tucker.fit_dense(w, FULL, modes=((6, 8), (6, 10)))
    assert fact.relative_error(w) < 1e-12 and fact.ranks == ranks
    assert fact.params() == math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks))


def test_dense_error_non_increasing_in_rank_and_caps():
    w = randn(64, 96, seed=3).astype(np.float64)
    facts = {r: tucker.fit_dense(w, RankSpec(rank=r)) for r in range(1, 14)}
    errors = {r: f.relative_error(w) for r, f in facts.items()}
    for r in range(2, 14):  # guaranteed: from every cap to the ladder's rungs below it
        assert all(errors[r] <= errors[rung] + 1e-12 for rung in tucker.ladder(r)[:-1]), errors
    assert all(max(f.ranks) <= r for r, f in facts.items())
    assert errors[13] < 1e-12


@pytest.mark.parametrize("cap", [2, 3, 5])
def test_hooi_never_worse_than_hosvd(cap):
    w = _decaying(48, 60, seed=4) + 0.01 * randn(48, 60, seed=5)
    fact = tucker.fit_dense(w, RankSpec(rank=cap), modes=((6, 8), (6, 10)))
    assert fact.relative_error(w) <= _hosvd_error(w.reshape(6, 8, 6, 10), fact.ranks) + 1e-12


@pytest.mark.parametrize("ranks", [(2, 3, 2, 4), (1, 5, 3, 3), (6, 2, 6, 9)])
def test_hooi_equals_tensorlys_partial_tucker(ranks):
    """Tucker.hooi (Gram eigenvectors) against tensorly's reference HOOI from the same start."""
    from tensorly.decomposition import partial_tucker

    w = _decaying(48, 60, seed=7) + 0.05 * randn(48, 60, seed=8)
    t = tucker.Tucker(w.reshape(6, 8, 6, 10), [0, 1, 2, 3])
    start = t.hosvd(list(ranks))
    modes = sorted(start)
    (_, reference), _ = partial_tucker(t.tensor, [ranks[k] for k in modes], modes=modes,
                                       init=[start[k] for k in modes], n_iter_max=tucker.HOOI_ITERS,
                                       tol=tucker.HOOI_TOL)
    ours = t.hooi(start)
    assert t.error2(ours) <= t.error2(start) + 1e-12
    assert t.error2(ours) == pytest.approx(t.error2(dict(zip(modes, reference))), rel=1e-6)


def test_extending_a_factor_keeps_it_and_adds_the_residuals_leading_directions():
    w = _decaying(48, 60, seed=9)
    t = tucker.Tucker(w.reshape(6, 8, 6, 10), [0, 1, 2, 3])
    warm = t.hosvd([2, 2, 2, 2])
    grown = t.extend(warm, {0: 4, 1: 5, 2: 2, 3: 7})
    for k, factor in grown.items():
        np.testing.assert_allclose(factor.T @ factor, np.eye(factor.shape[1]), atol=1e-10)
        np.testing.assert_allclose(np.abs(factor[:, :2].T @ warm[k]), np.eye(2), atol=1e-10)  # kept
        a = tucker.unfold(t.tensor, k)
        residual = a - warm[k] @ (warm[k].T @ a)
        lead = np.linalg.svd(residual, full_matrices=False)[0][:, :factor.shape[1] - 2]
        np.testing.assert_allclose(np.linalg.svd(factor[:, 2:].T @ lead)[1], 1.0, atol=1e-8)  # same span


@pytest.mark.parametrize("tol", [0.02, 0.1, 0.3, 0.7])
def test_tolerance_is_guaranteed(tol):
    w = _decaying(96, 128, seed=6)
    fact = tucker.fit_dense(w, RankSpec(tol=tol))
    assert fact.relative_error(w) <= tol + 1e-12
    assert fact.params() < w.size or tol < 0.3  # this spectrum needs full Tucker ranks below 0.3
    # never more parameters than the per-mode rule delta = eps ||W|| / sqrt(D)
    t = tucker.Tucker(w.reshape(fact.modes[0] + fact.modes[1]), [0, 1, 2, 3])
    delta = tol * np.linalg.norm(w) / 2
    uniform = [tucker.truncation_rank(s, delta=delta) for _, s in t.svds]
    dims = fact.modes[0] + fact.modes[1]
    assert fact.params() <= math.prod(uniform) + sum(d * r for d, r in zip(dims, uniform) if r < d)


@pytest.mark.parametrize("ratio", [2, 5, 10, 40])
def test_ratio_reached_with_the_largest_ranks(ratio):
    w = randn(256, 384, seed=7).astype(np.float64)
    fact = tucker.fit_dense(w, RankSpec(ratio=ratio))
    budget = w.size / ratio
    assert fact.params() <= budget
    dims = fact.modes[0] + fact.modes[1]

    def params(ranks):
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks) if r < d)

    for k, (r, d) in enumerate(zip(fact.ranks, dims)):  # no single mode can grow within the budget
        assert r == d or params(fact.ranks[:k] + (r + 1,) + fact.ranks[k + 1:]) > budget


def test_default_order_is_two_and_order_overrides_it():
    w = randn(384, 256, seed=8).astype(np.float64)
    assert tucker.fit_dense(w, RankSpec(rank=2)).modes == ((16, 24), (16, 16))
    fact = tucker.fit_dense(w, RankSpec(rank=2), order=3)
    assert fact.modes == ((6, 8, 8), (4, 8, 8)) and len(fact.ranks) == 6


def test_ratio_out_of_reach_is_not_applicable():
    from tnonnx.errors import NotApplicable

    with pytest.raises(NotApplicable, match="out of reach"):
        tucker.fit_conv(randn(16, 8, 3, 3, seed=9).astype(np.float64), RankSpec(ratio=40))  # 9 + 16 + 8 > 1152/40


def test_vbmf_ranks_dense():
    rng = np.random.default_rng(8)
    t = rng.standard_normal((3, 4, 3, 5))
    for k, d in enumerate((12, 16, 12, 20)):
        t = np.moveaxis(np.tensordot(rng.standard_normal((d, t.shape[k])), np.moveaxis(t, k, 0), axes=1), 0, k)
    w = t.reshape(192, 240)
    w += 0.01 * np.linalg.norm(w) / math.sqrt(w.size) * rng.standard_normal(w.shape)
    fact = tucker.fit_dense(w, RankSpec(rank="vbmf"), modes=((12, 16), (12, 20)))
    assert fact.ranks == (3, 4, 3, 5)


def _emit_alone(model, spec, emit="matmul"):
    return emit_alone(model, tucker, spec, emit)


@pytest.mark.parametrize("emit", ["matmul", "einsum"])
@pytest.mark.parametrize("spec", [RankSpec(rank=1), RankSpec(rank=3), RankSpec(ratio=3)])
def test_dense_onnx_equals_torch_and_counts(emit, spec):
    model = single_layer_model((48, 60), {}, 9)
    new, fact, _ = _emit_alone(model, spec, emit)
    x = randn(3, 5, 48, seed=10)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(fact.apply(x64), x64 @ fact.to_dense(), rtol=1e-9, atol=1e-9)
    cost = macs.count(new, {"x": (3, 5, 48)})
    assert cost.params == fact.params()
    assert cost.total == fact.macs(rows=15)


# ------------------------------------------------------------------ conv (Tucker-2)

CONV_CASES = [
    ((16, 8, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((32, 24, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]}),
    ((20, 18, 5), {"strides": [2], "pads": [2, 2]}),
    ((8, 6, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    ((24, 16, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
]


@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_exact_at_full_rank(kshape, attrs):
    k = randn(*kshape, seed=11).astype(np.float64)
    fact = tucker.fit_conv(k, FULL)
    assert fact.relative_error(k) < 1e-12
    assert len(fact.stages) == 1 and fact.params() == k.size  # the layer is its own core


@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_onnx_equals_torch_and_counts(kshape, attrs):
    model = single_layer_model(kshape, attrs, 12)
    new, fact, layer = _emit_alone(model, RankSpec(rank=4))
    spatial = (9,) * (len(kshape) - 2)
    x = randn(2, kshape[1], *spatial, seed=13)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module(layer.geometry, layer.bias)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=2e-6 * np.abs(y).max())  # float32 sums of 162 terms
    (y_ref,) = run(model, {"x": x})
    assert y.shape == y_ref.shape
    cost = macs.count(new, {"x": x.shape})
    geometry = ConvGeometry(layer.geometry.kernel, layer.geometry.attrs, spatial, tuple(y.shape[2:]))
    assert cost.total == 2 * fact.macs(geometry)
    assert cost.params == fact.params() + kshape[0]
    t, s, k = kshape[0], kshape[1], math.prod(kshape[2:])
    assert fact.ranks == (4, 4) and len(fact.stages) == 3
    assert fact.params() == s * 4 + 4 * 4 * k + 4 * t  # S R_in + R_in R_out k + R_out T


def test_conv_rules():
    k = randn(32, 24, 3, 3, seed=14).astype(np.float64)
    errors = {r: tucker.fit_conv(k, RankSpec(rank=r)).relative_error(k) for r in range(1, 25)}
    for r in range(2, 25):
        assert all(errors[r] <= errors[rung] + 1e-12 for rung in tucker.ladder(r)[:-1]), errors
    for ratio in (2, 4, 10):
        fact = tucker.fit_conv(k, RankSpec(ratio=ratio))
        assert k.size / fact.params() >= ratio
    for tol in (0.1, 0.5):
        fact = tucker.fit_conv(k, RankSpec(tol=tol))
        assert fact.relative_error(k) <= tol + 1e-12
        t2 = tucker.Tucker(k, [0, 1])
        (u0, s0), (u1, s1) = t2.svds
        r_out, r_in = fact.ranks
        assert np.sum(s0[r_out:] ** 2) + np.sum(s1[r_in:] ** 2) <= (tol * np.linalg.norm(k)) ** 2 + 1e-12


def test_conv_ratio_finds_channel_svd_when_the_kernel_is_channel_low_rank():
    from tnonnx.formats import svd

    rng = np.random.default_rng(23)
    k = (rng.standard_normal((64, 16)) @ rng.standard_normal((16, 32 * 9))).reshape(64, 32, 3, 3)
    k += 0.1 * np.linalg.norm(k) / math.sqrt(k.size) * rng.standard_normal(k.shape)
    fact = tucker.fit_conv(k, RankSpec(ratio=2))
    assert fact.ranks[1] == 32 and len(fact.stages) == 2  # the input mode kept whole: no 1x1 stage
    assert fact.relative_error(k) <= svd.fit_conv(k, RankSpec(ratio=2)).relative_error(k) + 1e-9


def test_conv_one_channel_mode_at_full_size_drops_its_stage():
    rng = np.random.default_rng(15)
    k = np.einsum("tsij,sa->taij", rng.standard_normal((16, 3, 3, 3)), rng.standard_normal((3, 12)))  # S=12, rank 3
    fact = tucker.fit_conv(k, FULL)
    assert fact.ranks == (16, 3) and len(fact.stages) == 2 and fact.relative_error(k) < 1e-12


def test_conv_vbmf_ranks():
    rng = np.random.default_rng(16)
    core = rng.standard_normal((5, 4, 3, 3))
    k = np.einsum("abij,ta,sb->tsij", core, rng.standard_normal((32, 5)), rng.standard_normal((24, 4)))
    k += 0.01 * np.linalg.norm(k) / math.sqrt(k.size) * rng.standard_normal(k.shape)
    fact = tucker.fit_conv(k, RankSpec(rank="vbmf"))
    assert fact.ranks == (5, 4) and fact.relative_error(k) < 0.02


# ------------------------------------------------------------------ end to end


def test_rewrite_end_to_end(monkeypatch):
    monkeypatch.setitem(FORMATS, tucker.NAME, tucker)
    nodes = [
        helper.make_node("Conv", ["x", "K", "KB"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "W1"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="gemm", transB=1),
    ]
    inits = [init("K", randn(16, 8, 3, 3, seed=17)), init("KB", randn(16, seed=18)),
             init("W1", randn(64, 40, seed=19)), init("W2", randn(24, 40, seed=20)), init("B2", randn(24, seed=21))]
    model = make_model(nodes, [value("x", ["b", 8, 4, 4])], [value("y", ["b", 24])], inits)
    x = randn(2, 8, 4, 4, seed=22)
    (ref,) = run(model, {"x": x})
    new, report = tnonnx.rewrite(model, format="tucker", rank=10**6, force=True, validate=False)
    assert rel_err(ref, run(new, {"x": x})[0]) < 1e-5
    new, report = tnonnx.rewrite(model, format="tucker", rank=3, validate=False)
    rows = [r for r in report.rows if r.format == "tucker"]
    assert len(rows) == 3 and all(max(r.ranks) <= 3 for r in rows)
    assert report.totals.params_after < report.totals.params_before
