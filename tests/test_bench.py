import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tnonnx import bench


def linear(w):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def check_latency(lat, min_runs):
    assert set(lat) == {"mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "runs"}
    assert lat["runs"] >= min_runs
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert lat["min_ms"] <= lat["mean_ms"]


def test_latency_structure():
    feeds = {"x": np.ones((2, 8), np.float32)}
    check_latency(bench.latency(linear(np.eye(8)), feeds, warmup=1, repeats=7, threads=1), 7)
    # min_time_s can only add runs
    check_latency(bench.latency(linear(np.eye(8)), feeds, warmup=0, repeats=3, min_time_s=0.01), 3)


def test_compare_structure():
    result = bench.compare(linear(np.eye(8)), linear(2 * np.eye(8)), batch=4, warmup=1, repeats=5)
    check_latency(result["reference"], 5)
    check_latency(result["candidate"], 5)
    assert result["speedup"] > 0 and result["batch"] == 4
    assert result["shapes"] == {"x": [4, 8]}
