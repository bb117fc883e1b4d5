import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tnonnx import calibrate, runtime
from tnonnx.errors import TnonnxError


def make_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def token_model():
    """x[batch, seq, 4] + emb[Cast(ids)] * mask, plus a Constant table gathered on axis 1."""
    emb = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "emb")
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 7], np.zeros(28, np.float32))
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["emb", "ids64"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("Add", ["x", "em"], ["y"]),
        helper.make_node("Constant", [], ["table"], value=table),
        helper.make_node("Gather", ["table", "pos"], ["t"], axis=1),
        helper.make_node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4]),
        helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("pos", TensorProto.INT64, ["batch", None]),
        helper.make_tensor_value_info("flag", TensorProto.INT64, [3]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4]),
        helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, "batch", None]),
        helper.make_tensor_value_info("f", TensorProto.FLOAT, [3]),
    ]
    return make_model(nodes, inputs, outputs, [emb, axes])


def linear_model(batch_dim="N"):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 3])],
        [w],
    )


# --- shapes ---


def test_parse_shapes():
    assert calibrate.parse_shapes(["input:1x3x224x224", "ids:2,16", "scope:0:5"]) == {
        "input": (1, 3, 224, 224),
        "ids": (2, 16),
        "scope:0": (5,),
    }
    assert calibrate.parse_shapes([]) == {}


@pytest.mark.parametrize("bad", ["input", "input:", ":1x2", "input:1xa", "input:0x3", "input:1x-3", "input:1xx3"])
def test_parse_shapes_rejects(bad):
    with pytest.raises(TnonnxError, match="--shape"):
        calibrate.parse_shapes([bad])


def test_parse_shapes_rejects_duplicates():
    with pytest.raises(TnonnxError, match="twice"):
        calibrate.parse_shapes(["x:1", "x:2"])


def test_concrete_shapes_defaults_and_overrides():
    m = token_model()
    shapes = calibrate.concrete_shapes(m, batch=2)
    free = calibrate.DEFAULT_FREE_DIM
    assert shapes == {"x": (2, free, 4), "ids": (2, free), "attention_mask": (2, free), "pos": (2, free), "flag": (3,)}
    # a symbolic name set through one input's override applies to every input using it
    shapes = calibrate.concrete_shapes(m, batch=2, shapes={"x": (3, 8, 4)})
    assert shapes["x"] == (3, 8, 4)
    assert shapes["ids"] == (3, 8) and shapes["attention_mask"] == (3, 8)
    assert shapes["pos"] == (3, free)


def test_concrete_shapes_errors():
    m = token_model()
    with pytest.raises(TnonnxError, match=r"unknown input\(s\) nope.*x, ids, attention_mask, pos, flag"):
        calibrate.concrete_shapes(m, shapes={"nope": (1,)})
    with pytest.raises(TnonnxError, match="rank 2 given, but the input has rank 3"):
        calibrate.concrete_shapes(m, shapes={"x": (1, 2)})
    with pytest.raises(TnonnxError, match="fixed shape"):
        calibrate.concrete_shapes(m, shapes={"flag": (4,)})


# --- random feeds ---


def test_random_feeds_shapes_dtypes_and_values():
    m = token_model()
    feeds = calibrate.random_feeds(m, batch=2, shapes={"x": (2, 5, 4)})
    assert {k: (v.shape, v.dtype) for k, v in feeds.items()} == {
        "x": ((2, 5, 4), np.float32),
        "ids": ((2, 5), np.int32),
        "attention_mask": ((2, 5), np.int64),
        "pos": ((2, 64), np.int64),
        "flag": ((3,), np.int64),
    }
    assert (feeds["attention_mask"] == 1).all()
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 10 and feeds["ids"].max() > 1  # through a Cast
    assert feeds["pos"].min() >= 0 and feeds["pos"].max() < 7 and feeds["pos"].max() > 1  # Constant, axis 1
    assert set(np.unique(feeds["flag"])) <= {0, 1}
    runtime.session(m).run(None, feeds)  # valid for onnxruntime as is


def test_random_feeds_deterministic():
    m = token_model()
    a, b = calibrate.random_feeds(m, seed=3), calibrate.random_feeds(m, seed=3)
    c = calibrate.random_feeds(m, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["x"], c["x"])


def test_random_feeds_other_dtypes():
    inputs = [
        helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["N", 3]),
        helper.make_tensor_value_info("d", TensorProto.DOUBLE, ["N", 3]),
        helper.make_tensor_value_info("b", TensorProto.BOOL, ["N", 3]),
    ]
    nodes = [
        helper.make_node("Cast", ["h"], ["hd"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["hd", "d"], ["s"]),
        helper.make_node("Cast", ["b"], ["bd"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", ["s", "bd"], ["y"]),
    ]
    m = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 3])])
    feeds = calibrate.random_feeds(m, batch=4)
    assert [feeds[k].dtype for k in "hdb"] == [np.float16, np.float64, np.bool_]
    assert all(v.shape == (4, 3) for v in feeds.values())
    runtime.session(m).run(None, feeds)


# --- npz ---


def test_load_npz_casts_and_keeps_extras(tmp_path):
    m = token_model()
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x=np.zeros((6, 5, 4)),  # float64
        ids=np.zeros((6, 5), np.int64),  # into int32: values fit
        attention_mask=np.ones((6, 5), np.int32),
        pos=np.zeros((6, 2), np.int64),
        flag=np.zeros(3, np.int64),
        labels=np.arange(6),
    )
    feeds, extras = calibrate.load_npz(path, m)
    assert list(feeds) == ["x", "ids", "attention_mask", "pos", "flag"]
    assert (feeds["x"].dtype, feeds["ids"].dtype, feeds["attention_mask"].dtype) == (np.float32, np.int32, np.int64)
    assert list(extras) == ["labels"]


def test_load_npz_errors(tmp_path):
    m = linear_model()
    with pytest.raises(TnonnxError, match="no such file"):
        calibrate.load_npz(tmp_path / "missing.npz", m)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(TnonnxError, match="not an .npz file"):
        calibrate.load_npz(text, m)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros((2, 4)))
    with pytest.raises(TnonnxError, match="single .npy array"):
        calibrate.load_npz(single, m)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=np.zeros((2, 4)))
    with pytest.raises(TnonnxError, match=r"missing model input\(s\) x \(it has: input\)"):
        calibrate.load_npz(wrong, m)
    counts = tmp_path / "counts.npz"
    np.savez(counts, x=np.zeros((5, 4), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(TnonnxError, match=r"number of samples \(axis 0\): x=5, labels=4"):
        calibrate.load_npz(counts, m)
    rank = tmp_path / "rank.npz"
    np.savez(rank, x=np.zeros((5, 4, 1), np.float32))
    with pytest.raises(TnonnxError, match="rank 2"):
        calibrate.load_npz(rank, m)
    dtype = tmp_path / "dtype.npz"
    np.savez(dtype, x=np.array([["a"] * 4]))
    with pytest.raises(TnonnxError, match="cannot be cast safely"):
        calibrate.load_npz(dtype, m)


# --- batching and readers ---


def test_iter_batches_symbolic_batch():
    m = linear_model("N")
    feeds = {"x": np.arange(40, dtype=np.float32).reshape(10, 4)}
    chunks = list(calibrate.iter_batches(feeds, m, 4))
    assert [c["x"].shape[0] for c in chunks] == [4, 4, 2]
    assert np.array_equal(np.concatenate([c["x"] for c in chunks]), feeds["x"])


def test_iter_batches_fixed_batch():
    m = linear_model(2)
    feeds = {"x": np.zeros((6, 4), np.float32)}
    assert [c["x"].shape[0] for c in calibrate.iter_batches(feeds, m, 64)] == [2, 2, 2]
    with pytest.raises(TnonnxError, match="5 samples cannot be split into batches of 2"):
        list(calibrate.iter_batches({"x": np.zeros((5, 4), np.float32)}, m, 64))


def test_iter_batches_passes_scalars_whole():
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
    ]
    m = make_model([helper.make_node("Mul", ["x", "scale"], ["y"])], inputs,
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    feeds = {"x": np.zeros((3, 2), np.float32), "scale": np.array(2.0, np.float32)}
    chunks = list(calibrate.iter_batches(feeds, m, 2))
    assert [c["x"].shape for c in chunks] == [(2, 2), (1, 2)]
    assert all(c["scale"] is feeds["scale"] for c in chunks)


class Reader:
    def __init__(self, n):
        self.items = iter([{"x": np.full((1, 4), i, np.float32)} for i in range(n)])

    def get_next(self):
        return next(self.items, None)


def test_feeds_from_reader():
    assert len(calibrate.feeds_from_reader(Reader(3))) == 3
    assert [b["x"][0, 0] for b in calibrate.feeds_from_reader(Reader(5), limit=2)] == [0, 1]
    with pytest.raises(TnonnxError, match="get_next"):
        calibrate.feeds_from_reader(object())


def test_iter_batches_keeps_fixed_side_inputs_whole():
    m = token_model()
    feeds = calibrate.random_feeds(m, batch=5, shapes={"x": (5, 3, 4)})
    chunks = list(calibrate.iter_batches(feeds, m, 2))
    assert [c["ids"].shape for c in chunks] == [(2, 3), (2, 3), (1, 3)]
    assert all(c["flag"].shape == (3,) for c in chunks)
    sess = runtime.session(m)
    for c in chunks:
        sess.run(None, c)


def _sequence_model():
    """y[b, s, 6] = x[b, s, 8] @ W: the sequence length is symbolic."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32), "W")
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 6])], [w])


def test_a_folder_of_npz_files_gives_batches_of_their_own_shapes(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "b0.npz", x=rng.standard_normal((3, 5, 8)).astype(np.float32), labels=np.arange(3))
    np.savez(tmp_path / "b1.npz", x=rng.standard_normal((70, 9, 8)).astype(np.float32), labels=np.arange(70))
    (tmp_path / "notes.txt").write_text("not a batch")
    batches, extras = calibrate.feed_batches(tmp_path, _sequence_model(), what="--calib")
    # name order; the 70-sample file split as one .npz of 70 would be (chunks of 64)
    assert [b["x"].shape for b in batches] == [(3, 5, 8), (64, 9, 8), (6, 9, 8)]
    np.testing.assert_array_equal(extras["labels"], np.concatenate([np.arange(3), np.arange(70)]))


def test_a_folder_without_npz_files_or_with_unjoinable_labels_is_one_line(tmp_path):
    with pytest.raises(TnonnxError, match="a folder without .npz files"):
        calibrate.feed_batches(tmp_path, _sequence_model(), what="--calib")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 8), np.float32), labels=np.zeros((2, 3)))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 5, 8), np.float32), labels=np.zeros((2, 4)))
    with pytest.raises(TnonnxError, match="'labels' cannot be joined across the files"):
        calibrate.feed_batches(tmp_path, _sequence_model(), what="--calib")
