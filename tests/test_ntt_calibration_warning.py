"""The nonlinear formats (ntt, ntr) warn when no calibration data reaches them: they are
then fitted to Gaussian inputs, which tunes their activations to nothing real."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tnonnx.errors import MissingCalibrationWarning
from tnonnx.formats import RankSpec, ntr, ntt
from tnonnx.formats import ntt as ntt_module

from onnx_builders import randn

ROOT = Path(__file__).resolve().parents[1]
LENET, CALIB = ROOT / "models" / "lenet5_fashion.onnx", ROOT / "models" / "fashion_calib.npz"


@pytest.fixture(autouse=True)
def fresh_warning_state():
    """warn_no_calibration warns once per format and process; each test starts afresh."""
    ntt_module._warned.clear()
    yield
    ntt_module._warned.clear()


@pytest.mark.parametrize("module", [ntt, ntr], ids=["ntt", "ntr"])
def test_dense_fit_without_data_warns_naming_calib(module):
    w = randn(24, 20, seed=3).astype(np.float64)
    with pytest.warns(MissingCalibrationWarning, match="--calib") as record:
        module.fit_dense(w, RankSpec(rank=4), act="tanh", iters=2)
    assert f"--format {module.NAME} needs calibration data" in str(record[0].message)


@pytest.mark.parametrize("module", [ntt, ntr], ids=["ntt", "ntr"])
def test_conv_fit_without_data_warns(module):
    kernel = randn(8, 6, 3, 3, seed=4).astype(np.float64)
    with pytest.warns(MissingCalibrationWarning, match="--calib"):
        module.fit_conv(kernel, RankSpec(rank=4), act="tanh", iters=2)


def test_warned_once_per_format_not_per_layer():
    w = randn(24, 20, seed=5).astype(np.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            ntt.fit_dense(w, RankSpec(rank=4), act="tanh", iters=2)
        ntr.fit_dense(w, RankSpec(rank=4), act="tanh", iters=2)
    messages = [str(r.message) for r in record if issubclass(r.category, MissingCalibrationWarning)]
    assert len(messages) == 2 and "ntt" in messages[0] and "ntr" in messages[1]


def test_no_warning_with_calibration_data():
    import tnonnx

    with np.load(CALIB) as data:
        calib = {"input": data["input"][:256]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingCalibrationWarning)
        tnonnx.rewrite(LENET, format="ntt", rank=4, fit="aware", calib=calib, include="fc3", validate=False,
                       format_options={"act": "tanh", "iters": 2})


def test_cli_shows_the_warning_on_stderr(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "ntt.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "tnonnx", "rewrite", str(LENET), "--format", "ntt", "--rank", "4", "--include", "fc3",
         "--no-validate", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "needs calibration data" in proc.stderr and "--calib" in proc.stderr
    assert proc.stderr.count("needs calibration data") == 1
    assert out.is_file()
