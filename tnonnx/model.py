"""Loading and saving models: external data, IR/opset normalisation, atomic writes."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from . import external
from .errors import TnonnxError
from .macs import FLOAT_TYPES

# The newest IR version / default-domain opset the installed onnxruntime loads.
# onnx may write newer ones by default; the runtime refuses those (see ENVIRONMENT.md).
_ORT_LIMITS = {
    # onnxruntime minor version -> (max IR, max opset)
    (1, 31): (13, 26), (1, 30): (13, 25), (1, 29): (13, 25), (1, 28): (11, 24),
    (1, 27): (11, 23), (1, 26): (11, 23), (1, 25): (11, 23), (1, 24): (11, 23),
    (1, 23): (11, 23), (1, 22): (11, 22), (1, 21): (10, 22), (1, 20): (10, 21),
    (1, 19): (10, 21), (1, 18): (10, 21),
}
MIN_OPSET = 7
# what onnx's version converter upgrades older models to: the first opset with every op form
# tnonnx emits (Slice and Unsqueeze with input axes), and one each runtime in _ORT_LIMITS runs
UPGRADE_OPSET = 13
_UPGRADED = "tnonnx.upgraded_from"
# Protobuf refuses to serialise messages of 2 GB or more: models past this size are only ever
# held with their weights in external data. Module-level so tests can lower it.
PROTO_LIMIT = 2**31 - 2**20


def runtime_limits() -> tuple[int, int]:
    """(max IR version, max default-domain opset) of the installed onnxruntime."""
    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    if (major, minor) in _ORT_LIMITS:
        return _ORT_LIMITS[(major, minor)]
    if (major, minor) > max(_ORT_LIMITS):
        return _ORT_LIMITS[max(_ORT_LIMITS)]
    return _ORT_LIMITS[min(_ORT_LIMITS)]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def load(source, *, what: str = "model") -> onnx.ModelProto:
    """Load a model from a path or return a copy of a ModelProto, external data included.

    Raises TnonnxError with one clear line for anything a user can get wrong.
    """
    if isinstance(source, onnx.ModelProto):
        model = upgrade_old_opset(_copy(source), what)
        check_supported(model, what)
        return model
    path = check_path(source, what)
    label = f"{what} '{path}'"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise TnonnxError(f"{label}: cannot read it ({exc.strerror or _short(exc)})") from None
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise TnonnxError(f"{label}: not an ONNX model or truncated ({_short(exc)})") from None
    if not model.graph.node and not model.graph.output:
        raise TnonnxError(f"{label}: not an ONNX model (no graph found)")
    if _uses_external_data(model):
        # weights stay in the data file (read per layer, copied on save): see external.py
        base = str(path.parent.resolve())
        try:
            external.check_spans(model, base)
            external.read_small(model, base)
        except Exception as exc:
            raise TnonnxError(f"{label}: cannot read its external data ({_short(exc)})") from None
        model.metadata_props.add(key=external.BASE_KEY, value=base)
    model = upgrade_old_opset(model, label)
    check_supported(model, label)
    # A file cut at a field boundary can still parse (e.g. with an opset import or a
    # function missing): the checker catches what the parser cannot.
    if inline_bytes(model) < PROTO_LIMIT:
        try:  # with external data, the file: its data-file locations are checked beside it
            onnx.checker.check_model(str(path) if came_with_external_data(model) else skeleton(model, dims=False))
        except Exception as exc:
            raise TnonnxError(f"{label}: invalid or truncated ONNX model ({_short(exc)})") from None
    return model


def check_path(source, what: str = "model") -> Path:
    """The path of an existing, non-empty regular file, or TnonnxError saying what is wrong."""
    path = Path(source)
    if not path.exists():
        raise TnonnxError(f"{what} '{path}': no such file")
    if path.is_dir():
        raise TnonnxError(f"{what} '{path}': is a directory, not an ONNX file")
    if not path.is_file():
        raise TnonnxError(f"{what} '{path}': not a regular file")
    if path.stat().st_size == 0:
        raise TnonnxError(f"{what} '{path}': file is empty")
    return path


def check_output_path(path, what: str = "output") -> Path:
    """Fail early, before any work, when `path` cannot be written (missing folders are fine:
    they are created when writing)."""
    path = Path(path)
    if path.is_dir():
        raise TnonnxError(f"{what} '{path}': is a directory")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise TnonnxError(f"{what} '{path}': '{folder}' is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TnonnxError(f"{what} '{path}': folder '{folder}' is not writable")
    return path


def same_file(a, b) -> bool:
    """Whether two paths name the same file (through any spelling, link or hard link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_supported(model: onnx.ModelProto, what: str = "model") -> None:
    opset = default_opset(model)
    if not model.graph.node:
        raise TnonnxError(f"{what}: graph has no nodes")
    if opset == 0 and model.graph.node:
        raise TnonnxError(f"{what}: no default-domain opset import")
    _, max_opset = runtime_limits()
    if opset < MIN_OPSET or opset > max_opset:
        raise TnonnxError(
            f"{what}: opset {opset} is not supported (onnxruntime {ort.__version__} runs opsets {MIN_OPSET}..{max_opset})"
        )


def upgrade_old_opset(model: onnx.ModelProto, what: str = "model") -> onnx.ModelProto:
    """A model of an opset older than onnxruntime runs, upgraded to UPGRADE_OPSET by onnx's
    version converter (marked, for upgrade_note); other models as they are. TnonnxError
    when the converter cannot do it."""
    opset = default_opset(model)
    if not 0 < opset < MIN_OPSET:
        return model
    from onnx import version_converter

    _, max_opset = runtime_limits()
    try:
        # IR 3 wants initializers listed as inputs; the converter refuses models that do not
        model.ir_version = max(model.ir_version, 4)
        upgraded = version_converter.convert_version(model, UPGRADE_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        raise TnonnxError(f"{what}: opset {opset} is older than onnxruntime {ort.__version__} runs "
                          f"({MIN_OPSET}..{max_opset}) and onnx's version converter cannot upgrade it "
                          f"({_short(exc)})") from None
    upgraded.metadata_props.add(key=_UPGRADED, value=str(opset))
    return upgraded


def upgrade_note(model: onnx.ModelProto) -> list[str]:
    """The report's line for a model load() upgraded (none for others)."""
    old = next((p.value for p in model.metadata_props if p.key == _UPGRADED), None)
    if old is None:
        return []
    return [f"opset {old} is older than onnxruntime runs: upgraded to opset {default_opset(model)} with onnx's "
            "version converter before rewriting (the output has that opset)"]


def came_with_external_data(model: onnx.ModelProto) -> bool:
    return external.base_dir(model) is not None


def nbytes(model: onnx.ModelProto) -> int:
    """The model's size in bytes, external data included, without serialising it."""
    return inline_bytes(model) + external.data_bytes(model)


_SIZED_APART = 1 << 16  # raw_data of main-graph initializers this long is sized, not serialised


def inline_bytes(model: onnx.ModelProto) -> int:
    """len(model.SerializeToString()), also past protobuf's 2 GB limit, without serialising
    the main graph's large initializers: ByteSize() serialises (as slowly as
    SerializeToString), so their bytes are counted by the wire format's arithmetic (a
    length-delimited field is its tag, the varint of its length, and its bytes)."""
    if not model.HasField("graph"):
        return model.ByteSize()
    graph = model.graph
    size = 0
    for t in graph.initializer:
        n = len(t.raw_data) if t.HasField("raw_data") else 0  # (reading raw_data copies it: once)
        if n >= _SIZED_APART:
            t_size = _without(t, "raw_data").ByteSize() + _field(1, n)  # raw_data is field 9: 1-byte tag
        else:
            t_size = t.ByteSize()
        size += _field(1, t_size)  # GraphProto.initializer is field 5: 1-byte tag
    size += _without(graph, "initializer").ByteSize()
    return _without(model, "graph").ByteSize() + _field(1, size)  # ModelProto.graph is field 7


_VALUES = ("raw_data", "float_data", "double_data", "int32_data")  # where float tensors keep their values


def skeleton(model: onnx.ModelProto, keep: int = 64, *, dims: bool = True) -> onnx.ModelProto:
    """A copy whose float tensors of more than `keep` elements hold no values, made without
    copying the main graph's weights. `dims`: they keep their dims (all shape inference
    reads of them); else they become empty tensors (dims [0]: what onnx's checker, which
    checks a tensor's bytes against its dims, passes without the values)."""
    from .macs import all_graphs

    out = _without(model, "graph")
    out.graph.CopyFrom(_without(model.graph, "initializer"))
    out.graph.initializer.extend(_emptied(t, dims) if _strip(t, keep) else t for t in model.graph.initializer)
    for g in all_graphs(out.graph):  # subgraphs' tensors and Constant nodes: copied, emptied here
        tensors = [a.t for n in g.node for a in n.attribute if a.name == "value"]
        for t in tensors + (list(g.initializer) if g is not out.graph else []):
            if _strip(t, keep):
                t.CopyFrom(_emptied(t, dims))
    return out


def _strip(t: onnx.TensorProto, keep: int) -> bool:
    return t.data_type in FLOAT_TYPES and math.prod(t.dims) > keep and t.data_location != onnx.TensorProto.EXTERNAL


def _emptied(t: onnx.TensorProto, dims: bool) -> onnx.TensorProto:
    out = _without(t, *_VALUES)
    if not dims:
        del out.dims[:]
        out.dims.append(0)
    return out


def _field(tag_bytes: int, length: int) -> int:
    """Bytes of a length-delimited field whose content is `length` bytes."""
    return tag_bytes + max(1, (length.bit_length() + 6) // 7) + length


def _without(message, *names: str):
    """A copy of `message` without the fields `names` (the others copied, not serialised)."""
    out = type(message)()
    for field in message.DESCRIPTOR.fields:  # not ListFields(): it would read `names` too
        if field.name in names:
            continue
        value = getattr(message, field.name)
        if hasattr(value, "extend"):  # a repeated field
            getattr(out, field.name).extend(value)
        elif field.has_presence and not message.HasField(field.name):
            continue
        elif field.type == field.TYPE_MESSAGE:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def normalise_versions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Clamp the IR version to what the installed runtime accepts (opset is kept); raise an
    IR version older than the opsets need, or older than 4 (IR 3 wants every initializer
    listed as a graph input, which the weights tnonnx adds are not)."""
    max_ir, _ = runtime_limits()
    if model.ir_version > max_ir or model.ir_version == 0:
        model.ir_version = max_ir
    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except Exception:  # noqa: BLE001 - an opset onnx does not know: leave the version alone
        needed = model.ir_version
    model.ir_version = min(max(model.ir_version, needed, 4), max_ir)
    return model


def save(model: onnx.ModelProto, path, *, external_data: bool | None = None, progress=None) -> Path:
    """Write atomically: to temporary files in the same folder, then rename.

    External data is used when the model is over PROTO_LIMIT, when it came with external
    data, or when asked for; the data file is `<name>.data` beside the model. Weights still
    in the input's data file are copied from it byte for byte. `progress(bytes_written)`
    is called after each tensor written to the data file.
    """
    path = Path(path)
    if external_data is None:
        external_data = came_with_external_data(model) or nbytes(model) > PROTO_LIMIT
    base = external.base_dir(model)
    model = _copy(model)
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key in (external.BASE_KEY, _UPGRADED):
            del model.metadata_props[i]
    normalise_versions(model)
    if path.is_dir():
        raise TnonnxError(f"output '{path}': is a directory")
    if not external_data and base is not None:
        onnx.load_external_data_for_model(model, base)
    tmps = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path.name, path.parent)
        tmps.append(tmp)
        if external_data:
            data_name = path.name + ".data"
            data_tmp = _temporary(data_name, path.parent)
            tmps.append(data_tmp)
            external.write_data_file(model, base, Path(data_tmp), data_name, progress)
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        if external_data:
            os.replace(data_tmp, path.parent / data_name)
        os.replace(tmp, path)
    except BaseException as exc:
        for p in tmps:
            if os.path.exists(p):
                os.unlink(p)
        if isinstance(exc, OSError):  # disk full, permissions: the user's to fix
            raise TnonnxError(f"output '{path}': cannot write it ({exc.strerror or _short(exc)})") from None
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    """Write a side file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary(path.name, path.parent)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise TnonnxError(f"output '{path}': cannot write it ({exc.strerror or _short(exc)})") from None
    return path


def _temporary(name: str, folder: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    # mkstemp creates the file 0600; give it the permissions of an ordinary new file
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(external.is_external(t) for t in external.tensors(model))


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
