"""Whole-model --budget allocation and --format auto."""

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import tnonnx
from tnonnx import macs

from onnx_builders import init, make_model, randn, value

ROOT = Path(__file__).resolve().parents[1]
LENET, FASHION = ROOT / "models" / "lenet5_fashion.onnx", ROOT / "models" / "fashion_test.npz"


@pytest.mark.parametrize("fmt", ["svd", "tt"])
def test_budget_meets_the_target_and_beats_a_uniform_ratio_on_lenet(fmt):
    # the allocator's quality on errors alone (the never-slower rule is tested in test_latency.py)
    small, report = tnonnx.rewrite(LENET, format=fmt, budget=2, inputs=FASHION, allow_slower=True)
    uniform, uniform_report = tnonnx.rewrite(LENET, format=fmt, ratio=2, inputs=FASHION)
    selected_before = sum(r.params_before for r in report.rows if r.reason is None or r.format or "budget" in r.reason)
    selected_after = sum(r.params_after if r.format else r.params_before for r in report.rows
                         if r.reason is None or r.format or "budget" in r.reason)
    assert selected_before / selected_after >= 2
    assert macs.parameters(small)[0] == report.totals.params_after
    assert report.validation.accuracy_test >= uniform_report.validation.accuracy_test
    kept = [r for r in report.rows if r.reason == "kept dense by the --budget allocator"]
    assert all(r.params_before < max(x.params_before for x in report.rows) for r in kept)


def test_budget_gives_up_more_in_large_insensitive_layers():
    rng = np.random.default_rng(0)
    # a large layer that is nearly rank 8, a small one that is full rank
    big = (rng.standard_normal((256, 8)) @ rng.standard_normal((8, 256)) + 0.01 * rng.standard_normal((256, 256)))
    small = rng.standard_normal((32, 32))
    nodes = [helper.make_node("MatMul", ["x", "B"], ["h"], name="big"),
             helper.make_node("MatMul", ["h", "S0"], ["y0"], name="proj"),
             helper.make_node("MatMul", ["y0", "S"], ["y"], name="small")]
    m = make_model(nodes, [value("x", [2, 256])], [value("y", [2, 32])],
                   [init("B", big.astype(np.float32)), init("S0", randn(256, 32, seed=1)),
                    init("S", small.astype(np.float32))])
    _, report = tnonnx.rewrite(m, format="svd", budget=6, validate=False, include="big|small")
    rows = {r.name: r for r in report.rows}
    assert rows["big"].format == "svd" and rows["big"].params_before / rows["big"].params_after > 4
    assert rows["small"].format is None  # full rank: too sensitive for what it would save


def test_unreachable_budget_is_a_clear_error():
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), ],
                   [value("x", [2, 16])], [value("y", [2, 16])], [init("W", randn(16, 16, seed=2))])
    with pytest.raises(tnonnx.TnonnxError, match="budget"):
        tnonnx.rewrite(m, format="svd", budget=100, validate=False)


def test_budget_excludes_other_rank_rules():
    with pytest.raises(tnonnx.TnonnxError, match="one of"):
        tnonnx.rewrite(LENET, format="svd", budget=2, rank=4)


def test_auto_picks_the_lowest_error_format_per_layer():
    _, auto = tnonnx.rewrite(LENET, format="auto", ratio=3, validate=False)
    for fmt in ("svd", "tt"):
        _, single = tnonnx.rewrite(LENET, format=fmt, ratio=3, validate=False)
        by_name = {r.name: r for r in single.rows}
        for row in auto.rewritten:
            if by_name[row.name].format:
                assert row.weight_error <= by_name[row.name].weight_error + 1e-12


def test_rank_vbmf_for_the_formats_that_support_it():
    _, report = tnonnx.rewrite(LENET, format="svd", rank="vbmf", validate=False)
    assert report.rewritten and all(r.ranks[0] >= 1 for r in report.rewritten)
    with pytest.raises(tnonnx.TnonnxError, match="vbmf"):
        tnonnx.rewrite(LENET, format="tt", rank="vbmf", validate=False)
