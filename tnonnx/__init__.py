"""tnonnx: compress ONNX models by rewriting MatMul/Gemm/Conv layers as tensor networks."""

from .api import inspect, rewrite, save
from .errors import TnonnxError, ValidationFailed
from .model import load
from .validate import validate

__version__ = "0.1.0"
__all__ = ["inspect", "rewrite", "save", "validate", "load", "TnonnxError", "ValidationFailed"]
