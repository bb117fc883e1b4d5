"""A rewrite opens each model once: one probe of the original for the timing models' shapes
and both MAC counts, the timing's sessions reused by the validation, sizes and checks
without serialising the weights."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import tnonnx
from tnonnx import calibrate, macs, runtime
from tnonnx import model as model_io
from tnonnx.graph import find_layers
from tnonnx.latency import Deployment, OrtTimer
from tnonnx.layer_timing import layer_feeds

SHAPES = {"ids": (2, 10)}


def _const(name, v):
    return h.make_node("Constant", [], [name], value=nh.from_array(np.array(v, np.int64)))


def position_model() -> onnx.ModelProto:
    """Position embeddings sliced by the input's length (as exported transformers do): onnx's
    inference loses the sequence length there, so the MatMuls after it need a run."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Shape", ["ids"], ["s"]), _const("one", [1]), _const("two", [2]), _const("zero", [0]),
             h.make_node("Slice", ["s", "one", "two", "zero"], ["len"]),
             h.make_node("Slice", ["buf", "zero", "len", "one"], ["pos"]),
             h.make_node("Gather", ["ptable", "pos"], ["p"]),
             h.make_node("MatMul", ["p", "w1"], ["h"], name="fc1"), h.make_node("Relu", ["h"], ["r"]),
             h.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    inits = [nh.from_array(np.arange(16, dtype=np.int64)[None], "buf"),
             nh.from_array(rng.standard_normal((16, 64)).astype(np.float32), "ptable"),
             nh.from_array(rng.standard_normal((64, 256)).astype(np.float32), "w1"),
             nh.from_array(rng.standard_normal((256, 64)).astype(np.float32), "w2")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", T.INT64, ["N", "L"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", "L", 64])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 14)], ir_version=8)


@pytest.fixture
def sessions_opened(monkeypatch):
    opened = []
    real = runtime.session

    def spy(model, **kwargs):
        opened.append(model)
        return real(model, **kwargs)

    monkeypatch.setattr(runtime, "session", spy)
    return opened


def test_one_probe_gives_layer_shapes_and_both_mac_counts(sessions_opened):
    m = position_model()
    layers = find_layers(m)
    sessions_opened.clear()
    shapes = macs.TensorShapes(m, SHAPES, extra=[layer.x for layer in layers])
    assert len(sessions_opened) == 1  # fc1's and fc2's inputs and outputs, exposed together
    feeds = layer_feeds(m, layers, Deployment.of(1, SHAPES), shapes)
    # the position embeddings broadcast over the batch: their rows are (1, L)
    assert {k: v["x"].shape for k, v in feeds.items() if k.startswith("fc")} == {"fc1": (1, 10, 64),
                                                                                 "fc2": (1, 10, 256)}
    assert layer_feeds(m, layers, Deployment.of(1, SHAPES)).keys() == feeds.keys()  # its own probe, same answer
    sessions_opened.clear()
    cost = macs.count(m, SHAPES, shapes)
    assert not sessions_opened and cost.unknown == []
    assert cost.per_node == macs.count(m, SHAPES).per_node and cost.total == 10 * 64 * 256 * 2

    new, _ = tnonnx.rewrite(m, format="svd", rank=4, shapes=SHAPES, validate=False, timing=False)
    sessions_opened.clear()
    after = macs.count(new, SHAPES, shapes)  # the rewritten model: the original's shapes seed inference
    assert not sessions_opened and after.unknown == []
    alone = macs.count(new, SHAPES)
    assert sessions_opened and after.per_node == alone.per_node and after.total == alone.total > 0


def test_the_validation_runs_on_the_timing_sessions(sessions_opened):
    m = position_model()
    timer = OrtTimer(warmup=1, min_rounds=1, max_rounds=1, round_ms=0.01, budget_s=0.0)
    new, report = tnonnx.rewrite(m, format="svd", rank=64, force=True, shapes=SHAPES, timer=timer,
                                 timing_cache=False)
    assert report.validation.ok and report.totals.ms_before and report.totals.ms_after
    names = [n.name for n in m.graph.node]
    whole = [s for s in sessions_opened
             if s is new or ([n.name for n in s.graph.node] == names and len(s.graph.output) == 1)]
    assert len(whole) == 2  # original and rewritten: each opened once, for timing and validation both
    probes = [s for s in sessions_opened if len(s.graph.output) > 1]
    assert len(probes) == 1


def test_inline_bytes_is_the_serialised_length():
    rng = np.random.default_rng(0)
    big = nh.from_array(rng.standard_normal((300, 300)).astype(np.float32), "big")  # 360 kB: sized apart
    huge = nh.from_array(rng.standard_normal((1100, 1000)).astype(np.float32), "huge")  # 4-byte length varint
    small = nh.from_array(rng.standard_normal((3, 4)).astype(np.float32), "small")
    typed = h.make_tensor("typed", T.FLOAT, [20000], rng.standard_normal(20000).tolist())  # float_data
    body = h.make_graph([h.make_node("Identity", ["big"], ["b"])], "body", [], [h.make_tensor_value_info("b", T.FLOAT, None)])
    nodes = [h.make_node("If", ["c"], ["o"], then_branch=body, else_branch=body)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("c", T.BOOL, [])],
                     [h.make_tensor_value_info("o", T.FLOAT, None)], [big, huge, small, typed])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], producer_name="x" * 200)
    m.metadata_props.add(key="k", value="v")
    assert model_io.inline_bytes(m) == len(m.SerializeToString()) == m.ByteSize()
    assert model_io.nbytes(m) == m.ByteSize()
    empty = onnx.ModelProto(ir_version=8)
    assert model_io.inline_bytes(empty) == len(empty.SerializeToString())


def test_skeleton_is_checked_and_inferred_like_the_model():
    m = position_model()
    for dims in (True, False):
        s = model_io.skeleton(m, dims=dims)
        assert s.ByteSize() < 2000 < m.ByteSize()
    onnx.checker.check_model(model_io.skeleton(m, dims=False))
    broken = onnx.ModelProto()
    broken.CopyFrom(m)
    broken.graph.node[-1].input[1] = "nowhere"  # the checker still sees the graph
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model_io.skeleton(broken, dims=False))
    concrete = macs._with_inputs(m, SHAPES, strip=False)

    def inferred(model):
        out = onnx.shape_inference.infer_shapes(model, data_prop=True)
        return {vi.name: str(vi.type) for vi in out.graph.value_info}
    assert inferred(model_io.skeleton(concrete)) == inferred(concrete)
    assert m.SerializeToString() == position_model().SerializeToString()  # the model is not touched
    assert calibrate.concrete_shapes(m, 2, {"ids": (2, 10)}) == {"ids": (2, 10)}
