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
    assert result["other_load"] is None or result["other_load"] >= 0  # None where /proc/stat is not there


def test_compare_in_processes_keeps_the_median_process():
    """Fixed per-process results: the median process by speed-up is kept whole (its times
    with its speed-up), and every process's speed-up is listed in run order."""
    speeds = iter([1.9, 0.8, 1.4, 2.5])
    calls = []

    def run(reference, candidate, options):
        calls.append((reference, candidate, options))
        s = next(speeds)
        return {"reference": {"p50_ms": s}, "candidate": {"p50_ms": 1.0}, "speedup": s, "batch": 4}

    got = bench.compare_in_processes("a.onnx", "b.onnx", 3, run=run, batch=4, threads=2)
    assert got["speedup"] == 1.4 and got["reference"]["p50_ms"] == 1.4 and got["speedups"] == [1.9, 0.8, 1.4]
    assert got["processes"] == 3 and calls == [("a.onnx", "b.onnx", {"batch": 4, "threads": 2})] * 3
    speeds = iter([1.9, 0.8, 1.4, 2.5])
    assert bench.compare_in_processes("a.onnx", "b.onnx", 4, run=run)["speedup"] == 1.4  # lower middle


def test_compare_in_new_processes_end_to_end(tmp_path):
    import onnx

    for name, w in (("a.onnx", np.eye(8)), ("b.onnx", 2 * np.eye(8))):
        onnx.save(linear(w), tmp_path / name)
    got = bench.compare_in_processes(tmp_path / "a.onnx", tmp_path / "b.onnx", 2, batch=4, warmup=1, repeats=5)
    check_latency(got["reference"], 5)
    assert len(got["speedups"]) == 2 and got["speedup"] in got["speedups"] and got["shapes"] == {"x": [4, 8]}
