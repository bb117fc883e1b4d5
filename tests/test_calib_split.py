"""The shipped calibration split (models/fashion_calib.npz): the model's input, runs in
onnxruntime, shares no image with the test split, and is what make_calib.py writes."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tnonnx.calibrate import load_npz
from tnonnx.runtime import input_specs

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
LENET = MODELS / "lenet5_fashion.onnx"
CALIB, TEST = MODELS / "fashion_calib.npz", MODELS / "fashion_test.npz"


def _arrays(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha256(np.ascontiguousarray(img).tobytes()).digest() for img in images}


def test_calib_file_matches_model_input():
    assert CALIB.is_file()
    arrays = _arrays(CALIB)
    (spec,) = input_specs(onnx.load(str(LENET)))
    x = arrays[spec.name]
    assert x.dtype == spec.dtype == np.float32
    assert x.ndim == len(spec.shape) and x.shape[1:] == tuple(spec.shape[1:]) == (1, 28, 28)
    assert 1000 <= len(x) <= 4000
    assert arrays["labels"].dtype == np.int64 and arrays["labels"].shape == (len(x),)
    assert np.bincount(arrays["labels"], minlength=10).min() > 0  # every class present
    # normalised like the test file: the same set of pixel values (0 and 255 map to the ends)
    test = _arrays(TEST)["input"]
    assert np.isclose(x.min(), test.min()) and np.isclose(x.max(), test.max())
    feeds, extras = load_npz(CALIB, onnx.load(str(LENET)))  # what --calib reads
    assert set(feeds) == {spec.name} and "labels" in extras


def test_calib_and_test_share_no_image():
    calib, test = _arrays(CALIB)["input"], _arrays(TEST)["input"]
    calib_hashes, test_hashes = _hashes(calib), _hashes(test)
    assert len(calib_hashes) == len(calib)  # no image twice in the calibration split
    assert not calib_hashes & test_hashes


def test_calib_runs_in_onnxruntime_with_sensible_accuracy():
    arrays = _arrays(CALIB)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(LENET), opts, providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": arrays["input"]})
    assert logits.shape == (len(arrays["input"]), 10) and np.isfinite(logits).all()
    accuracy = float((logits.argmax(1) == arrays["labels"]).mean())
    assert accuracy > 0.8


def test_make_calib_regenerates_the_file():
    from models.make_calib import DEFAULT_DATA_DIR, make_calib

    data_dir = Path(DEFAULT_DATA_DIR)
    if not (data_dir / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST idx files not in {data_dir} (apt-get install dataset-fashion-mnist)")
    fresh, shipped = make_calib(data_dir), _arrays(CALIB)
    assert set(fresh) == set(shipped)
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], shipped[key])
        assert fresh[key].dtype == shipped[key].dtype
