"""Block-wise refinement (--fit blockwise) on the exported reference networks."""

from __future__ import annotations

import numpy as np
import pytest

import tnonnx
from tnonnx import blockwise, calibrate
from tnonnx.validate import run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from models.export import export

    out = tmp_path_factory.mktemp("blockwise")
    return lambda name: export(name, out / f"{name}.onnx")


def test_block_boundaries_of_residual_and_plain_networks(exported):
    resnet = tnonnx.model.load(exported("small_resnet"))
    adds = [n for n in resnet.graph.node if n.op_type == "Add"]
    assert len(blockwise.boundaries(resnet)) == len(adds) == 6  # one per BasicBlock: the residual additions
    block = tnonnx.model.load(exported("transformer_block"))
    kinds = [block.graph.node[i].op_type for i in blockwise.boundaries(block)]
    assert kinds.count("Add") == 2  # attention and feed-forward residuals; biases are not boundaries
    mlp = tnonnx.model.load(exported("mlp"))
    assert blockwise.boundaries(mlp) == []  # a plain network is one block


@pytest.mark.parametrize("name", ["small_resnet", "transformer_block"])
def test_blockwise_never_raises_a_blocks_calibration_error(exported, name):
    path = exported(name)
    original = tnonnx.model.load(path)
    aware, _ = tnonnx.rewrite(path, format="svd", budget=3, fit="aware", calib=32, validate=False, timing=False)
    refined, report = tnonnx.rewrite(path, format="svd", budget=3, fit="blockwise", calib=32, validate=False,
                                     timing=False)
    assert any(n.startswith("blockwise:") for n in report.notes)
    trainable = {t.name for t in refined.graph.initializer} - {t.name for t in original.graph.initializer}
    runs = blockwise.blocks(refined, trainable)
    assert len(runs) >= 2
    # the refined model's blocks, fed by the refined prefix, err no more than the per-layer fit's
    batches, _ = calibrate.feed_batches(32, original)
    again = blockwise.refine_blocks(refined, original, batches, trainable, epochs=0)
    first = blockwise.refine_blocks(aware, original, batches, trainable, epochs=0)
    assert again[0][0] <= first[0][0] + 1e-6  # the first block sees the same inputs in both
    held = calibrate.random_batches(original, 16, 8, seed=5)
    ref, got = (next(iter(run(m, held).values())) for m in (original, refined))
    assert np.isfinite(got).all() and got.shape == ref.shape
