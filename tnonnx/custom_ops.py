"""tnonnx's C++ custom operators for ONNX Runtime: build the library, find it, emit its node.

One operator, ``ai.tnonnx::ContractionChain``, runs a whole factorised dense layer (any
`Chain` that `run_chain` executes: svd, tt, tr, ntt with its activations, ...) in a single
node. It interprets the same plan as `run_chain`, step by step, so it computes what the
standard-op chain computes (see custom_ops/README.md for the attributes).

The library is compiled from ``custom_ops/tnonnx_ops.cc`` against the ONNX Runtime C/C++
headers, which the PyPI wheel does not ship. They come from, in order: the folder given to
`build`, the ``ORT_INCLUDE_DIR`` environment variable, or Debian's ``libonnxruntime-dev``
package (a pinned version, checked by sha256), downloaded with ``apt-get`` run on a private
sources list and state folder (no root, the system's apt configuration is not touched); the
download is tnonnx.ort_headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from . import macs, macs_ops
from .emit import Builder, Chain, core_matrix_np
from .errors import TnonnxError
from .ort_headers import (ENV_INCLUDE, _HEADER, HeadersUnavailable, _header_dir, _local_headers, _umask,
                          _write_atomic, fetch_headers)

DOMAIN = "ai.tnonnx"
OP_TYPE = "ContractionChain"
OP_VERSION = 1
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu")

ENV_LIBRARY = "TNONNX_CUSTOM_OPS"  # path of a built library, used as is

_REPO = Path(__file__).resolve().parents[1]
# a source checkout's custom_ops/, else the copy an installed wheel carries (tnonnx/_custom_ops)
_CHECKOUT = (_REPO / "custom_ops" / "tnonnx_ops.cc").is_file()
SOURCE = (_REPO / "custom_ops" if _CHECKOUT else Path(__file__).resolve().parent / "_custom_ops") / "tnonnx_ops.cc"
SOURCES = (SOURCE, SOURCE.with_name("tnonnx_kernels.h"))  # what the library is built from
LIBRARY_NAME = "libtnonnx_ops" + (".dylib" if sys.platform == "darwin" else ".so")
# -fno-trapping-math lets the activations vectorise; -ffp-contract=fast fuses multiply-adds
CXXFLAGS = ["-std=c++17", "-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast",
            "-fno-trapping-math", "-fno-math-errno"]


class NoCompiler(TnonnxError):
    """No C++ compiler on this machine."""


# ------------------------------------------------------------------------- emission


def chain_attributes(chain: Chain) -> dict:
    """The node attributes encoding `run_chain`'s plan of `chain` (see custom_ops/README.md)."""
    if chain.activation is not None and chain.activation not in ACTIVATIONS:
        raise TnonnxError(f"--emit custom: activation '{chain.activation}' is not supported "
                          f"(supported: {', '.join(ACTIVATIONS)})")
    sizes, labels = chain.sizes, list(chain.in_labels)
    ranks, dims, perms, splits, new_sizes = [], [], [], [], []
    for keep, free, contracted, new in chain.plan():
        ranks.append(len(labels))
        dims += [sizes[l] for l in labels]
        perms += [labels.index(l) for l in keep + free + contracted]
        splits += [len(keep), len(free), len(contracted)]
        new_sizes.append(math.prod(sizes[l] for l in new))
        labels = keep + free + new
    return dict(activation=chain.activation or "none", in_features=chain.in_features,
                out_features=chain.out_features, ranks=ranks, dims=dims, perms=perms, splits=splits,
                new_sizes=new_sizes, out_dims=[sizes[l] for l in labels],
                out_perm=[labels.index(l) for l in chain.out_labels])


def emit_chain_custom(builder: Builder, x: str, chain: Chain, cores: dict, batch_rank: int) -> str:
    """One ContractionChain node computing `run_chain(chain)` on x [*batch, N] -> [*batch, M].

    The cores go in as weights laid out like OnnxOps' MatMul operands (shared between layers
    that share a weight, stored in the replaced weight's dtype). The kernel computes in
    float32: layers of another dtype get Casts around the node."""
    attrs = chain_attributes(chain)
    weights = [builder.weight(core_matrix_np(cores[core.key], core.labels, keep, contracted, new, chain.sizes), "core")
               for core, (keep, free, contracted, new) in zip(chain.steps, chain.plan())]
    compute = np.dtype(builder.compute_dtype)
    if compute != np.float32:
        f32 = onnx.TensorProto.FLOAT
        x = builder.op("Cast", [x], "cast", to=f32)
        weights = [builder.op("Cast", [w], "cast", to=f32) for w in weights]
    y = builder.op(OP_TYPE, [x, *weights], "chain", domain=DOMAIN, **attrs)
    if compute != np.float32:
        y = builder.op("Cast", [y], "cast", to=helper.np_dtype_to_tensor_dtype(compute))
    return y


def needs_library(model) -> bool:
    """Whether `model` (ModelProto) has a node of the tnonnx custom-op domain (subgraphs too)."""
    return any(node.domain == DOMAIN for _, node, _ in macs.iter_nodes(model))


def _step_products(node) -> list[tuple[int, int, int, int]]:
    """(K, F, C, N) of every step of a ContractionChain node, from its attributes."""
    a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    out, at = [], 0
    for i, rank in enumerate(a["ranks"]):
        dims, perm = a["dims"][at:at + rank], a["perms"][at:at + rank]
        nk, nf, _ = a["splits"][3 * i:3 * i + 3]
        size = [dims[p] for p in perm]
        out.append((math.prod(size[:nk]), math.prod(size[nk:nk + nf]), math.prod(size[nk + nf:]), a["new_sizes"][i]))
        at += rank
    return out


def _count(node, ins, outs):
    """MACs of a ContractionChain node: rows x sum over steps of K F C N."""
    x = ins[0] if ins else None
    if x is None or len(x) == 0:
        return None
    return math.prod(x[:-1]) * sum(k * f * c * n for k, f, c, n in _step_products(node))


macs_ops.COUNTERS[(DOMAIN, OP_TYPE)] = _count

_ATTRIBUTES = {"activation": "STRING", "in_features": "INT", "out_features": "INT", "ranks": "INTS", "dims": "INTS",
               "perms": "INTS", "splits": "INTS", "new_sizes": "INTS", "out_dims": "INTS", "out_perm": "INTS"}


def _infer(ctx) -> None:
    """onnx shape inference for ContractionChain: x's shape, last axis out_features."""
    x = ctx.get_input_type(0)
    out_features = ctx.get_attribute("out_features")
    if x is None or not x.tensor_type.HasField("shape") or out_features is None:
        ctx.set_output_type(0, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, None))
        return
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in x.tensor_type.shape.dim]
    ctx.set_output_type(0, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, dims[:-1] + [out_features.i]))


def _register_schema() -> None:
    """Tell onnx about the op (checker, shape inference: the MAC count of the layers after
    a custom node needs their shapes). Needs onnx >= 1.16; skipped on older versions."""
    defs = onnx.defs
    schema_class = getattr(defs, "OpSchema", None)
    if not hasattr(defs, "register_schema") or not hasattr(schema_class, "set_type_and_shape_inference_function"):
        return
    try:
        defs.get_schema(OP_TYPE, OP_VERSION, DOMAIN)
        return  # registered already
    except defs.SchemaError:
        pass
    param = schema_class.FormalParameter
    schema = schema_class(
        OP_TYPE, DOMAIN, OP_VERSION, "A factorised dense layer as one contraction chain (custom_ops/README.md).",
        inputs=[param("x", "T", "input, last axis in_features"),
                param("cores", "T", "one core per step, ([K,] C, N)",
                      param_option=schema_class.FormalParameterOption.Variadic, min_arity=1)],
        outputs=[param("y", "T", "output, last axis out_features")],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[schema_class.Attribute(name, getattr(schema_class.AttrType, kind), "", required=True)
                    for name, kind in _ATTRIBUTES.items()])
    schema.set_type_and_shape_inference_function(_infer)
    defs.register_schema(schema)


_register_schema()


# ------------------------------------------------------------------------- locating


def default_build_dir() -> Path:
    """`build/custom_ops` of a source checkout, else the user's cache folder."""
    if _CHECKOUT:
        return _REPO / "build" / "custom_ops"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tnonnx" / "custom_ops"


def library_path() -> Path | None:
    """Where a built library is: $TNONNX_CUSTOM_OPS if set, else the default build
    location; None when nothing is built there."""
    env = os.environ.get(ENV_LIBRARY)
    if env:
        path = Path(env)
        if not path.is_file():
            raise TnonnxError(f"{ENV_LIBRARY}='{env}': no such file")
        return path
    path = default_build_dir() / LIBRARY_NAME
    return path if path.is_file() else None


def ensure_library() -> Path:
    """The library to load for a model that uses the custom ops. Built here when it is
    missing or older than its source, if a compiler and local headers allow it (nothing is
    downloaded); otherwise a one-line TnonnxError saying to run `tnonnx build-ops`."""
    path = library_path()
    if os.environ.get(ENV_LIBRARY):
        return path
    if path is not None and _stamp(path).get("source") == _source_digest():
        return path
    if SOURCE.is_file() and _compiler() and _local_headers(default_build_dir()):
        return build()
    if path is not None:
        return path
    raise TnonnxError(f"this model uses tnonnx custom ops (domain {DOMAIN}) and their library is not built: "
                      f"run `tnonnx build-ops` (or set {ENV_LIBRARY} to a built library)")


# ------------------------------------------------------------------------- building


def build(include_dir=None, out_dir=None, force: bool = False, native: bool = False, log=None) -> Path:
    """Compile the custom-op library; returns its path.

    Headers: `include_dir`, else $ORT_INCLUDE_DIR, else headers fetched earlier into
    `out_dir`, else Debian's package downloaded there. The library is rebuilt only when the
    source, the headers or the flags change (or with `force`). `native` adds
    -march=native (faster, not portable to other CPUs). `log(message)` reports progress."""
    log = log or (lambda message: None)
    if not SOURCE.is_file():
        raise TnonnxError(f"the C++ source '{SOURCE}' is not there: build the custom ops from a tnonnx source checkout")
    cxx = _compiler()
    if cxx is None:
        raise NoCompiler("no C++ compiler found (install g++ or clang++, or set CXX)")
    out = Path(out_dir) if out_dir else default_build_dir()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TnonnxError(f"--out-dir '{out}': cannot create it ({exc.strerror or exc})") from None
    include = find_headers(include_dir, out, log)
    flags = CXXFLAGS + (["-march=native"] if native else [])
    key = _digest(_source_digest().encode(), (include / "onnxruntime_c_api.h").read_bytes(),
                  " ".join([cxx, *flags]).encode())
    lib = out / LIBRARY_NAME
    if not force and lib.is_file() and _stamp(lib).get("key") == key:
        return lib
    log(f"compiling {SOURCE.name} with {cxx}")
    fd, tmp = tempfile.mkstemp(prefix=f".{LIBRARY_NAME}.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, f"-I{include}", str(SOURCE), "-o", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise TnonnxError(f"compiling {SOURCE.name} failed: {_first_error(done.stderr)}")
        os.chmod(tmp, 0o755 & ~_umask())
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _write_atomic(_stamp_path(lib), json.dumps({"key": key, "source": _source_digest(), "include": str(include),
                                                "flags": flags, "compiler": cxx}, indent=1).encode())
    return lib


def find_headers(include_dir=None, build_dir=None, log=None) -> Path:
    """The folder holding onnxruntime_cxx_api.h (see `build` for the order searched)."""
    log = log or (lambda message: None)
    for given, what in ((include_dir, "--include-dir"), (os.environ.get(ENV_INCLUDE), ENV_INCLUDE)):
        if given:
            found = _header_dir(Path(given))
            if found is None:
                raise HeadersUnavailable(f"{what} '{given}': no {_HEADER} there "
                                         "(nor in its include/ or onnxruntime/ subfolders)")
            return found
    build_dir = Path(build_dir) if build_dir else default_build_dir()
    return _local_headers(build_dir) or fetch_headers(build_dir, log)


def _compiler() -> str | None:
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env)
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _first_error(stderr: str) -> str:
    lines = [l.strip() for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l]
    return (errors or lines or ["no output"])[0][:300]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _source_digest() -> str:
    return _digest(*(p.read_bytes() for p in SOURCES if p.is_file()))


def _stamp_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".json")


def _stamp(lib: Path) -> dict:
    try:
        return json.loads(_stamp_path(lib).read_text())
    except (OSError, ValueError):
        return {}


