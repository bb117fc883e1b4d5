"""Every format: exact at full rank, error non-increasing in rank, rank rules honoured,
torch module == numpy reference == ONNX subgraph, counted params/MACs == the graph's."""


import numpy as np
import pytest
import torch

from tnonnx import macs
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec

from onnx_builders import emit_alone, randn, run, single_layer_model

FULL = RankSpec(rank=10**6)
# formats that represent any weight; the semi-tensor ones have their own tests (test_format_stp.py)
# the linear formats that represent any weight; the nonlinear ones (ntt, ntr) have no dense
# weight to be exact against and are tested in test_format_ntt.py
UNIVERSAL = sorted(f for f, m in FORMATS.items()
                   if not getattr(m, "STRUCTURED", False) and not getattr(m, "NONLINEAR", False))
DENSE_SHAPES = [(48, 60), (64, 64), (120, 84), (7, 30)]


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_exact_at_full_rank(fmt, shape):
    w = randn(*shape, seed=1).astype(np.float64)
    fact = FORMATS[fmt].fit_dense(w, FULL)
    assert fact.relative_error(w) < 1e-12


@pytest.mark.parametrize("fmt", UNIVERSAL)
def test_dense_error_non_increasing_in_rank(fmt):
    w = randn(64, 96, seed=2).astype(np.float64)
    errors = [FORMATS[fmt].fit_dense(w, RankSpec(rank=r)).relative_error(w) for r in (1, 2, 4, 8, 16, 32, 64)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("tol", [0.05, 0.3, 0.7])
def test_tolerance_is_guaranteed(fmt, tol):
    # a weight with a decaying spectrum, so tolerances bite at different ranks
    u, _ = np.linalg.qr(randn(96, 96, seed=3).astype(np.float64))
    v, _ = np.linalg.qr(randn(128, 96, seed=4).astype(np.float64))
    w = (u * np.exp(-np.arange(96) / 10.0)) @ v.T
    fact = FORMATS[fmt].fit_dense(w, RankSpec(tol=tol))
    assert fact.relative_error(w) <= tol + 1e-12
    assert fact.params() < w.size or tol < 0.1


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("ratio", [2, 5, 10])
def test_ratio_reaches_the_requested_reduction(fmt, ratio):
    w = randn(256, 384, seed=5).astype(np.float64)
    fact = FORMATS[fmt].fit_dense(w, RankSpec(ratio=ratio))
    assert w.size / fact.params() >= ratio


def test_tt_modes_and_order_override():
    w = randn(64, 48, seed=6).astype(np.float64)
    fact = FORMATS["tt"].fit_dense(w, FULL, modes=((4, 4, 4), (3, 4, 4)))
    assert fact.modes == ((4, 4, 4), (3, 4, 4))
    assert fact.relative_error(w) < 1e-12
    assert len(FORMATS["tt"].fit_dense(w, FULL, order=3).chain.steps) == 3


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("batch_shape", [(), (3,), (2, 5)])
def test_dense_torch_module_equals_reference(fmt, batch_shape):
    w = randn(48, 60, seed=7).astype(np.float64)
    fact = FORMATS[fmt].fit_dense(w, RankSpec(rank=6))
    x = randn(*batch_shape, 48, seed=8).astype(np.float64)
    with torch.no_grad():
        y_torch = fact.torch_module().double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y_torch, fact.apply(x), rtol=1e-5, atol=1e-5)  # float32 parameters
    np.testing.assert_allclose(fact.apply(x), x @ fact.to_dense(), rtol=1e-9, atol=1e-9)


CONV_CASES = [
    ((16, 8, 3, 3), {"pads": [1, 1, 1, 1]}),
    ((32, 24, 3, 3), {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1]}),
    ((20, 18, 5), {"strides": [2], "pads": [2, 2]}),
    ((8, 6, 3, 3, 3), {"pads": [1, 1, 1, 1, 1, 1]}),
    ((24, 16, 3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
]


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_exact_at_full_rank(fmt, kshape, attrs):
    k = randn(*kshape, seed=9).astype(np.float64)
    fact = FORMATS[fmt].fit_conv(k, FULL)
    assert fact.relative_error(k) < 1e-12


@pytest.mark.parametrize("fmt", UNIVERSAL)
def test_conv_error_non_increasing_in_rank(fmt):
    k = randn(32, 24, 3, 3, seed=10).astype(np.float64)
    errors = [FORMATS[fmt].fit_conv(k, RankSpec(rank=r)).relative_error(k) for r in (1, 2, 4, 8, 16, 64, 256)]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors


def _single_layer_model(kind, shape, attrs, seed):
    return single_layer_model(shape, attrs, seed)


def _emit_alone(model, fmt, spec, emit="matmul"):
    return emit_alone(model, FORMATS[fmt], spec, emit)


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("emit", ["matmul", "einsum"])
def test_dense_onnx_equals_torch_and_counts(fmt, emit):
    model = _single_layer_model("dense", (48, 60), {}, 11)
    new, fact, layer = _emit_alone(model, fmt, RankSpec(rank=5), emit)
    x = randn(3, 5, 48, seed=12)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    cost = macs.count(new, {"x": (3, 5, 48)})
    assert cost.params == fact.params() + 0  # shape tensors are int64, not parameters
    assert cost.total == fact.macs(rows=15)


@pytest.mark.parametrize("fmt", UNIVERSAL)
@pytest.mark.parametrize("kshape,attrs", CONV_CASES)
def test_conv_onnx_equals_torch_and_counts(fmt, kshape, attrs):
    model = _single_layer_model("conv", kshape, attrs, 13)
    new, fact, layer = _emit_alone(model, fmt, RankSpec(rank=4))
    spatial = (9,) * (len(kshape) - 2)
    x = randn(2, kshape[1], *spatial, seed=14)
    (y,) = run(new, {"x": x})
    with torch.no_grad():
        y_torch = fact.torch_module(layer.geometry, layer.bias)(torch.from_numpy(x)).numpy()
    # float32 round-off grows with the output's scale
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(y).max())))
    (y_ref,) = run(model, {"x": x})
    assert y.shape == y_ref.shape
    cost = macs.count(new, {"x": x.shape})
    out_spatial = y.shape[2:]
    geometry = ConvGeometry(layer.geometry.kernel, layer.geometry.attrs, spatial, tuple(out_spatial))
    assert cost.total == 2 * fact.macs(geometry)
    assert cost.params == fact.params() + kshape[0]  # + the bias
