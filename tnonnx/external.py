"""Weights kept in external data files: read on demand, copied without decoding.

A model loaded from a file with external data keeps its tensors as references (location,
offset, length) into the data file; the folder they are relative to is recorded in the
model's metadata (key BASE_KEY, dropped on save). Nothing here ever serialises a message
holding the weights, so models past protobuf's 2 GB limit load, rewrite and save.

Weights are read with explicit reads (np.fromfile), not memory maps: a mapped page once
touched stays in the process's resident set until the map is closed, so fitting layer
after layer through maps would grow to the model's size; a read buffer goes with the layer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

BASE_KEY = "tnonnx.external_data"
# Tensors smaller than this are read into the graph at load time (biases, shapes, norms):
# they cost nothing to hold and every consumer can then treat them as ordinary constants.
EAGER_BELOW = 1 << 20
# Tensors at least this large are moved to the data file when a model is saved with external data.
SIZE_THRESHOLD = 1024
ALIGN = 4096  # data-file offsets; lets onnxruntime map tensors rather than copy them
_CHUNK = 16 << 20


@dataclass
class Traffic:
    """Bytes of weights read from and written to data files (for progress and tests)."""

    read: int = 0
    written: int = 0
    tensors_read: list = field(default_factory=list)

    def reset(self) -> None:
        self.read = self.written = 0
        self.tensors_read.clear()


traffic = Traffic()


def tensors(model: onnx.ModelProto):
    """Every tensor of the model: initializers and Constant values, subgraphs included."""
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def base_dir(model: onnx.ModelProto) -> str | None:
    """The folder the model's external data is read from, if it was loaded with some."""
    for p in model.metadata_props:
        if p.key == BASE_KEY:
            return p.value
    return None


def entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def span(tensor: onnx.TensorProto, base: str) -> tuple[Path, int, int]:
    """(data file, offset, length) of an external tensor."""
    info = entries(tensor)
    path = Path(base) / info["location"]
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else path.stat().st_size - offset
    return path, offset, length


def check_spans(model: onnx.ModelProto, base: str) -> None:
    """ValueError naming the first external tensor whose data file is missing or too short."""
    sizes: dict[Path, int] = {}
    for t in tensors(model):
        if not is_external(t):
            continue
        location = entries(t).get("location")
        if location is None:
            raise ValueError(f"tensor '{t.name}' has no data-file location")
        if os.path.isabs(location) or ".." in Path(location).parts:
            raise ValueError(f"tensor '{t.name}': data-file location '{location}' is outside the model's folder")
        path, offset, length = span(t, base)
        if path not in sizes:
            if not path.is_file():
                raise ValueError(f"data file '{path.name}' of tensor '{t.name}' not found beside the model")
            sizes[path] = path.stat().st_size
        if offset + length > sizes[path]:
            raise ValueError(f"tensor '{t.name}' runs past the end of '{path.name}' (truncated data file)")


def emptied(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each external tensor made an empty inline one: what onnx's checker can
    check without the data files (relative locations it would look up in the current folder)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in tensors(out):
        if is_external(t):
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            del t.dims[:]
            t.dims.append(0)
    return out


def data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the model keeps in external files."""
    total = 0
    for t in tensors(model):
        if is_external(t):
            info = entries(t)
            total += int(info["length"]) if "length" in info else _dense_bytes(t)
    return total


def read_small(model: onnx.ModelProto, base: str) -> None:
    """Bring tensors under EAGER_BELOW into the model; the big ones stay references."""
    for t in tensors(model):
        if is_external(t) and span(t, base)[2] < EAGER_BELOW:
            onnx.external_data_helper.load_external_data_for_tensor(t, base)
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def lazy_or_array(tensor: onnx.TensorProto, base: str | None):
    """A Lazy for an external tensor (nothing read yet), else the tensor's array."""
    if is_external(tensor) and base is not None:
        return Lazy.of(tensor, base)
    return numpy_helper.to_array(tensor)


@dataclass(frozen=True)
class Lazy:
    """A weight still in its data file: shape and dtype known, values read by read().

    Transposes, casts and scalings are recorded and applied after the read, so a chain
    Identity/Transpose/Cast in front of a MatMul costs nothing until the layer is fitted."""

    path: str
    offset: int
    length: int
    stored: np.dtype
    dims: tuple[int, ...]
    name: str = ""
    ops: tuple = ()  # ("transpose", perm) | ("astype", dtype) | ("scale", factor)

    @classmethod
    def of(cls, tensor: onnx.TensorProto, base: str) -> "Lazy":
        path, offset, length = span(tensor, base)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
        return cls(str(path), offset, length, dtype, tuple(int(d) for d in tensor.dims), tensor.name)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.dims
        for op, arg in self.ops:
            if op == "transpose":
                perm = arg if arg is not None else tuple(reversed(range(len(shape))))
                shape = tuple(shape[p] for p in perm)
        return shape

    @property
    def dtype(self) -> np.dtype:
        dtype = self.stored
        for op, arg in self.ops:
            if op == "astype":
                dtype = np.dtype(arg)
        return dtype

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def key(self) -> str:
        """Equal for two Lazys that read the same bytes the same way (the weight's identity)."""
        return f"{os.path.basename(self.path)}@{self.offset}+{self.length}:{self.ops}"

    def transpose(self, perm=None) -> "Lazy":
        return self._then("transpose", tuple(perm) if perm is not None else None)

    @property
    def T(self) -> "Lazy":
        return self.transpose()

    def astype(self, dtype) -> "Lazy":
        return self._then("astype", np.dtype(dtype).str)

    def __mul__(self, factor) -> "Lazy":
        return self._then("scale", float(factor))

    def _then(self, op, arg) -> "Lazy":
        return Lazy(self.path, self.offset, self.length, self.stored, self.dims, self.name, self.ops + ((op, arg),))

    def read(self, dtype=None) -> np.ndarray:
        """The values, with the recorded operations applied (and cast to `dtype` if given)."""
        if self.stored.itemsize * self.size != self.length or self.stored == np.dtype(object):
            raise ValueError(f"tensor '{self.name}': {self.length} bytes in the data file for "
                             f"{self.size} values of {self.stored}")
        arr = self._values(np.dtype(dtype) if dtype is not None and not self.ops else self.stored)
        traffic.read += self.length
        traffic.tensors_read.append(self.name)
        for op, arg in self.ops:
            if op == "transpose":
                arr = np.transpose(arr, arg)
            elif op == "astype":
                arr = arr.astype(arg)
            else:
                arr = (arr * arg).astype(arr.dtype)
        return np.ascontiguousarray(arr, dtype=dtype)

    def _values(self, dtype: np.dtype) -> np.ndarray:
        """The stored values as `dtype`, read in blocks straight into the result (a float32
        weight wanted as float64 never exists twice in memory)."""
        out = np.empty(self.size, dtype)
        step = max(1, _CHUNK // self.stored.itemsize)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for i in range(0, self.size, step):
                n = min(step, self.size - i)
                block = np.fromfile(f, dtype=self.stored.newbyteorder("<"), count=n)
                if block.size != n:
                    raise ValueError(f"tensor '{self.name}': data file '{self.path}' ends early")
                out[i:i + n] = block
        return out.reshape(self.dims)

    def __array__(self, dtype=None, copy=None):
        return self.read(dtype)


def _dense_bytes(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def write_data_file(model: onnx.ModelProto, base: str | None, data_path: Path, location: str,
                    progress=None) -> None:
    """Move every tensor of `model` (in place) into one new data file: external tensors are
    copied byte for byte from their data files, inline tensors of SIZE_THRESHOLD bytes or
    more are written out; each then refers to `location` (the data file's final name).
    `progress(bytes_written)` is called after each tensor."""
    with open(data_path, "wb") as out:
        for t in tensors(model):
            if is_external(t):
                if base is None:
                    raise ValueError(f"tensor '{t.name}' refers to external data but the model's folder is unknown")
                src, offset, length = span(t, base)
                start = _pad(out)
                with open(src, "rb") as f:
                    _copy_range(f, out, offset, length)
            elif t.HasField("raw_data") and len(t.raw_data) >= SIZE_THRESHOLD:
                start, length = _pad(out), len(t.raw_data)
                out.write(t.raw_data)
                t.ClearField("raw_data")
            elif not t.HasField("raw_data") and t.data_type != onnx.TensorProto.STRING and _dense_bytes(t) >= SIZE_THRESHOLD:
                raw = numpy_helper.to_array(t).astype(
                    np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")).tobytes()
                start, length = _pad(out), len(raw)
                out.write(raw)
                for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(name)
            else:
                continue
            traffic.written += length
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(start)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            if progress is not None:
                progress(traffic.written)
        out.flush()
        os.fsync(out.fileno())


def _pad(out) -> int:
    pos = out.tell()
    start = -(-pos // ALIGN) * ALIGN
    if start > pos:
        out.write(b"\0" * (start - pos))
    return start


def _copy_range(src, dst, offset: int, length: int) -> None:
    """Copy bytes [offset, offset+length) of src to dst's current position, in the kernel
    where it can (copy_file_range), else in chunks: the weight is never decoded."""
    dst.flush()
    left, start = length, dst.tell()
    if hasattr(os, "copy_file_range"):
        try:
            src_pos, dst_pos = offset, start
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), src_pos, dst_pos)
                if n == 0:
                    break
                src_pos, dst_pos, left = src_pos + n, dst_pos + n, left - n
            dst.seek(dst_pos)
        except OSError:  # e.g. across file systems on old kernels: copy in user space
            dst.seek(start)
            dst.truncate()
            left = length
    if left:
        src.seek(offset + length - left)
        while left:
            chunk = src.read(min(left, _CHUNK))
            if not chunk:
                raise OSError(f"data file '{src.name}' ends before the tensor does")
            dst.write(chunk)
            left -= len(chunk)
