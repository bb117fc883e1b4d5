"""Calibration data: feeds for a model (random, from an .npz, from a data reader), batched.
Running a model on them with layer inputs exposed is tnonnx.activations."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from . import feed_hints
from . import model as _model
from .errors import TnonnxError
from .runtime import InputSpec, input_specs

# Size given to a symbolic or unknown dimension that is not the batch axis (axis 0)
# and that the user did not set with --shape (e.g. a sequence length).
DEFAULT_FREE_DIM = 64


# --- shapes ---------------------------------------------------------------------------

def parse_shapes(specs: list[str] | tuple[str, ...] | None) -> dict[str, tuple[int, ...]]:
    """Parse CLI values like ``input:1x3x224x224`` into {name: shape}.

    The name may itself contain ':' (split on the last one); dims are separated by 'x' or ','.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.strip().rpartition(":")
        if not sep or not name:
            raise TnonnxError(f"--shape '{spec}': expected NAME:DIMS, e.g. input:1x3x224x224")
        parts = [p.strip() for p in re.split(r"[x,]", dims.strip().lower())]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise TnonnxError(f"--shape '{spec}': dims must be positive integers separated by 'x', e.g. 1x3x224x224")
        if name in shapes:
            raise TnonnxError(f"--shape '{spec}': input '{name}' given twice")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


def concrete_shapes(
    model: onnx.ModelProto,
    batch: int = 1,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every model input.

    Fixed dims are kept; ``shapes`` overrides an input entirely (same rank, fixed dims must
    agree). Other symbolic/unknown dims: axis 0 -> ``batch``, other axes -> DEFAULT_FREE_DIM.
    A symbolic name set through an override (e.g. "seq") takes that value in every input.
    """
    return _resolve(model, batch, shapes)[0]


def assumed_dims(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[str]:
    """What concrete_shapes assumes beyond the batch axis, one sentence per symbolic or
    unknown dim (e.g. a sequence length) that --shape did not set: "assumed sequence = 64
    for input x (axis 1); set it with --shape x:1x64"."""
    out = []
    for name, axis, dim, example in _resolve(model, 1, shapes)[1]:
        label = dim if isinstance(dim, str) else "an unknown dim"
        out.append(f"assumed {label} = {example[axis]} for input {name} (axis {axis}); "
                   f"set it with --shape {name}:{'x'.join(map(str, example))}")
    return out


def _resolve(model, batch, shapes) -> tuple[dict[str, tuple[int, ...]], list[tuple]]:
    """(concrete_shapes, the assumptions: (input, axis, dim, its shape at batch 1) for each
    dim beyond axis 0 that took DEFAULT_FREE_DIM)."""
    if batch < 1:
        raise TnonnxError(f"batch size must be at least 1, not {batch}")
    specs = input_specs(model)
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise TnonnxError(
            f"--shape names unknown input(s) {', '.join(unknown)}; the model's inputs are: "
            + ", ".join(s.name for s in specs)
        )

    named: dict[str, int] = {}  # symbolic dim name -> value chosen
    for spec in specs:
        if spec.name not in shapes:
            continue
        given = tuple(shapes[spec.name])
        if spec.shape is not None:
            if len(given) != len(spec.shape):
                raise TnonnxError(
                    f"--shape {spec.name}: rank {len(given)} given, but the input has rank "
                    f"{len(spec.shape)} ({_fmt_shape(spec.shape)})"
                )
            for dim, value in zip(spec.shape, given):
                if isinstance(dim, int) and dim > 0 and dim != value:
                    raise TnonnxError(
                        f"--shape {spec.name}: {_fmt_shape(given)} disagrees with the fixed shape {_fmt_shape(spec.shape)}"
                    )
                if isinstance(dim, str):
                    named.setdefault(dim, value)
    for spec in specs:  # axis 0 claims its symbolic name for the batch before other axes do
        if spec.shape and isinstance(spec.shape[0], str):
            named.setdefault(spec.shape[0], batch)
    # a free dim takes DEFAULT_FREE_DIM, or more where the graph's constants need more
    minimum = feed_hints.minimum_lengths(model)
    free = lambda name, axis: max(DEFAULT_FREE_DIM, minimum.get((name, axis), 0))

    result: dict[str, tuple[int, ...]] = {}
    assumed, defaulted = [], set()  # names that took DEFAULT_FREE_DIM
    for spec in specs:
        if spec.name in shapes:
            result[spec.name] = tuple(shapes[spec.name])
            continue
        if spec.shape is None:
            raise TnonnxError(f"input '{spec.name}' has no known rank; give its shape with --shape {spec.name}:DIMS")
        dims, guessed = [], []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, str):
                if axis > 0 and dim not in named:
                    defaulted.add(dim)
                dims.append(named.setdefault(dim, batch if axis == 0 else free(spec.name, axis)))
                if axis > 0 and dim in defaulted:
                    guessed.append((axis, dim))
            else:
                dims.append(batch if axis == 0 else free(spec.name, axis))
                if axis > 0:
                    guessed.append((axis, None))
        result[spec.name] = tuple(dims)
        example = (1,) + tuple(dims[1:])
        assumed += [(spec.name, axis, dim, example) for axis, dim in guessed]
    return result, assumed


def clip(text: str, limit: int = 300) -> str:
    """The first line of `text`, cut at a word boundary with an ellipsis when over `limit`."""
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) <= limit:
        return first
    cut = first[:limit].rsplit(" ", 1)[0] if " " in first[:limit] else first[:limit]
    return cut.rstrip(" ,;:") + "…"


# --- random feeds ---------------------------------------------------------------------

def random_feeds(
    model: onnx.ModelProto,
    batch: int = 1,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs shaped by concrete_shapes(), deterministic for a given seed.

    float: standard normal; bool: fair coin; integers: ones for names containing "mask",
    for one-element inputs a value the graph compares them with, valid indices for inputs
    used as Gather indices into a constant table, else 0 or 1.
    """
    if not isinstance(model, onnx.ModelProto):
        model = _model.load(model)
    rng = np.random.default_rng(seed)
    concrete = concrete_shapes(model, batch, shapes)
    index = feed_hints.GraphIndex(model)
    feeds = {}
    for spec in input_specs(model):
        shape = concrete[spec.name]
        kind = spec.dtype.kind
        if kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        elif kind in "iu":
            seen = feed_hints.compared_value(index, spec.name) if int(np.prod(shape)) == 1 else None
            if "mask" in spec.name.lower():
                feeds[spec.name] = np.ones(shape, spec.dtype)
            elif seen is not None:  # e.g. a sample rate the graph checks against 16000
                feeds[spec.name] = np.full(shape, seen, spec.dtype)
            else:
                high = feed_hints.gather_table_size(index, spec.name) or 2
                feeds[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
        else:
            raise TnonnxError(
                f"input '{spec.name}' has dtype {spec.dtype}, for which no random data can be made; give --inputs"
            )
    return feeds


def random_batches(model: onnx.ModelProto, samples: int, batch: int = 1,
                   shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random feed batches of `batch` samples each (the model's fixed batch size where it has
    one) until at least `samples` samples are made; deterministic for a given seed."""
    out, made = [], 0
    while made < samples:
        feeds = random_feeds(model, batch, shapes, seed + len(out))
        first = next((v for v in feeds.values() if np.ndim(v) >= 1), None)
        out.append(feeds)
        if first is None:  # scalar inputs only: one run is all there is
            break
        made += max(int(np.shape(first)[0]), 1)
    return out


# --- feeds from files and readers -----------------------------------------------------

def load_npz(path: str | os.PathLike, model: onnx.ModelProto,
             what: str = "inputs") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds named after the model's inputs, extra arrays such as ``labels``) from an .npz;
    `what` names the option it came from in messages (--inputs, --calib)."""
    path = Path(path)
    if path.is_dir():
        raise TnonnxError(f"{what} '{path}': is a directory, not an .npz file")
    if not path.is_file():
        raise TnonnxError(f"{what} '{path}': no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise TnonnxError(f"{what} '{path}': not an .npz file ({clip(exc, 120)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TnonnxError(f"{what} '{path}': a single .npy array, not an .npz of named inputs")
    try:
        with data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # a corrupt member
        raise TnonnxError(f"{what} '{path}': cannot read it ({clip(exc, 120)})") from None
    return split_feeds(arrays, model, source=f"{what} '{path}'")


def npz_folder(path: str | os.PathLike, model: onnx.ModelProto, batch: int,
               what: str = "inputs") -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """(feed batches, extras) from every .npz in a folder, in name order. Each file keeps its
    own shapes, so a sequence model can be given batches padded each to their own longest
    sentence instead of all to the longest one (MiniLM's 2,682 lee_background sentences,
    sorted, in batches of 32: 2.9x fewer tokens); a file of more than `batch` samples is
    split as one .npz would be. Extra arrays (labels) are joined in file order where every
    file has them."""
    folder = Path(path)
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise TnonnxError(f"{what} '{folder}': a folder without .npz files")
    batches, extras = [], []
    for f in files:
        feeds, more = load_npz(f, model, what)
        batches.extend(iter_batches(feeds, model, batch))
        extras.append(more)
    joined = {}
    for key in set.intersection(*(set(e) for e in extras)):
        try:
            joined[key] = np.concatenate([e[key] for e in extras])
        except ValueError as exc:
            raise TnonnxError(f"{what} '{folder}': '{key}' cannot be joined across the files ({clip(exc, 120)})") from None
    return batches, joined


def split_feeds(
    arrays: Mapping[str, np.ndarray], model: onnx.ModelProto, *, source: str = "inputs"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Check named arrays against the model's inputs: (feeds cast to input dtypes, extras).

    TnonnxError when an input is missing, a rank or fixed dim disagrees, a dtype cannot be
    cast safely, or the arrays disagree on the number of samples (axis 0).
    """
    specs = input_specs(model)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise TnonnxError(
            f"{source}: missing model input(s) {', '.join(missing)} (it has: {', '.join(arrays) or 'nothing'})"
        )
    feeds = {}
    for spec in specs:
        arr = np.asarray(arrays[spec.name])
        _check_shape(arr, spec, source)
        feeds[spec.name] = _cast(arr, spec, source)
    extras = {k: np.asarray(v) for k, v in arrays.items() if k not in feeds}

    counts = {k: feeds[k].shape[0] for k in _batched(feeds, specs)}
    if "labels" in extras and extras["labels"].ndim >= 1:
        counts["labels"] = extras["labels"].shape[0]
    if len(set(counts.values())) > 1:
        raise TnonnxError(
            f"{source}: arrays disagree on the number of samples (axis 0): "
            + ", ".join(f"{k}={n}" for k, n in counts.items())
        )
    return feeds, extras


def _check_shape(arr: np.ndarray, spec: InputSpec, source: str) -> None:
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape):
        raise TnonnxError(
            f"{source}: '{spec.name}' has shape {_fmt_shape(arr.shape)}, "
            f"but the model input has rank {len(spec.shape)} ({_fmt_shape(spec.shape)})"
        )
    for axis, (dim, n) in enumerate(zip(spec.shape, arr.shape)):
        if axis > 0 and isinstance(dim, int) and dim > 0 and dim != n:
            raise TnonnxError(
                f"{source}: '{spec.name}' has shape {_fmt_shape(arr.shape)}, but the model wants {_fmt_shape(spec.shape)}"
            )


def _cast(arr: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    src, dst = arr.dtype, spec.dtype
    if src == dst:
        return arr
    if np.can_cast(src, dst, "safe") or (src.kind == dst.kind == "f"):
        return arr.astype(dst)
    if src.kind in "iu" and dst.kind in "iu":
        info = np.iinfo(dst)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(dst)
    raise TnonnxError(f"{source}: '{spec.name}' is {src}, which cannot be cast safely to the model's {dst}")


def feeds_from_reader(reader, limit: int | None = None, what: str = "inputs") -> list[dict[str, np.ndarray]]:
    """Drain a CalibrationDataReader-like object: get_next() returns a feed dict or None."""
    if not callable(getattr(reader, "get_next", None)):
        raise TnonnxError(f"{what}: {type(reader).__name__} has no get_next() method")
    batches = []
    while limit is None or len(batches) < limit:
        feed = reader.get_next()
        if feed is None:
            break
        if not isinstance(feed, Mapping):
            raise TnonnxError(f"{what}: get_next() returned {type(feed).__name__}, expected a dict of arrays or None")
        batches.append({k: np.asarray(v) for k, v in feed.items()})
    return batches


# --- batching -------------------------------------------------------------------------

def iter_batches(
    feeds: Mapping[str, np.ndarray], model: onnx.ModelProto, batch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Split feeds along axis 0 into the chunks the model takes.

    Inputs with a symbolic first dim are split into chunks of ``batch`` (the last may be
    smaller); the others (rank 0, or a fixed first dim such as a lookup table) go whole.
    A model whose inputs all have fixed first dims is split into chunks of that size (the
    sample count must be a multiple of it).
    """
    if batch < 1:
        raise TnonnxError(f"batch size must be at least 1, not {batch}")
    specs = input_specs(model)
    batched = _batched(feeds, specs)
    if not batched:
        yield dict(feeds)
        return
    counts = {feeds[k].shape[0] for k in batched}
    if len(counts) > 1:
        raise TnonnxError(f"inputs disagree on the number of samples (axis 0): {sorted(counts)}")
    n = counts.pop()

    by_name = {s.name: s for s in specs}
    fixed = {d for d in (_first_dim(by_name.get(k)) for k in batched) if _is_fixed(d)}
    if len(fixed) > 1:
        raise TnonnxError(f"the model's inputs have different fixed first dims {sorted(fixed)}; pass one batch at a time")
    if fixed:
        size = fixed.pop()
        if n % size:
            raise TnonnxError(f"{n} samples cannot be split into batches of {size}, the model's fixed batch size")
    else:
        size = batch
    for start in range(0, n, size):
        yield {k: (v[start:start + size] if k in batched else v) for k, v in feeds.items()}


def _batched(feeds: Mapping[str, np.ndarray], specs: list[InputSpec]) -> list[str]:
    """Inputs split along axis 0: those whose first dim is symbolic, or, in a model with
    no such input (a fixed batch size), every input of rank >= 1."""
    by_name = {s.name: s for s in specs}
    ranked = [k for k, v in feeds.items() if np.ndim(v) >= 1 and (k not in by_name or by_name[k].rank != 0)]
    free = [k for k in ranked if not _is_fixed(_first_dim(by_name.get(k)))]
    return free or ranked


def _first_dim(spec: InputSpec | None):
    return spec.shape[0] if spec is not None and spec.shape else None


def _is_fixed(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def feed_batches(inputs, model: onnx.ModelProto, *, batch: int = 1, shapes=None, seed: int = 0,
                 chunk: int = 64, what: str = "inputs") -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """(feed batches, extras such as labels) from what a user gives as inputs: None (random
    feeds from the model's shapes), a number of random samples, an .npz path, a folder of
    .npz files (npz_folder), a dict of arrays, or a reader with get_next(). `what` names the
    option in messages (--calib)."""
    extras: dict[str, np.ndarray] = {}
    if inputs is None:
        return [random_feeds(model, batch, shapes, seed)], extras
    if isinstance(inputs, int) and not isinstance(inputs, bool):  # that many random samples
        if inputs < 1:
            raise TnonnxError(f"--calib-random {inputs}: must be >= 1")
        return [random_feeds(model, min(chunk, inputs - i), shapes, seed + i) for i in range(0, inputs, chunk)], extras
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
        return npz_folder(inputs, model, max(batch, chunk), what)
    if isinstance(inputs, (str, os.PathLike)):
        feeds, extras = load_npz(inputs, model, what)
    elif isinstance(inputs, Mapping):
        feeds, extras = split_feeds(inputs, model, source=what)
    elif hasattr(inputs, "get_next"):
        return feeds_from_reader(inputs, what=what), extras
    else:
        raise TnonnxError(
            f"{what}: expected None, a number of random samples, an .npz path, a dict of arrays or a data reader, "
            f"not {type(inputs).__name__}"
        )
    return list(iter_batches(feeds, model, max(batch, chunk))), extras
