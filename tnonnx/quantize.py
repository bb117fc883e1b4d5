"""Quantization after factorisation, with onnxruntime's own quantizers, and the check that
every weight was quantized.

- int8 dynamic (`quantize_dynamic`): weights int8, activations quantized at run time;
  the default on cpu without calibration data.
- int8 static (`quantize_static`, QDQ, per-channel weights): activation ranges measured
  on the calibration batches; used whenever calibration data is given, and always for
  the gpu and edge targets.
- int4 (`MatMulNBitsQuantizer`, block-wise symmetric): every MatMul whose constant 2-D
  weight has at least `block_size` rows (its contracted dimension); weights too narrow
  for one block, convolutions and Gemm weights go to int8 as above. A contracted dimension
  that is not a multiple of the block is padded to one (stored, not used): the rewrite
  rounds ranks to whole blocks (RankSpec.align), and `int4_padded` names what is left.

Only MatMul with a constant right operand, Gemm, Conv and Gather tables are quantized
(weights, not the attention products), in the original and in the factorised model alike,
so the baseline "quantize alone" is quantized the same way as the factorised model.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import TnonnxError
from .fp16 import name_nodes as _name_nodes

QUANT_MODES = ("int8", "int4")
INT4_BLOCK = 32  # MatMulNBits block along the contracted dimension (a power of two >= 16)
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv", "Gather")  # Gather: embedding tables
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class Quantization:
    """What --quantize asks for: the mode, and static (calibrated QDQ) or dynamic int8."""

    mode: str
    static: bool = False
    block_size: int = INT4_BLOCK
    symmetric_activations: bool = False  # int8 activations (gpu), else uint8 (cpu, edge)

    def describe(self) -> str:
        int8 = "int8 static QDQ per-channel" if self.static else "int8 dynamic"
        if self.mode == "int4":
            return f"int4 MatMulNBits (block {self.block_size}), else {int8}"
        return int8


@dataclass
class QuantInfo:
    """What quantization did to one model."""

    method: str
    int4: list[str] = field(default_factory=list)  # weights stored in 4 bits
    int8: list[str] = field(default_factory=list)  # weights stored in 8 bits
    int4_padded: list[str] = field(default_factory=list)  # int4 weights whose last block is part padding
    left_float: list[str] = field(default_factory=list)  # constant weights still float
    weights: int = 0  # elements of the quantized weights
    bits_per_weight: float | None = None  # their storage (data, scales, zero points) per element
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.left_float

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class _Reader:
    """onnxruntime's CalibrationDataReader over tnonnx's feed batches."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter([{k: np.asarray(v) for k, v in b.items()} for b in self.batches])


def constant_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The float initializers a MatMul (right operand), Gemm or Conv takes as weight, and
    the tables Gather looks up."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        at = 0 if node.op_type == "Gather" else 1
        if node.op_type in QUANTIZED_OPS and len(node.input) > at and node.input[at] in inits:
            t = inits[node.input[at]]
            if t.data_type in _FLOAT:
                out[t.name] = t
    return out


def quantize(model: onnx.ModelProto, q: Quantization, batches=None) -> tuple[onnx.ModelProto, QuantInfo]:
    """`model` quantized as `q` asks; `batches` (feed dicts) calibrate static int8."""
    if q.mode not in QUANT_MODES:
        raise TnonnxError(f"--quantize {q.mode}: choose from {', '.join(QUANT_MODES)}")
    if q.static and not batches:
        raise TnonnxError("static int8 quantization needs calibration data: give --calib FILE.npz or --calib-random N")
    model = _constants_as_initializers(model)
    weights = constant_weights(model)
    sizes = {name: int(np.prod(t.dims)) for name, t in weights.items()}
    # onnxruntime's quantizers log every node they skip at warning level
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    _name_nodes(model)
    # int8 first, leaving out what goes to int4: the int8 quantizers cannot follow types
    # through MatMulNBits (a contrib op)
    wide = _int4_nodes(model, q.block_size) if q.mode == "int4" else []
    with tempfile.TemporaryDirectory(prefix="tnonnx-quant-") as tmp:
        current = _int8(model, q, batches, Path(tmp), exclude=wide)
    if wide:
        current = _int4(current, q.block_size, wide)
    info = _describe(current, q, weights, sizes)
    inits = {t.name: t for t in model.graph.initializer}
    info.int4_padded = sorted({n.input[1] for n in model.graph.node
                               if n.name in wide and inits[n.input[1]].dims[0] % q.block_size})
    return current, info


def _int4_nodes(model: onnx.ModelProto, block: int) -> list[str]:
    """MatMuls whose constant float32 2-D weight spans at least one block of rows."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] >= block
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT]


def _int4(model: onnx.ModelProto, block: int, nodes: list[str]) -> onnx.ModelProto:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as exc:
        raise TnonnxError(f"--quantize int4 needs onnxruntime's MatMulNBits quantizer ({exc}): "
                          "pip install 'tnonnx[int4]'") from None

    # its import sets up logging at INFO level and it reports every node it skips
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.ERROR)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True, nodes_to_exclude=others,
                                     algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _int8(model: onnx.ModelProto, q: Quantization, batches, tmp: Path, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if not set(constant_weights(model)) - {n.input[1] for n in model.graph.node if n.name in exclude}:
        return model
    source, out = tmp / "in.onnx", tmp / "out.onnx"
    onnx.save_model(model, source)
    options = {"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT}
    if q.static:
        act = QuantType.QInt8 if q.symmetric_activations else QuantType.QUInt8
        quantize_static(str(source), str(out), _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                        nodes_to_exclude=exclude, extra_options={**options, "ActivationSymmetric": q.symmetric_activations})
    else:
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                         nodes_to_exclude=exclude, extra_options=options)
    return onnx.load(str(out))


def _describe(final: onnx.ModelProto, q: Quantization, weights: dict, sizes: dict) -> QuantInfo:
    """Which weights ended in 4 bits, 8 bits or float, and the effective bits per quantized
    weight: every initializer the quantizers derived from it (data, scales, zero points)."""
    inits = {t.name: t for t in final.graph.initializer}
    info = QuantInfo(method=q.describe(), bytes=final.ByteSize())
    stored_bits = 0
    for name in weights:
        if name in inits and inits[name].data_type in _FLOAT:
            info.left_float.append(name)
            continue
        derived = [t for n, t in inits.items() if n.startswith(name + "_")]
        if not derived:
            info.left_float.append(name)  # neither float nor quantized: removed by accident
            continue
        packed = any(t.name.endswith("_Q4") or t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
                     for t in derived)
        (info.int4 if packed else info.int8).append(name)
        stored_bits += sum(8 * numpy_helper.to_array(t).nbytes if t.data_type not in (
            onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 4 * int(np.prod(t.dims)) for t in derived)
        info.weights += sizes[name]
    info.bits_per_weight = stored_bits / info.weights if info.weights else None
    return info


def _constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with the main graph's Constant tensors as initializers (paddle2onnx stores
    weights as Constant nodes, which the quantizers do not see)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            t = onnx.TensorProto()
            t.CopyFrom(value.t)
            t.name = node.output[0]
            out.graph.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(out.graph.node):
        del out.graph.node[:]
        out.graph.node.extend(keep)
    return out
