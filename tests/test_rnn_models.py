"""The committed row-reading LSTM and GRU (models/train_rnn.py) rewritten through the CLI:
exact at full rank in both forms (W hoisted in front of the fused node; --recurrent scan),
and their accuracy on the committed test images before and after a low-rank rewrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_builders import rel_err, run
from test_cli import cli

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "models" / "fashion_test.npz"


def accuracy(model, data) -> float:
    return float((run(model, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())


@pytest.fixture(scope="module")
def test_data():
    data = np.load(TEST)
    return {"input": data["input"][:500], "labels": data["labels"][:500]}


@pytest.mark.parametrize("name", ["lstm_fashion", "gru_fashion", "lstm_fashion.dynamo", "gru_fashion.dynamo"])
@pytest.mark.parametrize("recurrent", ["fused", "scan"])
def test_full_rank_rewrite_is_exact(tmp_path, test_data, name, recurrent):
    """Both exporters: the dynamo one reaches W through Slice/Concat chains."""
    src, out = ROOT / "models" / f"{name}.onnx", tmp_path / "out.onnx"
    r = cli("rewrite", src, "-o", out, "--format", "svd", "--rank", 256, "--ops", "MatMul,Gemm,LSTM,GRU",
            "--recurrent", recurrent, "--force", "--no-validate", "--no-timing")
    assert r.exit_code == 0, r.output
    m, new = onnx.load(src), onnx.load(out)
    x = {"input": test_data["input"][:64]}
    assert rel_err(run(m, x)[0], run(new, x)[0]) < 1e-4
    assert ("Scan" in [n.op_type for n in new.graph.node]) == (recurrent == "scan")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_accuracy_before_and_after(tmp_path, test_data, kind):
    src, out = ROOT / "models" / f"{kind}_fashion.onnx", tmp_path / "out.onnx"
    before = accuracy(onnx.load(src), test_data)
    assert before > 0.8  # a trained model
    r = cli("rewrite", src, "-o", out, "--format", "svd", "--rank", 1, "--recurrent", "scan", "--include",
            kind.upper(), "--no-validate", "--no-timing")
    assert r.exit_code == 0, r.output
    after = accuracy(onnx.load(out), test_data)
    assert after < before - 0.05  # rank 1 for W and R: the accuracy the benchmark's ranks keep is lost
