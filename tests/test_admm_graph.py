"""`tnonnx rewrite --finetune N --admm` on the real LeNet-5 (Fashion-MNIST): the dense graph
trained towards the rank set through the ONNX interpreter, then fitted and fine-tuned."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import tnonnx
from tnonnx.cli import main
from tnonnx.plan import fit_weight
from tnonnx.validate import run

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
LENET, CALIB = ROOT / "models" / "lenet5_fashion.onnx", ROOT / "models" / "fashion_calib.npz"


def _calib(n: int = 200) -> list[dict]:
    x = np.load(CALIB)["input"][:n]
    return [{"input": x[i:i + 50]} for i in range(0, n, 50)]


def _plans(model, format="svd", rank=4):
    from tnonnx.graph import find_layers
    from tnonnx.plan import Selection, make_plan, rank_spec

    return make_plan(find_layers(model), format, rank_spec(rank=rank), Selection(ops=("Gemm", "Conv")))


def _distance(plan) -> float:
    w = plan.layer.weight
    z = fit_weight(plan.format, w, plan.spec, groups=plan.layer.groups if plan.layer.kind == "conv" else 1).to_dense()
    return float(np.linalg.norm(w - z) / np.linalg.norm(w))


def test_admm_phase_moves_every_weight_towards_its_rank_set_and_writes_it_back():
    from tnonnx.admm_graph import admm_train

    original = onnx.load(LENET)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    plans = _plans(model)
    before = [_distance(p) for p in plans]
    notes = admm_train(model, original, plans, _calib(), epochs=3, rho=10.0, options={}, hidden_weight=4.0)
    after = [_distance(p) for p in plans]
    assert all(a < b - 0.01 for a, b in zip(after, before)), (before, after)
    assert notes[0].startswith("admm: 3 epoch(s)")
    # the layer weights the fit reads are the trained initializers (Gemm's transB undone)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    fc1 = next(p for p in plans if p.layer.node.input[1] == "fc1.weight")
    np.testing.assert_allclose(fc1.layer.weight, inits["fc1.weight"].T, rtol=1e-6)
    assert not np.allclose(inits["fc1.weight"], numpy_helper.to_array(
        next(t for t in original.graph.initializer if t.name == "fc1.weight")))


def test_cli_admm_rewrite_runs_in_onnxruntime_and_reports_the_phase(tmp_path):
    out = tmp_path / "small.onnx"
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.load(CALIB)["input"][:128])
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "--format", "svd", "--rank", "16", "--finetune", "1",
                                       "--admm", "--admm-rho", "5", "--calib", str(calib), "-o", str(out),
                                       "--no-timing", "--no-validate", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "admm: 1 epoch(s)" in result.output and "finetune:" in result.output
    feeds = {"input": np.load(CALIB)["input"][300:364]}
    (got,), (want,) = run(onnx.load(out), [feeds]).values(), run(onnx.load(LENET), [feeds]).values()
    # svd rank 16 after the ADMM phase and fine-tuning: 0.95 top-1 agreement, 0.15 relative error
    assert np.mean(got.argmax(1) == want.argmax(1)) > 0.85
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.3
    import json

    settings = json.loads((tmp_path / "r.json").read_text())["settings"]["finetune"]
    assert settings["admm"] is True and settings["admm_rho"] == 5


@pytest.mark.parametrize("args, message", [
    (["--admm", "--calib-random", "8"], "--admm trains for the --finetune epochs"),
    (["--admm", "--finetune", "1", "--budget", "3x", "--calib-random", "8"], "fixed rank rule"),
    (["--admm", "--finetune", "1", "--format", "ntt", "--calib-random", "8"], "no truncation to project on"),
    (["--admm-rho", "2", "--calib-random", "8"], "--admm-rho applies to --admm"),
    (["--admm", "--finetune", "1", "--admm-rho", "0", "--calib-random", "8"], "must be > 0"),
])
def test_cli_admm_bad_combinations_are_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(main, ["rewrite", str(LENET), "-o", str(out), "--no-timing", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_admm_with_the_python_api_keeps_the_original_untouched():
    original = onnx.load(LENET)
    copy = original.SerializeToString()
    tnonnx.rewrite(original, format="svd", rank=4, finetune=1, admm=True, calib={"input": np.load(CALIB)["input"][:64]},
                   validate=False, timing=False)
    assert original.SerializeToString() == copy
