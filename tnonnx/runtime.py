"""The one place that creates onnxruntime sessions, and reads a model's input specs."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from . import custom_ops, external
from . import model as _model
from .errors import ModelTooLarge, TnonnxError

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (None for unknown rank).

    A dim is an int (fixed), a str (symbolic, e.g. "batch") or None (unknown).
    """

    name: str
    dtype: np.dtype
    shape: list[Dim] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def session(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    threads: int | None = None,
    optimize: bool = True,
    spin_after_run: bool = True,
    what: str = "model",
) -> ort.InferenceSession:
    """A CPU InferenceSession for a ModelProto or a path.

    Its pool threads spin between the nodes of a run, as onnxruntime deploys by default.
    With spin_after_run=False they stop spinning as soon as a run returns (the next run
    wakes them): sessions timed in turn then do not steal each other's cores.

    Raises TnonnxError naming the model when onnxruntime refuses it.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings are not for our users
    if threads:
        opts.intra_op_num_threads = threads
    if not spin_after_run:  # see latency.OrtTimer
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    for lib in _custom_op_libraries(model):
        opts.register_custom_ops_library(str(lib))
    providers = ["CPUExecutionProvider"]

    if not isinstance(model, onnx.ModelProto):
        label = f"{what} '{model}'"
        check_fits(_file_bytes(model), label)
        return _create(lambda: ort.InferenceSession(str(model), opts, providers=providers), label)

    label = f"{what} (graph '{model.graph.name}')" if model.graph.name else what
    # serialise once and size the bytes: ByteSize() costs as much as serialising
    data = _serialize_for_runtime(model)
    check_fits(_model.nbytes(model) if data is None else len(data) + external.data_bytes(model), label)
    if data is None or len(data) > _model.PROTO_LIMIT:
        with tempfile.TemporaryDirectory(prefix="tnonnx-", ignore_cleanup_errors=True) as tmp:
            path = _model.save(model, Path(tmp) / "model.onnx", external_data=True)
            return _create(lambda: ort.InferenceSession(str(path), opts, providers=providers), label)
    base = external.base_dir(model)
    if base is not None:  # the graph from memory, its weights from the data file they are in
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", base)
    return _create(lambda: ort.InferenceSession(data, opts, providers=providers), label)


class Sessions:
    """Sessions kept open for reuse, one per model object and settings: a rewrite times the
    original and the rewritten model and then validates them, on the same two sessions.
    Holds each model too, so that an id is never reused while its session is kept; the
    models must not change while kept."""

    def __init__(self):
        self._open: dict[tuple, tuple] = {}

    def get(self, model: onnx.ModelProto, *, threads: int | None = None, spin_after_run: bool = True,
            what: str = "model") -> ort.InferenceSession:
        key = (id(model), threads, spin_after_run)
        if key not in self._open:
            self._open[key] = (model, session(model, threads=threads, spin_after_run=spin_after_run, what=what))
        return self._open[key][1]

    def close(self) -> None:
        self._open.clear()


def available_memory() -> int | None:
    """Bytes of memory this machine can still give a process (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(size: int, label: str) -> None:
    """TnonnxError, before onnxruntime tries, when a model of `size` bytes cannot be held in
    the memory available (onnxruntime keeps every weight in memory while it runs)."""
    free = available_memory()
    if free is not None and size > free:
        raise ModelTooLarge(f"{label}: too large to run on this machine: onnxruntime needs its {_gb(size)} of weights "
                          f"in memory and {_gb(free)} is available")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _file_bytes(path) -> int:
    """Size of a model file, its external data included."""
    size = os.path.getsize(path)
    try:
        return size + external.data_bytes(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - onnxruntime reports an unreadable model itself
        return size


def infer(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], *, what: str = "model") -> list[np.ndarray]:
    """sess.run(None, feeds), with onnxruntime's failures turned into one-line TnonnxErrors."""
    try:
        return sess.run(None, feeds)
    except Exception as exc:
        raise TnonnxError(f"{what}: onnxruntime failed to run it: {ort_message(exc)}") from None


def input_specs(model: onnx.ModelProto | str | os.PathLike) -> list[InputSpec]:
    """Graph inputs that are not initializers, in graph order."""
    if not isinstance(model, onnx.ModelProto):
        model = _model.load(model)
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise TnonnxError(f"input '{vi.name}': only tensor inputs are supported")
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = None
        if tt.HasField("shape"):
            shape = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            ]
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


def check_same_inputs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    """TnonnxError unless both models take inputs of the same names and dtypes."""
    ref = {s.name: s.dtype for s in input_specs(reference)}
    cand = {s.name: s.dtype for s in input_specs(candidate)}
    if set(ref) != set(cand):
        raise TnonnxError(
            f"the models take different inputs: reference {sorted(ref)}, candidate {sorted(cand)}"
        )
    for name, dtype in ref.items():
        if cand[name] != dtype:
            raise TnonnxError(f"input '{name}' is {dtype} in the reference but {cand[name]} in the candidate")


def ort_message(exc: Exception) -> str:
    """onnxruntime's error text on one line, without its code prefix and C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip())
    if re.match(r"^/\S+:\d+ ", text) and "(" in text:
        text = _after_signature(text)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _custom_op_libraries(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """Paths of the custom-op libraries a model needs (model as given to session()): the
    tnonnx library for models with nodes of its domain (built here if it is missing and a
    compiler and headers are at hand; otherwise a TnonnxError saying to run `tnonnx build-ops`)."""
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - onnxruntime reports an unreadable model itself
            return []
    if not custom_ops.needs_library(model):
        return []
    return [str(custom_ops.ensure_library())]


def _serialize_for_runtime(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes with a too-new IR version (onnx's default) clamped, without copying a
    possibly large proto; None when protobuf cannot serialise it (2 GB or more)."""
    max_ir, _ = _model.runtime_limits()
    ir = model.ir_version
    try:
        model.ir_version = min(ir, max_ir)
        return model.SerializeToString()
    except (ValueError, EncodeError):
        return None
    finally:
        model.ir_version = ir


def _create(make, label: str) -> ort.InferenceSession:
    try:
        return make()
    except Exception as exc:
        raise TnonnxError(f"{label}: onnxruntime cannot load it: {ort_message(exc)}") from None


def _after_signature(text: str) -> str:
    # "/src/x.cc:12 ns::Fn(a, b(c)) message" -> "message"
    depth = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return text[i + 1:].strip()
    return text


def with_outputs(model: onnx.ModelProto, names, inferred: onnx.ModelProto | None = None, *, inputs: bool = True):
    """(copy of the model with main-graph tensors `names` added as graph outputs, the names
    that could be exposed). Dtypes come from `inferred` (shape-inferred) or onnx's inference;
    graph inputs count as exposable when `inputs`; tensors inside subgraphs cannot be."""
    inferred = inferred if inferred is not None else onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*graph.value_info, *graph.input, *graph.output)}
    available = {o for n in model.graph.node for o in n.output}
    if inputs:
        available |= {i.name for i in model.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n in available and types.get(n)]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in wanted if n not in known)
    return m, wanted
