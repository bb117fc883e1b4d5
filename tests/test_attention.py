"""Query and key projections fitted for the attention logits they make (tnonnx/attention.py)."""

import numpy as np
import onnx
import pytest

import tnonnx
from tnonnx import activations, calibrate, macs
from tnonnx import fit as fitting
from tnonnx.attention import logit_partners
from tnonnx.formats import FORMATS, RankSpec
from tnonnx.graph import Layer, find_layers


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    from models.export import export

    return onnx.load(export("transformer_block", tmp_path_factory.mktemp("block") / "block.onnx"))


def test_the_query_and_key_projections_are_found_with_their_heads(block):
    shapes = macs.TensorShapes(block, calibrate.concrete_shapes(block, 2, None))
    partners = logit_partners(block.graph, find_layers(block), shapes)
    # the value, output and FFN projections have no logits to fit for
    assert partners == {"/q_proj/MatMul": ("/k_proj/MatMul", 4), "/k_proj/MatMul": ("/q_proj/MatMul", 4)}


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, m = 32, 24
    x = rng.standard_normal((400, n)) @ (rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 6.0))
    w = rng.standard_normal((n, m))
    mix = rng.standard_normal((m, m)) * np.exp(-np.arange(m) / 3.0)  # keys keep to few directions
    layer = Layer("mm", "MatMul", None, None, kind="dense", weight=w, weight_key="mm")

    def data(weighed: bool) -> fitting.LayerData:
        d = fitting.layer_data(layer, activations.Capture(x.T @ x, x.shape[0]))
        if weighed:
            d.weigh_outputs(mix @ mix.T)
        return d

    def weighed_error(kernel):  # ||X (K - W) C|| / ||X W C||, C C^T = mix mix^T
        return np.linalg.norm(x @ (kernel - w) @ mix) / np.linalg.norm(x @ w @ mix)

    return w, data, weighed_error


def test_the_weighed_svd_fit_is_exact_at_full_rank_and_wins_in_its_metric():
    w, data, weighed_error = _problem()
    weighed, plain = data(True), data(False)
    full = FORMATS["svd"].fit_dense(w, RankSpec(rank=10**6), data=weighed)
    np.testing.assert_allclose(full.to_dense(), w, rtol=1e-6, atol=1e-8)
    fact = FORMATS["svd"].fit_dense(w, RankSpec(rank=6), data=weighed)
    unweighed = FORMATS["svd"].fit_dense(w, RankSpec(rank=6), data=plain)
    assert fact.ranks == unweighed.ranks == (6,)
    # the error LayerData reports is the weighed one, and the weighed fit is the better there
    assert weighed.output_error(fact) == pytest.approx(weighed_error(fact.to_dense()), rel=1e-3)
    assert weighed_error(fact.to_dense()) < 0.9 * weighed_error(unweighed.to_dense())


def test_a_refined_chain_minimises_the_weighed_error():
    w, data, weighed_error = _problem(seed=1)
    weighed = data(True)
    fact = FORMATS["tt"].fit_dense(w, RankSpec(rank=3), modes=((4, 8), (4, 6)))
    start = weighed_error(fact.to_dense())
    before, after = fitting.refine(fact, weighed)
    assert before == pytest.approx(start, rel=1e-3)
    assert after < before and after == pytest.approx(weighed_error(fact.to_dense()), rel=1e-3)


def test_rewrite_weighs_the_pair_and_says_so(block):
    _, report = tnonnx.rewrite(block, format="svd", budget="2x", ops="MatMul", fit="aware", calib=16,
                               timing=False, validate=False, workers=1)
    assert any(n.startswith("attention: 2 query/key projection(s)") for n in report.notes)
    _, plain = tnonnx.rewrite(block, format="svd", budget="2x", ops="MatMul", timing=False, validate=False,
                              workers=1)
    assert not any(n.startswith("attention:") for n in plain.notes)  # data-free: no moments to weigh by
