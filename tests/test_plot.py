import importlib.util
import os
import struct
import sys
from pathlib import Path

import pytest

import tnonnx
from tnonnx import plot
from tnonnx.errors import TnonnxError

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install 'tnonnx[test]')")

MODEL = Path(__file__).resolve().parents[1] / "models" / "lenet5_fashion.onnx"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def lenet_report() -> dict:
    _, report = tnonnx.rewrite(str(MODEL), format="svd", rank=8, validate=False)
    return report.to_dict()


@needs_matplotlib
def test_plot_report_writes_a_png(lenet_report, tmp_path):
    target = tmp_path / "new" / "folder" / "lenet.png"
    assert plot.plot_report(lenet_report, target) == target
    assert target.is_file()
    assert 20_000 < target.stat().st_size < 2_000_000
    width, height = png_size(target)
    assert 600 <= width <= 8000 and 600 <= height <= 8000
    # only the picture is left in the folder: the temporary file was renamed
    assert [p.name for p in target.parent.iterdir()] == ["lenet.png"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


@needs_matplotlib
def test_plot_report_replaces_an_existing_file(lenet_report, tmp_path):
    target = tmp_path / "lenet.png"
    target.write_bytes(b"old")
    plot.plot_report(lenet_report, str(target))
    assert target.read_bytes()[:8] == PNG_MAGIC


@needs_matplotlib
def test_plot_report_without_times_and_with_layers_left_alone(tmp_path):
    report = {
        "format": "tt", "rank_rule": "rank 4", "fit": "data-free", "batch": 1, "latency": None,
        "totals": {"params_before": 1000, "params_after": 400, "bytes_before": 4000, "bytes_after": 1600,
                   "macs_before": 1000, "macs_after": 400, "ms_before": None, "ms_after": None},
        "layers": [
            {"name": "/a/b/dense/MatMul", "op": "MatMul", "weight_shape": [20, 25], "params_before": 500,
             "macs_before": 500, "format": "tt", "ranks": [4], "params_after": 200, "macs_after": 200,
             "weight_error": 0.3, "output_error": None, "reason": None, "ms_before": None, "ms_after": None,
             "ms_predicted": None, "ms_measured": False},
            {"name": "/c/b/dense/MatMul", "op": "MatMul", "weight_shape": [20, 25], "params_before": 500,
             "macs_before": None, "format": None, "ranks": None, "params_after": None, "macs_after": None,
             "weight_error": None, "output_error": None, "reason": "kept dense", "ms_before": None,
             "ms_after": None, "ms_predicted": None, "ms_measured": False},
            {"name": "exact", "op": "Gemm", "weight_shape": [4, 4], "params_before": 16, "macs_before": 16,
             "format": "svd", "ranks": [4], "params_after": 32, "macs_after": 32, "weight_error": 0.0,
             "output_error": 0.0, "reason": None, "ms_before": None, "ms_after": None, "ms_predicted": None,
             "ms_measured": False},
        ],
    }
    target = plot.plot_report(report, tmp_path / "plain.png")
    png_size(target)
    assert target.stat().st_size > 10_000


@needs_matplotlib
def test_plot_report_of_nothing_rewritten(tmp_path):
    report = {"totals": {}, "layers": [
        {"name": "/conv1/Conv", "op": "Conv", "weight_shape": [6, 1, 5, 5], "params_before": 150,
         "macs_before": 117600, "format": None, "reason": "nothing to factorise"}]}
    png_size(plot.plot_report(report, tmp_path / "none.png"))


def test_short_names_keep_layers_apart():
    names = ["/encoder/layer.0/attention/query/MatMul", "/encoder/layer.1/attention/query/MatMul",
             "/fc1/Gemm", "plain"]
    assert plot._short_names(names) == ["layer.0/attention/query/MatMul", "layer.1/attention/query/MatMul",
                                        "fc1/Gemm", "plain"]


@needs_matplotlib
def test_plot_bench(tmp_path):
    result = {"batch": 4, "threads": 2, "shapes": {"x": [4, 8]}, "speedup": 1.5,
              "reference": {"mean_ms": 1.3, "p50_ms": 1.2, "p90_ms": 1.4, "p99_ms": 2.0, "min_ms": 1.0, "runs": 30},
              "candidate": {"mean_ms": 0.9, "p50_ms": 0.8, "p90_ms": 0.9, "p99_ms": 1.5, "min_ms": 0.7, "runs": 30}}
    target = plot.plot_bench(result, tmp_path / "bench.png")
    png_size(target)
    assert target.stat().st_size > 5_000


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(TnonnxError, match=r"--plot needs matplotlib: pip install 'tnonnx\[plot\]'"):
        plot.plot_report({"totals": {}, "layers": []}, tmp_path / "x.png")
    with pytest.raises(TnonnxError, match="needs matplotlib"):
        plot.plot_bench({}, tmp_path / "y.png")
    with pytest.raises(TnonnxError, match="needs matplotlib"):
        plot.require_matplotlib()
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


@needs_matplotlib
def test_rewrite_and_bench_plot_from_the_cli(tmp_path):
    from click.testing import CliRunner

    from tnonnx.cli import main

    lenet = MODEL
    out, picture = tmp_path / "small.onnx", tmp_path / "plots" / "rewrite.png"
    runner = CliRunner()
    done = runner.invoke(main, ["rewrite", str(lenet), "--format", "svd", "--rank", "16", "--no-validate",
                                "-o", str(out), "--plot", str(picture)])
    assert done.exit_code == 0, done.output
    assert picture.read_bytes()[:8] == PNG_MAGIC
    done = runner.invoke(main, ["bench", str(lenet), str(out), "--repeats", "3", "--plot", str(tmp_path / "b.png")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "b.png").stat().st_size > 1000
    refused = runner.invoke(main, ["rewrite", str(lenet), "--format", "svd", "-o", str(out), "--plot", str(out)])
    assert refused.exit_code == 2
