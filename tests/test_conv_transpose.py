"""ConvTranspose layers (1-D, 2-D, 3-D; strides, pads, output_padding, dilations, groups)
factorised like Conv, as 1x1 Convs around one ConvTranspose: exact at full rank through the
CLI, counted right."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper
from onnx_builders import init, randn, rel_err, run, value

from tnonnx.cli import main
from tnonnx.formats import RankSpec
from tnonnx.formats.base import flip_kernel
from tnonnx.graph import find_layers
from tnonnx.plan import Fitter

# (input shape at batch 2, ConvTranspose weight (in, out/group, k...), attributes)
CASES = {
    "up1d": ((2, 6, 11), (6, 4, 3), dict(strides=[2], pads=[1, 0], output_padding=[1], dilations=[2])),
    "up2d": ((2, 8, 5, 6), (8, 3, 3, 2), dict(strides=[2, 1], pads=[1, 0, 0, 1], output_padding=[1, 0], group=2)),
    "up3d": ((2, 4, 3, 4, 3), (4, 6, 2, 2, 3), dict(strides=[1, 2, 1], dilations=[1, 1, 2])),
}


def _model() -> onnx.ModelProto:
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (name, (x_shape, w_shape, attrs)) in enumerate(CASES.items()):
        out_channels = w_shape[1] * attrs.get("group", 1)
        nodes.append(helper.make_node("ConvTranspose", [f"x_{name}", f"W_{name}", f"B_{name}"], [f"y_{name}"],
                                      name=name, **attrs))
        inputs.append(value(f"x_{name}", ["b"] + list(x_shape[1:])))
        outputs.append(value(f"y_{name}", ["b", out_channels] + [None] * (len(x_shape) - 2)))
        inits += [init(f"W_{name}", randn(*w_shape, seed=i)), init(f"B_{name}", randn(out_channels, seed=10 + i))]
    graph = helper.make_graph(nodes, "up", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(seed: int = 3) -> dict:
    return {f"x_{name}": randn(*case[0], seed=seed + i) for i, (name, case) in enumerate(CASES.items())}


def test_kernel_flip_is_its_own_inverse_per_group():
    w = randn(8, 3, 3, 2)  # ConvTranspose layout, 2 groups: in 8, out 6
    conv = flip_kernel(w, 2)
    assert conv.shape == (6, 4, 3, 2)
    np.testing.assert_array_equal(conv[:3, :, 1, 0], w[:4, :, 1, 0].T)  # group 0's block transposed
    np.testing.assert_array_equal(flip_kernel(conv, 2), w)


def test_layers_are_candidates_in_the_nodes_layout():
    layers = {l.name: l for l in find_layers(_model())}
    assert all(l.reason is None and l.kind == "conv" and l.geometry.transposed for l in layers.values())
    assert layers["up2d"].weight_shape == (8, 3, 3, 2) and layers["up2d"].weight.shape == (6, 4, 3, 2)


@pytest.mark.parametrize("fmt", ["svd", "tucker", "tt", "cp", "ht"])
def test_full_rank_rewrite_reproduces_the_original(tmp_path, fmt):
    src, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    model = _model()
    onnx.save(model, src)
    result = CliRunner().invoke(main, ["rewrite", str(src), "--format", fmt, "--rank", "1000000", "--force",
                                       "--no-timing", "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    rows = json.loads(report.read_text())["layers"]
    assert [r["format"] for r in rows] == [fmt] * 3, [r["reason"] for r in rows]
    new = onnx.load(out)
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("ConvTranspose") == 4  # one per layer, up2d one per group
    feeds = _feeds()
    for ref, got in zip(run(model, feeds), run(new, feeds)):
        assert ref.shape == got.shape and rel_err(ref, got) < 1e-4


def test_macs_of_the_factorisation_match_the_emitted_graph(tmp_path):
    from tnonnx import api

    new, report = api.rewrite(_model(), format="tucker", rank=2, validate=False, timing=False)
    fitter = Fitter()
    for layer in find_layers(_model()):
        row = next(r for r in report.rows if r.name == layer.name)
        fact = fitter.fit(layer, "tucker", RankSpec(rank=2))
        assert row.macs_after == fact.macs(layer.geometry)  # per sample: the report is at batch 1
        assert row.macs_before == layer.params * np.prod(layer.geometry.in_spatial)


def test_forms_without_a_conv_transpose_equivalent_are_not_applicable():
    from tnonnx.errors import NotApplicable

    layer = next(l for l in find_layers(_model()) if l.name == "up2d")
    with pytest.raises(NotApplicable, match="no ConvTranspose equivalent"):  # cp4: two spatial stages
        Fitter({"conv_layout": "cp4"}).fit(layer, "cp", RankSpec(rank=3))
    with pytest.raises(NotApplicable, match="no ConvTranspose equivalent"):  # tr folds the batch
        Fitter().fit(layer, "tr", RankSpec(rank=2))


def _with_kernels_of(model, rows, fmt):
    """The original with each rewritten layer's weight replaced by its factorisation's kernel."""
    from onnx import numpy_helper

    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    for row in rows:
        layer = next(l for l in find_layers(model) if l.name == row.name)
        kernel = Fitter().fit(layer, fmt, RankSpec(rank=row.ranks[0])).to_dense()
        weight = next(t for t in swapped.graph.initializer if t.name == f"W_{row.name}")
        weight.CopyFrom(numpy_helper.from_array(flip_kernel(kernel, layer.groups).astype(np.float32), weight.name))
    return swapped


@pytest.mark.parametrize("fmt", ["svd", "tt", "cp"])
def test_low_ranks_emit_the_conv_transpose_of_their_kernel(fmt):
    """Below full rank (groups included) the emitted subgraph computes the ConvTranspose of
    the factorisation's kernel: the original with that kernel swapped in agrees."""
    from tnonnx import api

    model = _model()
    new, report = api.rewrite(model, format=fmt, rank=2, force=True, validate=False, timing=False)
    assert len(report.rewritten) == 3
    for ref, got in zip(run(_with_kernels_of(model, report.rewritten, fmt), _feeds()), run(new, _feeds())):
        assert rel_err(ref, got) < 1e-5


def test_budget_allocates_over_conv_transpose_layers():
    from tnonnx import api

    model = _model()
    new, report = api.rewrite(model, format="svd", budget=1.3, allow_slower=True, timing=False, validate=False)
    assert report.totals.params_after * 1.3 <= report.totals.params_before
    rewritten = [r for r in report.rewritten if r.op == "ConvTranspose"]
    assert rewritten
    for ref, got in zip(run(_with_kernels_of(model, rewritten, "svd"), _feeds()), run(new, _feeds())):
        assert rel_err(ref, got) < 1e-5
