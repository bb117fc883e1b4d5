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


@pytest.mark.parametrize("name,precision", [("transformer_block", "fp32"), ("transformer_block", "bf16")])
def test_blockwise_never_raises_a_blocks_calibration_error(exported, name, precision, monkeypatch):
    """(small_resnet: the same, four times slower.) bf16 steps are judged in float32 too."""
    monkeypatch.setattr(blockwise, "BLOCK_MIN_STEPS", 10)  # a few steps show the rule; the default trains more
    path = exported(name)
    original = tnonnx.model.load(path)
    aware, _ = tnonnx.rewrite(path, format="svd", rank=4, fit="aware", calib=16, validate=False, timing=False)
    trainable = {t.name for t in aware.graph.initializer} - {t.name for t in original.graph.initializer}
    assert len(blockwise.blocks(aware, trainable)) >= 2
    batches, _ = calibrate.feed_batches(16, original)
    errors = blockwise.refine_blocks(aware, original, batches, trainable, epochs=2, precision=precision)
    assert len(errors) >= 2
    assert all(after <= before for before, after in errors)
    assert any(after < 0.99 * before for before, after in errors)  # the training does something
    held = calibrate.random_batches(original, 8, 8, seed=5)
    ref, got = (next(iter(run(m, held).values())) for m in (original, aware))
    assert np.isfinite(got).all() and got.shape == ref.shape


def test_fit_blockwise_reports_its_blocks(exported, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_MIN_STEPS", 10)
    _, report = tnonnx.rewrite(exported("transformer_block"), format="svd", rank=4, fit="blockwise", calib=16,
                               validate=False, timing=False)
    assert any(n.startswith("blockwise: 2 block(s) refined") for n in report.notes)


def test_runner_keeps_only_live_tensors_and_computes_what_onnxruntime_does(exported):
    import onnxruntime as ort
    import torch

    from tnonnx import runtime

    model = tnonnx.model.load(exported("small_resnet"))
    batches = calibrate.random_batches(model, 4, 2, seed=1)
    runner = blockwise._Runner(model)
    for f in batches:
        runner.add(f)
    cut = blockwise.boundaries(model)[1]  # after the second residual addition
    with torch.no_grad():
        runner.advance(range(cut + 1))
    later = {x for n in model.graph.node[cut + 1:] for x in n.input}
    assert runner.done == cut + 1 and set(runner.envs[0]) <= later  # nothing kept that no later node reads
    name = model.graph.node[cut].output[0]
    exposed, _ = runtime.with_outputs(model, [name])
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    for f, env in zip(batches, runner.envs):
        np.testing.assert_allclose(env[name].numpy(), sess.run([name], f)[0], rtol=1e-4, atol=1e-4)
    convs = [i for i in range(cut + 1) if model.graph.node[i].op_type == "Conv"]
    assert {model.graph.node[i].input[1] for i in convs} <= blockwise.block_weights(model, list(range(cut + 1)))


def test_a_block_is_judged_on_what_its_weights_reach_not_on_a_mask_it_also_leaves():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["mask"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-3.4e38]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "mask")],
                              [helper.make_tensor("w", TensorProto.FLOAT, [3, 3], [0.0] * 9)])
    reached = blockwise._reached(helper.make_model(graph), {"w"})
    assert "y" in reached and "mask" not in reached  # a shape carries no value of the weights
