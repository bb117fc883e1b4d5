"""Data-aware fitting of ConvTranspose layers: the patches each output position reads
(tnonnx/patches.py) reproduce onnxruntime's ConvTranspose, and `--fit aware` fitted to the
layer's input statistics beats the data-free fit on new inputs of the same kind."""

import numpy as np
import pytest
from onnx import helper
from onnx_builders import init, make_model, randn, run, value

from tnonnx import api
from tnonnx.fit import conv_apply
from tnonnx.formats.base import flip_kernel
from tnonnx.graph import find_layers

CASES = {  # input shape, ConvTranspose weight (in, out, k...), attributes
    "1d": ((2, 5, 9), (5, 3, 3), dict(strides=[2], pads=[1, 0], output_padding=[1], dilations=[2])),
    "2d": ((2, 4, 5, 6), (4, 3, 3, 2), dict(strides=[2, 3], pads=[1, 0, 2, 1], output_padding=[1, 2])),
    "2d-plain": ((1, 3, 4, 4), (3, 2, 2, 2), dict(strides=[2, 2])),
    "3d": ((1, 2, 3, 4, 3), (2, 3, 2, 2, 3), dict(strides=[1, 2, 1], dilations=[1, 1, 2], pads=[0, 1, 2, 0, 0, 1])),
}


def _single(x_shape, w_shape, attrs, weight):
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", **attrs)
    out = value("y", [x_shape[0], weight.shape[1]] + [None] * (len(x_shape) - 2))
    return make_model([node], [value("x", list(x_shape))], [out], [init("W", weight)])


@pytest.mark.parametrize("case", list(CASES))
def test_patches_reproduce_conv_transpose(case):
    x_shape, w_shape, attrs = CASES[case]
    weight, x = randn(*w_shape, seed=1), randn(*x_shape, seed=2)
    model = _single(x_shape, w_shape, attrs, weight)
    layer = find_layers(model)[0]
    canonical = flip_kernel(weight)  # the layer's Conv-layout kernel (out, in, k...)
    got = conv_apply(x, canonical.reshape(canonical.shape[0], -1).T.astype(np.float64), layer.geometry)
    want = run(model, {"x": x})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _correlated(n, seed, channels=16, size=6):
    """Inputs whose 16 channels mix 3 smooth sources: most channel directions carry nothing."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(100).standard_normal((channels, 3))
    sources = rng.standard_normal((n, 3, size, size))
    return np.einsum("cs,bshw->bchw", mix, sources).astype(np.float32)


def test_aware_fit_lowers_the_output_error_on_new_inputs():
    weight = randn(16, 12, 3, 3, seed=5)
    attrs = dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    model = _single(["b", 16, 6, 6], None, attrs, weight)
    calib, test = {"x": _correlated(48, seed=1)}, {"x": _correlated(16, seed=2)}
    want = run(model, test)[0]
    errors = {}
    for fmt in ("svd", "tucker"):
        for fit in ("data-free", "aware"):
            kwargs = dict(calib=calib) if fit == "aware" else {}
            new, report = api.rewrite(model, format=fmt, rank=3, fit=fit, validate=False, timing=False, **kwargs)
            row = report.rows[0]
            assert row.format == fmt
            if fit == "aware":
                assert row.output_error is not None
            got = run(new, test)[0]
            errors[fmt, fit] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    # the inputs span 3 of 16 channel directions (27 of 144 patch directions): the aware
    # fit spends its rank on those (measured: svd 0.819 -> 0.692, tucker 0.922 -> 0.726)
    assert errors["svd", "aware"] < 0.9 * errors["svd", "data-free"], errors
    assert errors["tucker", "aware"] < 0.9 * errors["tucker", "data-free"], errors
