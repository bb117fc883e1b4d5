"""CP (tnonnx.formats.cp): recovered to round-off at the rank a tensor is built with, exact
at the slice bound, error non-increasing along ranks, --tol met or NotApplicable, --ratio
reached, CP-4 and CP-3 convs, torch == numpy == ONNX, counted params/MACs == the graph's,
and an end-to-end rewrite through onnxruntime."""

import math

import numpy as np
import pytest
import torch
from onnx import helper

import tnonnx
from tnonnx import macs
from tnonnx.errors import NotApplicable, TnonnxError
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec, cp

from onnx_builders import emit_alone, init, make_model, randn, rel_err, run, single_layer_model, value


@pytest.fixture(autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def _built(dims, rank, seed, noise=0.0):
    rng = np.random.default_rng(seed)
    t = cp.reconstruct([rng.standard_normal((n, rank)) for n in dims])
    return t + noise * np.linalg.norm(t) / math.sqrt(t.size) * rng.standard_normal(dims)


# ------------------------------------------------------------------ numerics


def test_ladder_and_slice_bound():
    assert cp.ladder(1) == [1]
    assert cp.ladder(13) == [1, 2, 3, 4, 6, 8, 12, 13]
    assert cp.ladder(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    t = np.random.default_rng(0).standard_normal((3, 5, 4))
    assert cp.slice_bound(t.shape) == 12
    factors = cp.slice_cp(t)
    assert [f.shape for f in factors] == [(3, 12), (5, 12), (4, 12)]
    assert cp.cp_error(t, factors) < 1e-14


@pytest.mark.parametrize("dims,rank", [((6, 8, 6, 10), 7), ((4, 5, 6), 3), ((8, 8, 8, 12), 5), ((12, 9, 3, 3), 6)])
def test_als_recovers_a_tensor_built_at_its_rank(dims, rank):
    t = _built(dims, rank, seed=1)
    _, err = cp.fit_rank(t, rank)
    assert err / np.linalg.norm(t) < 1e-10
    assert cp.fit_rank(t, rank - 1)[1] / np.linalg.norm(t) > 1e-3  # and needs that rank


def test_fit_is_deterministic_and_cached():
    t = np.random.default_rng(2).standard_normal((5, 6, 7))
    a, ea = cp.fit_rank(t, 6)
    cp._CACHE.clear()
    b, eb = cp.fit_rank(t, 6)
    assert ea == eb and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_balance_keeps_the_tensor_and_equalises_norms():
    rng = np.random.default_rng(3)
    factors = [rng.standard_normal((4, 3)) * s for s in (100.0, 1.0, 0.01)]
    balanced = cp.balance(factors)
    np.testing.assert_allclose(cp.reconstruct(balanced), cp.reconstruct(factors), rtol=1e-12, atol=1e-12)
    norms = np.array([np.linalg.norm(f, axis=0) for f in balanced])
    np.testing.assert_allclose(norms, norms[:1].repeat(3, axis=0), rtol=1e-12)


# ------------------------------------------------------------------ dense


def test_dense_recovers_a_weight_built_at_its_rank():
    w = _built((4, 6, 8, 5), 5, seed=4).reshape(24, 40)  # modes (4, 6), (8, 5)
    fact = cp.fit_dense(w, RankSpec(rank=5), modes=((4, 6), (8, 5)))
    assert fact.ranks == (5,) and fact.relative_error(w) < 1e-10
    assert fact.params() == 5 * (4 + 6 + 8 + 5)


@pytest.mark.parametrize("shape", [(48, 60), (7, 30), (64, 64)])
def test_dense_huge_rank_is_exact(shape):
    w = randn(*shape, seed=5).astype(np.float64)
    fact = cp.fit_dense(w, RankSpec(rank=10**6))
    dims = fact.modes[0] + fact.modes[1]
    assert fact.ranks == (math.prod(dims) // max(dims),)
    assert fact.relative_error(w) < 1e-12


def test_dense_error_non_increasing_in_rank():
    """Guaranteed: along the ladder, and from every rank to the rungs below it."""
    w = randn(24, 40, seed=6).astype(np.float64)
    errors = {r: cp.fit_dense(w, RankSpec(rank=r)).relative_error(w) for r in range(1, 26)}
    for r in range(2, 26):
        assert all(errors[r] <= errors[rung] + 1e-12 for rung in cp.ladder(r)[:-1]), (r, errors)


def test_tolerance_met_with_the_smallest_searched_rank():
    w = _built((4, 6, 8, 5), 6, seed=7, noise=0.02).reshape(24, 40)
    fact = cp.fit_dense(w, RankSpec(tol=0.05), modes=((4, 6), (8, 5)))
    assert fact.relative_error(w) <= 0.05 and fact.ranks == (6,)
    assert cp.fit_dense(w, RankSpec(rank=5), modes=((4, 6), (8, 5))).relative_error(w) > 0.05


def test_unreachable_tolerance_is_not_applicable():
    w = randn(24, 40, seed=8).astype(np.float64)  # Gaussian: CP needs about dense size for 1%
    with pytest.raises(NotApplicable, match="not reached"):
        cp.fit_dense(w, RankSpec(tol=0.01))


@pytest.mark.parametrize("ratio", [2, 5, 10])
def test_ratio_reached_with_the_largest_rank(ratio):
    w = randn(48, 64, seed=9).astype(np.float64)
    fact = cp.fit_dense(w, RankSpec(ratio=ratio))
    per_rank = sum(fact.modes[0] + fact.modes[1])
    assert w.size / fact.params() >= ratio
    assert (fact.ranks[0] + 1) * per_rank > w.size / ratio


def test_ratio_out_of_reach_is_not_applicable():
    with pytest.raises(NotApplicable, match="out of reach"):
        cp.fit_dense(randn(6, 8, seed=9).astype(np.float64), RankSpec(ratio=5))  # rank 1: 11 of 48


def test_ratio_rank_is_capped_by_the_option():
    w = randn(48, 64, seed=9).astype(np.float64)
    assert cp.fit_dense(w, RankSpec(ratio=2), cp_max_rank=12).ranks == (12,)
    assert cp.fit_dense(w, RankSpec(rank=20), cp_max_rank=12).ranks == (20,)  # an explicit rank is obeyed


def test_l2_option_damps_degenerate_terms():
    w = randn(48, 60, seed=13).astype(np.float64)

    def spread(fact):  # ||(norm of each rank-one term)|| / ||W||
        terms = np.prod([np.linalg.norm(f, axis=0) for f in fact.cores.values()], axis=0)
        return np.linalg.norm(terms) / np.linalg.norm(w)

    plain, damped = cp.fit_dense(w, RankSpec(rank=40)), cp.fit_dense(w, RankSpec(rank=40), cp_l2=1e-2)
    assert spread(damped) < spread(plain) / 2
    assert damped.relative_error(w) < plain.relative_error(w) + 0.05


def test_vbmf_rank_for_dense():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((60, 5)) @ rng.standard_normal((5, 80)) + 0.01 * rng.standard_normal((60, 80))
    assert cp.fit_dense(w, RankSpec(rank="vbmf")).ranks == (5,)


def test_default_order_is_two_and_order_or_modes_override_it():
    w = randn(64, 96, seed=11).astype(np.float64)
    assert cp.fit_dense(w, RankSpec(rank=2)).modes == ((8, 8), (8, 12))
    assert cp.fit_dense(w, RankSpec(rank=2), order=3).modes == ((4, 4, 4), (4, 4, 6))
    assert cp.fit_dense(w, RankSpec(rank=2), modes=((2, 32), (96,))).modes == ((2, 32), (96,))


def test_size_one_modes_are_dropped():
    w = randn(7, 30, seed=11).astype(np.float64)
    fact = cp.fit_dense(w, RankSpec(rank=3), modes=((1, 7), (5, 6)))
    assert fact.modes == ((7,), (5, 6))
    x = randn(2, 7, seed=12).astype(np.float64)
    np.testing.assert_allclose(fact.apply(x), x @ fact.to_dense(), rtol=1e-10, atol=1e-10)


def _emit_alone(model, spec, emit="matmul", **options):
    return emit_alone(model, cp, spec, emit, dense_options=options, conv_options=options)


@pytest.mark.parametrize("emit", ["matmul", "einsum"])
@pytest.mark.parametrize("rank", [1, 6, 40])
def test_dense_onnx_equals_torch_and_counts(emit, rank):
    model = single_layer_model((48, 60), {}, 13)
    new, fact, _ = _emit_alone(model, RankSpec(rank=rank), emit)
    x = randn(3, 5, 48, seed=14)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module()(torch.from_numpy(x)).numpy()
    # float32 round-off grows with the terms' cancellation (ALS at rank 40 has terms ~5x the weight)
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=2e-6 * np.abs(y).max())
    np.testing.assert_allclose(fact.apply(x.astype(np.float64)), x.astype(np.float64) @ fact.to_dense(), rtol=1e-9,
                               atol=1e-9)
    cost = macs.count(new, {"x": (3, 5, 48)})
    assert cost.params == fact.params()
    assert cost.total == fact.macs(rows=15)


# ------------------------------------------------------------------ conv

CONV_CASES = [
    ((16, 8, 3, 3), {"pads": [1, 1, 1, 1]}, "cp4"),
    ((32, 24, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]}, "cp4"),
    ((24, 16, 3, 5), {"strides": [2, 1], "pads": [2, 1, 0, 3], "dilations": [2, 1]}, "cp4"),
    ((16, 12, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, "cp4"),
    ((16, 12, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, "cp3"),
    ((20, 18, 5), {"strides": [2], "pads": [2, 2]}, None),
    ((8, 6, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}, None),
]


@pytest.mark.parametrize("kshape,attrs,layout", CONV_CASES)
def test_conv_onnx_equals_torch_and_counts(kshape, attrs, layout):
    model = single_layer_model(kshape, attrs, 15)
    new, fact, layer = _emit_alone(model, RankSpec(rank=5), conv_layout=layout)
    spatial = (9,) * (len(kshape) - 2)
    x = randn(2, kshape[1], *spatial, seed=16)
    (y,) = run(new, {"x": x})
    (y_ref,) = run(model, {"x": x})
    assert y.shape == y_ref.shape
    if attrs.get("auto_pad") is None:  # the torch module takes explicit pads only
        with torch.no_grad():
            y_torch = fact.torch_module(layer.geometry, layer.bias)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    # the factorised conv computes the conv of its own dense kernel
    dense = single_layer_model(kshape, attrs, 15)
    dense.graph.initializer[0].CopyFrom(init("W", fact.to_dense().astype(np.float32)))
    np.testing.assert_allclose(y, run(dense, {"x": x})[0], rtol=1e-4, atol=1e-4)
    cost = macs.count(new, {"x": x.shape})
    geometry = ConvGeometry(layer.geometry.kernel, layer.geometry.attrs, spatial, tuple(y.shape[2:]))
    assert cost.total == 2 * fact.macs(geometry)
    assert cost.params == fact.params() + kshape[0]  # + the bias
    t, s, ks = kshape[0], kshape[1], kshape[2:]
    stages = (len(ks) == 2 and layout != "cp3") and 4 or 3
    assert len(fact.stages) == stages
    assert fact.params() == 5 * (s + t + (sum(ks) if stages == 4 else math.prod(ks)))


@pytest.mark.parametrize("layout,dims", [("cp4", (12, 10, 3, 3)), ("cp3", (12, 10, 9))])
def test_conv_recovers_a_kernel_built_at_its_rank(layout, dims):
    k = _built(dims, 4, seed=17).reshape(12, 10, 3, 3)
    fact = cp.fit_conv(k, RankSpec(rank=4), conv_layout=layout)
    assert fact.relative_error(k) < 1e-10


@pytest.mark.parametrize("kshape,layout", [((16, 8, 3, 3), "cp4"), ((16, 8, 3, 3), "cp3"), ((20, 18, 5), None),
                                           ((8, 6, 3, 3, 3), None)])
def test_conv_huge_rank_is_exact(kshape, layout):
    k = randn(*kshape, seed=18).astype(np.float64)
    assert cp.fit_conv(k, RankSpec(rank=10**6), conv_layout=layout).relative_error(k) < 1e-12


def test_conv_error_non_increasing_and_rules():
    k = randn(16, 12, 3, 3, seed=19).astype(np.float64)
    errors = [cp.fit_conv(k, RankSpec(rank=r)).relative_error(k) for r in (1, 2, 3, 4, 6, 8, 16, 32, 144)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-12
    fact = cp.fit_conv(k, RankSpec(ratio=4))
    assert k.size / fact.params() >= 4 and (fact.ranks[0] + 1) * (16 + 12 + 3 + 3) > k.size / 4
    k6 = _built((16, 12, 3, 3), 6, seed=20, noise=0.01)
    fact = cp.fit_conv(k6, RankSpec(tol=0.05))
    assert fact.relative_error(k6) <= 0.05 and fact.ranks[0] <= 6


def test_conv_layout_errors():
    with pytest.raises(NotApplicable, match="2-D"):
        cp.fit_conv(randn(8, 6, 5, seed=21).astype(np.float64), RankSpec(rank=2), conv_layout="cp4")
    with pytest.raises(TnonnxError, match="conv_layout"):
        cp.fit_conv(randn(8, 6, 3, 3, seed=21).astype(np.float64), RankSpec(rank=2), conv_layout="cp5")


def test_conv_vbmf_rank():
    rng = np.random.default_rng(22)
    core = rng.standard_normal((5, 4, 3, 3))
    k = np.einsum("abij,ta,sb->tsij", core, rng.standard_normal((32, 5)), rng.standard_normal((24, 4)))
    k += 0.01 * np.linalg.norm(k) / math.sqrt(k.size) * rng.standard_normal(k.shape)
    assert cp.fit_conv(k, RankSpec(rank="vbmf")).ranks == (5,)


# ------------------------------------------------------------------ end to end


def test_rewrite_end_to_end(monkeypatch):
    monkeypatch.setitem(FORMATS, cp.NAME, cp)
    nodes = [
        helper.make_node("Conv", ["x", "K", "KB"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "W1"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "W2", "B2"], ["y"], name="gemm", transB=1),
    ]
    inits = [init("K", randn(6, 3, 3, 3, seed=23)), init("KB", randn(6, seed=24)), init("W1", randn(96, 40, seed=25)),
             init("W2", randn(24, 40, seed=26)), init("B2", randn(24, seed=27))]
    model = make_model(nodes, [value("x", ["b", 3, 4, 4])], [value("y", ["b", 24])], inits)
    x = randn(2, 3, 4, 4, seed=28)
    (ref,) = run(model, {"x": x})
    new, report = tnonnx.rewrite(model, format="cp", rank=10**6, force=True, validate=False)
    assert {op for op in (n.op_type for n in new.graph.node)} >= {"Conv", "MatMul"}
    assert rel_err(ref, run(new, {"x": x})[0]) < 1e-5  # the exact CP at the slice bound
    new, report = tnonnx.rewrite(model, format="cp", rank=4, validate=False)
    assert all(r.ranks == [4] for r in report.rows if r.format == "cp")
    assert rel_err(ref, run(new, {"x": x})[0]) < 1.5
