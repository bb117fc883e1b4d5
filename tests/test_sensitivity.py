"""The budget allocator's sensitivity pass (sensitivity.layer_sensitivity): its fast path, one session
whose MatMul weights are overridable inputs, must measure what the partial model with the
layer's factorised subgraph measures."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.onnx_builders import init, make_model, randn, value
from tnonnx import sensitivity
from tnonnx.formats import RankSpec
from tnonnx.graph import find_layers
from tnonnx.plan import Fitter, LayerPlan


def _mlp(shared: bool = False) -> onnx.ModelProto:
    w1, w2, w3 = randn(16, 32, seed=1), randn(32, 32, seed=2), randn(32, 8, seed=3)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"]), helper.make_node("Tanh", ["h2"], ["a2"]),
             helper.make_node("MatMul", ["a2", "w2" if shared else "w2b"], ["h3"]),
             helper.make_node("Relu", ["h3"], ["a3"]), helper.make_node("MatMul", ["a3", "w3"], ["y"])]
    inits = [init("w1", w1), init("w2", w2), init("w3", w3)] + ([] if shared else [init("w2b", w2 * 0.5)])
    return make_model(nodes, [value("x", ["N", 16])], [value("y", ["N", 8])], inits)


def _batches():
    return [{"x": randn(8, 16, seed=10 + i)} for i in range(3)]


def _slow_path(model, fitter, emit="matmul"):
    """The same measure with the fast path switched off."""
    original = sensitivity.OverridableWeights.takes
    sensitivity.OverridableWeights.takes = lambda self, layer, fact: False
    try:
        return sensitivity.layer_sensitivity(model, model, fitter, _batches(), emit)
    finally:
        sensitivity.OverridableWeights.takes = original


def test_fast_path_measures_what_the_partial_model_measures():
    model = _mlp()
    fitter = Fitter()
    fast, slow = sensitivity.layer_sensitivity(model, model, fitter, _batches(), "matmul"), _slow_path(model, fitter)
    layers = [l for l in find_layers(model) if l.reason is None]
    assert len(layers) == 4
    for layer in layers:
        plan = LayerPlan(layer, "svd", RankSpec(rank=3))
        assert sensitivity.OverridableWeights(model).takes(layer, fitter.fit(layer, "svd", RankSpec(rank=3), final=False))
        a, b = fast(plan, "svd", RankSpec(rank=3)), slow(plan, "svd", RankSpec(rank=3))
        assert a > 0 and np.isclose(a, b, rtol=1e-3), (layer.name, a, b)


@pytest.mark.filterwarnings("ignore:--format ntt needs calibration")
def test_shared_and_nonlinear_weights_take_the_partial_model():
    model = _mlp(shared=True)
    fitter = Fitter()
    overridable = sensitivity.OverridableWeights(model)
    by_weight = {l.node.input[1]: l for l in find_layers(model) if l.reason is None}
    spec = RankSpec(rank=3)
    assert not overridable.takes(by_weight["w2"], fitter.fit(by_weight["w2"], "svd", spec, final=False))
    assert overridable.takes(by_weight["w1"], fitter.fit(by_weight["w1"], "svd", spec, final=False))
    ntt = fitter.fit(by_weight["w1"], "ntt", RankSpec(rank=2), final=False)
    assert not getattr(ntt, "linear", True) and not overridable.takes(by_weight["w1"], ntt)


def test_the_subset_is_spread_over_the_batches():
    """A reader sorted by length must not give the sensitivity pass its shortest inputs only."""
    batches = [{"x": np.zeros((8, 4), np.float32) + i} for i in range(16)]
    picked = sensitivity.spread(batches, 32)
    assert [int(b["x"][0, 0]) for b in picked] == [0, 4, 8, 12]
    assert sensitivity.spread(batches[:3], 32) == batches[:3]
