"""What each --target may emit and what is checked on its output.

- cpu: onnxruntime's CPU provider in the weights' own precision (what tnonnx always did).
- edge: default-domain ops only (no Einsum, contrib or custom ops), every tensor an
  emitted subgraph produces of rank <= 4, grouped convs only depthwise or group 1, input
  shapes fixed where --shape gives them; the ORT format (`.ort`) and its
  required-operators configuration are written with onnxruntime's own conversion tool,
  and the `.ort` is loaded and checked against the `.onnx`.
- gpu: fp16 with fp32 inputs and outputs (fp16.py), checked against the CUDA provider's
  kernel list (cuda_kernels.py).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import TnonnxError

TARGETS = ("cpu", "gpu", "edge")
EDGE_MAX_RANK = 4
EDGE_FORBIDDEN = ("Einsum",)
# the .ort keeps only basic (platform-independent) optimizations; the rest are replayed at
# load time, so the file suits any device and the reduced build needs standard kernels only
ORT_OPTIMIZATION_STYLE = "Runtime"


@dataclass(frozen=True)
class Target:
    """--target and what goes with it."""

    name: str = "cpu"
    max_model_bytes: int | None = None
    short_names: bool = False  # --short-names

    def emission(self, emit: str) -> str:
        """The emission the target allows for `emit` (edge: plain MatMul chains over 2-D rows)."""
        if self.name not in TARGETS:
            raise TnonnxError(f"--target {self.name}: choose from {', '.join(TARGETS)}")
        if self.name == "edge":
            if emit not in ("auto", "matmul"):
                raise TnonnxError(f"--target edge: --emit {emit} is not allowed (standard MatMul chains only: "
                                  "give --emit auto or matmul)")
            return "rows"
        if self.name == "gpu" and emit == "custom":
            raise TnonnxError("--target gpu: --emit custom is a CPU kernel; give another --emit")
        return emit


@dataclass
class TargetReport:
    """What the output uses and what was checked for its target."""

    target: str
    ops: list[str] = field(default_factory=list)  # domain:op_type@opset
    checks: list[dict] = field(default_factory=list)  # {"check", "ok", "detail"}
    ort_version: str | None = None  # the onnxruntime the .ort needs (that version or newer)
    files: dict = field(default_factory=dict)  # suffix -> bytes/str written beside the model (edge)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def add(self, check: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"check": check, "ok": bool(ok), "detail": detail})

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "ops": self.ops, "checks": self.checks,
                "ort_version": self.ort_version, "files": sorted(self.files)}


def ops_used(model: onnx.ModelProto) -> list[str]:
    """Every op type of the main graph as domain:op@opset (ai.onnx for the default domain)."""
    opsets = {(i.domain or "ai.onnx"): i.version for i in model.opset_import}
    found = {((n.domain or "ai.onnx"), n.op_type) for n in model.graph.node}
    return [f"{d}:{op}@{opsets.get(d, '?')}" for d, op in sorted(found)]


def fix_shapes(model: onnx.ModelProto, shapes: dict | None) -> None:
    """Fix the given inputs' shapes (--shape) in place, and the output shapes that follow."""
    if not shapes:
        return
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes

    for inp in model.graph.input:
        if inp.name not in shapes:
            continue
        dims, wanted = inp.type.tensor_type.shape.dim, [int(d) for d in shapes[inp.name]]
        if len(dims) != len(wanted):
            raise TnonnxError(f"--shape {inp.name}: {len(wanted)} dims given, the input has {len(dims)}")
        for i, (d, v) in enumerate(zip(dims, wanted)):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != v:
                raise TnonnxError(f"--shape {inp.name}: dim {i} is fixed at {d.dim_value} in the model, not {v}")
            d.Clear()
            d.dim_value = v
    try:
        fix_output_shapes(model)
    except Exception:  # outputs whose shape inference cannot fix stay as they were
        pass


def edge_violations(model: onnx.ModelProto, emitted: set[str]) -> list[str]:
    """The edge rules the model breaks: non-default domains, forbidden ops anywhere; tensors
    of rank > 4 and grouped convs that are not depthwise among the nodes in `emitted`."""
    out = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            out.append(f"{node.name or node.op_type}: {node.domain}:{node.op_type} is not a default-domain op")
        elif node.op_type in EDGE_FORBIDDEN:
            out.append(f"{node.name or node.op_type}: {node.op_type} is not allowed")
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) if v.type.tensor_type.HasField("shape")}
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name not in emitted:
            continue
        for o in node.output:
            if ranks.get(o, 0) > EDGE_MAX_RANK:
                out.append(f"{node.name}: output '{o}' has rank {ranks[o]} (> {EDGE_MAX_RANK})")
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            w = weights.get(node.input[1])
            if w is None or w.dims[1] != 1:
                out.append(f"{node.name}: grouped conv (group {group}) that is not depthwise")
    return out


def convert_to_ort(model: onnx.ModelProto, stem: str) -> tuple[bytes, str]:
    """The model in ORT format and its required-operators configuration, written by
    onnxruntime.tools.convert_onnx_models_to_ort."""
    with tempfile.TemporaryDirectory(prefix="tnonnx-ort-") as tmp:
        src = Path(tmp) / f"{stem}.onnx"
        onnx.save_model(model, src)
        out = Path(tmp) / "out"
        done = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
                               "--output_dir", str(out), "--optimization_style", ORT_OPTIMIZATION_STYLE],
                              capture_output=True, text=True)
        orts = sorted(out.glob("*.ort"))
        configs = sorted(out.glob("*.config"))
        if done.returncode != 0 or not orts or not configs:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TnonnxError(f"--target edge: onnxruntime's ORT conversion failed ({last[0][:200]})")
        config = "\n".join(line for line in configs[0].read_text().splitlines()
                           if not line.startswith("# -"))  # drop the temporary path it names
        return orts[0].read_bytes(), config + "\n"


def ort_session(ort_bytes: bytes):
    """An onnxruntime session on an ORT-format model (from its bytes, through a file)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="tnonnx-ort-") as tmp:
        path = Path(tmp) / "model.ort"
        path.write_bytes(ort_bytes)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise TnonnxError(f"--target edge: the .ort does not load ({str(exc).splitlines()[0][:200]})") from None


def check_size(model: onnx.ModelProto, limit: int | None, extra: dict | None = None) -> None:
    """--max-model-bytes: TnonnxError naming the largest tensors when the output (or a file
    written with it, `extra`: name -> size) is larger."""
    if limit is None:
        return
    sizes = {"the model": model.ByteSize(), **(extra or {})}
    over = {k: v for k, v in sizes.items() if v > limit}
    if not over:
        return
    largest = sorted(model.graph.initializer, key=lambda t: -len(t.raw_data) or -t.ByteSize())[:5]
    listed = ", ".join(f"{t.name} {list(t.dims)} {t.ByteSize():,} B" for t in largest)
    what = "; ".join(f"{k} is {v:,} bytes" for k, v in over.items())
    raise TnonnxError(f"--max-model-bytes {limit:,}: {what}; largest tensors: {listed}; nothing written")


def short_names(model: onnx.ModelProto) -> int:
    """--short-names: the main graph's nodes and internal tensors renamed to short ids (graph
    inputs and outputs keep theirs, and so do the names a subgraph reads), doc strings
    dropped. In a small quantized model the names of the quantizers' tensors are a third of
    the file. Returns the bytes saved."""
    before = model.ByteSize()
    g = model.graph
    keep = {v.name for v in (*g.input, *g.output)} | _subgraph_names(g)
    fresh = (f"t{i}" for i in range(10**9))
    mapping = {}
    for name in [t.name for t in g.initializer] + [x for n in g.node for x in (*n.input, *n.output)]:
        if name and name not in keep and name not in mapping:
            mapping[name] = next(t for t in fresh if t not in keep)
    for t in g.initializer:
        t.name = mapping.get(t.name, t.name)
        t.doc_string = ""
    for v in g.value_info:
        v.name = mapping.get(v.name, v.name)
    for i, node in enumerate(g.node):
        node.name, node.doc_string = f"n{i}", ""
        node.input[:] = [mapping.get(x, x) for x in node.input]
        node.output[:] = [mapping.get(x, x) for x in node.output]
    return before - model.ByteSize()


def _subgraph_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name used inside the subgraphs of `graph`'s nodes (at any depth)."""
    out = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                out |= {v.name for v in (*sub.input, *sub.output, *sub.initializer)}
                out |= {x for n in sub.node for x in (*n.input, *n.output)}
                out |= _subgraph_names(sub)
    return out
