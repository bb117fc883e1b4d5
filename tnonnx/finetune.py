"""End-to-end distillation of a rewritten model (--finetune EPOCHS).

Layer-by-layer fitting (tnonnx/fit.py) makes each layer match the original's outputs; what
the user cares about is the model's outputs. After the rewrite, the emitted ONNX graph
itself is executed in torch (an interpreter of the standard ops that exporters and tnonnx
emit), the factor cores and biases the rewrite created become trainable, and Adam, under a
one-cycle learning-rate schedule, minimises the relative squared error to the original
model (run in onnxruntime) on the calibration batches: of all float outputs, and of the
tensors each rewritten layer is fed (hidden-state distillation). What is trained is
exactly the graph that is saved: no separate torch model to keep in sync. The start is kept
if the end is not better on the calibration data.

Precision (`--train-precision`, shared with --fit blockwise and --admm): the training steps
may run their matrix products in bfloat16 (torch autocast); the trained tensors stay float32
(Adam's master copy), and so do the passes that judge the start against the end: a bf16
fine-tuning that ends worse keeps its start, as a float32 one does.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import TnonnxError
from .fit import torch_threads
from .fuse import fuse_gelu
from .macs import all_graphs

LEARNING_RATE = 1e-2  # Adam, relative: each tensor's step is scaled by its RMS
# below this many trainable parameters a step is too small to share among threads (they only
# contend, and collapse on a busy machine): training runs on one; above it (MiniLM at half its
# MatMul parameters: 4.9M) torch's own thread count is kept (2 threads: 1.5x faster there)
SMALL_MODEL_PARAMS = 1_000_000
# the original's hidden tensors are kept for the whole fine-tuning while they take at most this
# share of the memory available, else recomputed per step
HIDDEN_MEMORY_SHARE = 0.25
HIDDEN_WEIGHT = 4.0  # of the mean hidden-tensor error against the output error; MiniLM: 4 > 1 (docs/RESULTS.md)
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX-BF16, Arm
    BF16). Only there are torch's bf16 products faster than float32 (MiniLM's training step:
    1.6x, docs/RESULTS.md); elsewhere they are emulated and slower. Linux only: anywhere
    else the answer is no, and auto means fp32."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise TnonnxError(f"--train-precision {precision}: choose from {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, trainable_params: int, cpuinfo: str = "/proc/cpuinfo") -> str:
    """"fp32" or "bf16" for --train-precision: auto is bf16 where the CPU does it natively and
    the training is large enough for its products to dominate (SMALL_MODEL_PARAMS trained
    parameters or more: LeNet-5's steps are mostly overhead), else fp32."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if trainable_params >= SMALL_MODEL_PARAMS and native_bf16(cpuinfo) else "fp32"


def autocast(precision: str):
    """The context the training steps' forward passes run in: torch's CPU autocast to
    bfloat16 for "bf16", nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16)


def finetune(model: onnx.ModelProto, original: onnx.ModelProto, batches, trainable: set[str], *, epochs: int,
             hidden=(), hidden_weight: float = HIDDEN_WEIGHT, seed: int = 0, log=None,
             penalty=None, epoch_end=None, precision: str = "fp32") -> tuple[float, float]:
    """Train the initializers named in `trainable` (in place in `model`); returns the relative
    output error on the calibration batches before and after. The trained values are kept
    when they end no worse than the start, else the start is (and its error returned).

    `penalty(params)` (a torch scalar) is added to every step's loss and `epoch_end(params)`
    called after each epoch, params being the trainable tensors by name (--admm: the pull
    towards the rank set and its projection step). With a penalty the last epoch is kept,
    not the best: the training is meant to move away from the original.

    `hidden` names tensors that both graphs compute (tnonnx passes the rewritten layers'
    inputs): their values are pulled towards the original's as well, each by its relative
    squared error, averaged and weighted by `hidden_weight`. Matching what every layer is
    fed gives each layer a signal of its own, not only what survives to the outputs
    (through a LayerNorm or a mean pooling, say), and learns much more per sample."""
    import torch

    from . import runtime

    torch.manual_seed(seed)
    names = [o.name for o in original.graph.output]
    computed = {o for n in model.graph.node for o in n.output}
    teacher_model, hidden = runtime.with_outputs(original, [h for h in hidden if h in computed], inputs=False)
    hidden = [h for h in hidden if h not in names]
    sess = runtime.session(teacher_model)
    float_outputs = [i for i, o in enumerate(sess.get_outputs()[:len(names)]) if "float" in o.type]
    targets, stored = _teacher(sess, batches, names, float_outputs, hidden)
    graph = GraphModule(model, trainable)
    feeds = [{k: torch.as_tensor(np.asarray(v)) for k, v in f.items()} for f in batches]
    scales = {name: float(p.detach().pow(2).mean().sqrt()) or 1.0 for name, p in graph.params.items()}
    groups = [{"params": [p], "lr": LEARNING_RATE * scales[name]} for name, p in graph.params.items()]
    opt = torch.optim.Adam(groups)
    # warm up over the first tenth of the steps, then anneal (cosine) to almost nothing:
    # a constant rate stalls at the noise level of single batches
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                   total_steps=max(1, epochs * len(feeds)), pct_start=0.1)
    small = sum(p.numel() for p in graph.params.values()) < SMALL_MODEL_PARAMS

    def error() -> float:
        with torch.no_grad():
            num = den = 0.0
            for f, t in zip(feeds, targets):
                got = _select(graph(f), float_outputs)
                num += sum(float(((g - r) ** 2).sum()) for g, r in zip(got, t))
                den += sum(float((r**2).sum()) for r in t)
            return math.sqrt(num / max(den, 1e-300))

    def loss(i: int):
        with autocast(precision):
            values = graph(feeds[i], names + hidden)
        total = _relative(_select(values[:len(names)], float_outputs), targets[i])
        if hidden:
            if stored is not None:
                wanted, norms = stored[i]
            else:
                wanted = [torch.as_tensor(w) for w in sess.run(hidden, dict(batches[i]))]
                norms = [w.square().sum() for w in wanted]
            total = total + hidden_weight / len(hidden) * sum(
                _relative([g], [w], [n]) for g, w, n in zip(values[len(names):], wanted, norms))
        return total if penalty is None else total + penalty(graph.params)

    with torch_threads(1 if small else None):
        before = error()
        start = {k: v.detach().clone() for k, v in graph.params.items()}
        order = np.random.default_rng(seed)
        for epoch in range(epochs):
            running = 0.0
            for i in order.permutation(len(feeds)):
                opt.zero_grad()
                step = loss(i)
                step.backward()
                opt.step()
                schedule.step()
                running += float(step.detach())
            if epoch_end is not None:
                epoch_end(graph.params)
            if log:
                log(f"finetune epoch {epoch + 1}/{epochs}: mean training loss {running / max(len(feeds), 1):.4g}")
        # measured once at the end, not after every epoch (a pass over the calibration data a
        # third as long as an epoch): the one-cycle schedule ends at a tiny rate, so the last
        # epoch is the one worth keeping; the start is kept when it was better (no penalty)
        after = error()
        if not after <= before and penalty is None:  # (a NaN too)
            store(model, start)
            return before, before
    store(model, {k: v.detach() for k, v in graph.params.items()})
    return before, after


def _teacher(sess, batches, names, float_outputs, hidden):
    """The original's float outputs per batch, and its hidden tensors per batch with their
    squared norms, stored in float16 (float32 where float16 would overflow) while they take
    at most HIDDEN_MEMORY_SHARE of the memory available; else (None) the steps recompute
    them, one onnxruntime run of the original per step (MiniLM on 2,682 sentences: a
    quarter of each epoch). One run per batch gives both."""
    import torch

    from . import runtime

    free = runtime.available_memory()
    room = HIDDEN_MEMORY_SHARE * free if free is not None else 0
    targets, stored, used = [], ([] if hidden else None), 0
    for f in batches:
        values = sess.run(names + (hidden if stored is not None else []), dict(f))
        targets.append([torch.as_tensor(np.asarray(v)) for v in _select(values, float_outputs)])
        if stored is not None:
            kept = [_compact(torch.as_tensor(np.asarray(v))) for v in values[len(names):]]
            used += sum(t.numel() * t.element_size() for t, _ in kept)
            if used > room:
                stored = None  # dropped: recomputed per step from here on
            else:
                stored.append(([t for t, _ in kept], [n for _, n in kept]))
    return targets, stored


def _compact(t):
    """(t in float16 where that holds its values, else as it is; its squared norm). Float16's
    11-bit mantissa is far below the errors trained against. One pass for the norm, one for
    the range, one for the copy: no float32 temporaries."""
    torch = _torch()
    if t.dtype not in (torch.float32, torch.float64):
        return t, t.double().square().sum()
    flat = t.reshape(-1)
    norm2 = torch.dot(flat, flat)
    low, high = torch.aminmax(flat)
    fits = bool(torch.isfinite(norm2)) and max(-float(low), float(high)) <= torch.finfo(torch.float16).max
    return (t.half() if fits else t), norm2


def store(model: onnx.ModelProto, values: dict) -> None:
    """Trained tensors (torch, by initializer name) into `model`'s initializers, in their dtype."""
    by_name = {t.name: t for t in model.graph.initializer}
    for name, value in values.items():
        old = by_name[name]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        old.CopyFrom(numpy_helper.from_array(value.numpy().astype(dtype), name))


def _relative(got, want, norms=None):
    """Relative squared error of a list of tensors against their targets (pooled over the
    list), each tensor in one fused pass and in float32 at least: a bf16 forward pass's
    outputs and float16 stored targets are widened first. `norms`: the targets' squared
    norms when known (the stored hidden targets; MiniLM's 24 per step cost 2.6 s of an
    epoch unfused, 1.5 s so)."""
    torch = _torch()
    num = den = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        dtype = torch.promote_types(torch.promote_types(g.dtype, w.dtype), torch.float32)
        g, w = g.to(dtype), w.to(dtype)
        num = num + torch.nn.functional.mse_loss(g, w, reduction="sum")
        den = den + (w.square().sum() if norms is None else norms[i])
    return num / den.clamp_min(1e-30)


def _select(values, indices):
    return [values[i] for i in indices]


# ---------------------------------------------------------------------------- interpreter


class GraphModule:
    """Runs an ONNX model's main graph on torch tensors. Initializers named in `trainable`
    are float32 leaf tensors with gradients; the others are constants."""

    def __init__(self, model: onnx.ModelProto, trainable: set[str]):
        import torch

        self.graph = model.graph
        self.constants, self.params = {}, {}
        for t in model.graph.initializer:
            array = numpy_helper.to_array(t)
            if t.name in trainable:
                self.params[t.name] = torch.tensor(array.astype(np.float32), requires_grad=True)
            else:
                self.constants[t.name] = torch.as_tensor(np.array(array))
        unknown = sorted({n.op_type for g in all_graphs(model.graph) for n in g.node
                          if (n.op_type not in OPS and n.op_type != "Scan") or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise TnonnxError(f"--finetune: the graph uses ops the torch interpreter does not run: {', '.join(unknown)}")
        # what runs: the graph with its erf GELU chains as one op each (tnonnx/fuse.py)
        self.nodes, self.fused_away = fuse_gelu(model.graph, set(self.params))

    def __call__(self, feeds: dict, names=None) -> list:
        """The graph outputs, or the tensors `names` (any the main graph computes)."""
        names = names if names is not None else [o.name for o in self.graph.output]
        env = dict(self.constants)
        env.update(self.params)
        env.update(feeds)
        _run_nodes(self.graph.node if self.fused_away.intersection(names) else self.nodes, env)
        return [env[n] for n in names]


def _run_nodes(nodes, env: dict) -> None:
    for node in nodes:
        inputs = [env[i] if i else None for i in node.input]
        if node.op_type == "Scan":
            outs = _scan(node, inputs, env)
        else:
            attrs = {a.name: _decoded(helper.get_attribute_value(a)) for a in node.attribute}
            outs = OPS[node.op_type](inputs, attrs)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        env.update(zip(node.output, outs))


def _scan(node, inputs, env: dict) -> list:
    """ONNX Scan over axis 0 (the form tnonnx.recurrent_scan writes): the body runs once per
    step with the outer scope visible; scan outputs are stacked in the output direction."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    body, count = a["body"], a["num_scan_inputs"]
    if any(a.get("scan_input_axes", [])) or any(a.get("scan_output_axes", [])):
        raise TnonnxError("--finetune: Scan over an axis other than 0 is not supported")
    states, scans = list(inputs[: len(inputs) - count]), inputs[len(inputs) - count:]
    directions = a.get("scan_input_directions", [0] * count)
    steps, names = scans[0].shape[0], [i.name for i in body.input]
    torch = _torch()
    scope = dict(env)
    scope.update({t.name: torch.as_tensor(np.array(numpy_helper.to_array(t))) for t in body.initializer})
    per_step = []
    for t in range(steps):
        local = dict(scope)
        local.update(zip(names, states + [s[steps - 1 - t] if d else s[t] for s, d in zip(scans, directions)]))
        _run_nodes(body.node, local)
        outs = [local[o.name] for o in body.output]
        states, ys = outs[: len(states)], outs[len(states):]
        per_step.append(ys)
    stacked = [torch.stack([step[k] for step in per_step]) for k in range(len(per_step[0]))]
    out_dirs = a.get("scan_output_directions", [0] * len(stacked))
    return states + [y.flip(0) if d else y for y, d in zip(stacked, out_dirs)]


def _decoded(value):
    return value.decode() if isinstance(value, bytes) else value


def _torch():
    import torch

    return torch


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _dtype(onnx_type: int):
    torch = _torch()
    return {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
            onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
            onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
            onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8}[onnx_type]


def _constant(inputs, a):
    torch = _torch()
    if "value" in a:
        return torch.as_tensor(np.array(numpy_helper.to_array(a["value"])))
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32), ("value_int", torch.int64),
                       ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise TnonnxError("--finetune: Constant without a supported value attribute")


def _gather(inputs, a):
    data, idx = inputs
    axis = _axis(a.get("axis", 0), data.dim())
    flat = idx.reshape(-1).long() % data.shape[axis]
    out = data.index_select(axis, flat)
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def _unsqueeze(inputs, a):
    x = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(a["axes"])
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(v, rank) for v in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(inputs, a):
    x = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else a.get("axes")
    if axes is None:
        return x.squeeze()
    for axis in sorted((_axis(v, x.dim()) for v in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _slice(inputs, a):
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise TnonnxError("--finetune: Slice with a negative step is not supported")
        dim = x.shape[_axis(ax, x.dim())]
        index[_axis(ax, x.dim())] = slice(max(min(s, dim), -dim), max(min(e, dim), -dim - 1) if e < 0 else min(e, dim), st)
    return x[tuple(index)]


def _reshape(inputs, a):
    x, shape = inputs[0], _ints(inputs[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _div(inputs, a):
    x, y = inputs
    if not x.is_floating_point():
        return _torch().div(x, y, rounding_mode="trunc")
    return x / y


def _reduce(fn):
    def run(inputs, a):
        x = inputs[0]
        axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=[_axis(v, x.dim()) for v in axes], keepdim=keep)
    return run


def _gemm(inputs, a):
    x, w = inputs[0], inputs[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + a.get("beta", 1.0) * inputs[2]
    return y


def _conv(inputs, a):
    from torch.nn import functional as F

    from .nn.modules import _torch_attrs

    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nsp = w.dim() - 2
    pad, stride, dilation, group = _torch_attrs(a, nsp)
    if any(pad):
        x = F.pad(x, pad)
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nsp](x, w, b, stride, 0, dilation, group)


def _conv_transpose(inputs, a):
    """ONNX ConvTranspose: torch's without padding, then ONNX's (asymmetric) pads cropped
    and output_padding appended (positions no input reaches: bias only)."""
    from torch.nn import functional as F

    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nsp = w.dim() - 2
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or a.get("output_shape"):
        raise TnonnxError("--finetune: ConvTranspose with auto_pad or output_shape is not supported")
    stride, dilation = a.get("strides", [1] * nsp), a.get("dilations", [1] * nsp)
    pads, extra = a.get("pads", [0] * 2 * nsp), a.get("output_padding", [0] * nsp)
    y = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nsp](
        x, w, None, stride, 0, 0, a.get("group", 1), dilation)
    y = F.pad(y, [v for i in reversed(range(nsp)) for v in (0, extra[i])])
    y = y[(slice(None), slice(None)) + tuple(slice(pads[i], y.shape[2 + i] - pads[i + nsp]) for i in range(nsp))]
    return y if b is None else y + b.reshape((1, -1) + (1,) * nsp)


def _maxpool(inputs, a):
    from torch.nn import functional as F

    from .nn.modules import _torch_attrs

    x = inputs[0]
    kernel = list(a["kernel_shape"])
    nsp = len(kernel)
    pad, stride, dilation, _ = _torch_attrs(dict(a, strides=a.get("strides", [1] * nsp)), nsp)
    if any(pad):
        x = F.pad(x, pad, value=float("-inf"))
    return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nsp](
        x, kernel, stride, 0, dilation, ceil_mode=bool(a.get("ceil_mode", 0)))


def _layer_norm(inputs, a):
    from torch.nn import functional as F

    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = _axis(a.get("axis", -1), x.dim())
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, a.get("epsilon", 1e-5))


def _expand(inputs, a):
    x, shape = inputs[0], _ints(inputs[1])
    return x.expand(_torch().broadcast_shapes(tuple(x.shape), tuple(shape)))


def _clip(inputs, a):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else a.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else a.get("max")
    return _torch().clamp(x, low, high)


def _flatten(inputs, a):
    x = inputs[0]
    axis = _axis(a.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _shape(inputs, a):
    shape = list(inputs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(shape))
    return _torch().tensor(shape[start:end], dtype=_torch().int64)


def _constant_of_shape(inputs, a):
    torch = _torch()
    value = torch.as_tensor(np.array(numpy_helper.to_array(a["value"]))) if "value" in a else torch.tensor([0.0])
    return torch.full(_ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


def _transpose(inputs, a):
    x = inputs[0]
    return x.permute(list(a.get("perm", range(x.dim() - 1, -1, -1))))


def _softmax(inputs, a):
    return _torch().softmax(inputs[0], dim=a.get("axis", -1))


def _global_pool(reduce):
    return lambda inputs, a: reduce(inputs[0], dim=list(range(2, inputs[0].dim())), keepdim=True)


def _average_pool(inputs, a):
    from torch.nn import functional as F

    from .nn.modules import _torch_attrs

    x = inputs[0]
    kernel = list(a["kernel_shape"])
    nsp = len(kernel)
    pad, stride, _, _ = _torch_attrs(dict(a, strides=a.get("strides", [1] * nsp)), nsp)
    if any(pad) and not a.get("count_include_pad", 0):
        raise TnonnxError("--finetune: padded AveragePool without count_include_pad is not supported")
    if any(pad):
        x = F.pad(x, pad)
    return {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nsp](x, kernel, stride, 0, bool(a.get("ceil_mode", 0)))


def _batch_norm(inputs, a):
    x, scale, bias, mean, var = inputs[:5]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / _torch().sqrt(var + a.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _binary(name):
    return lambda inputs, a: getattr(_torch(), name)(inputs[0], inputs[1])


def _unary(name):
    return lambda inputs, a: getattr(_torch(), name)(inputs[0])


OPS = {
    "Add": lambda i, a: i[0] + i[1], "Sub": lambda i, a: i[0] - i[1], "Mul": lambda i, a: i[0] * i[1],
    "Div": _div, "Pow": _binary("pow"), "MatMul": _binary("matmul"), "Equal": _binary("eq"),
    "Greater": _binary("gt"), "Less": _binary("lt"), "GreaterOrEqual": _binary("ge"), "LessOrEqual": _binary("le"),
    "And": _binary("logical_and"), "Or": _binary("logical_or"), "Not": _unary("logical_not"),
    "Sqrt": _unary("sqrt"), "Erf": _unary("erf"), "Exp": _unary("exp"), "Log": _unary("log"), "Neg": _unary("neg"),
    "Abs": _unary("abs"), "Tanh": _unary("tanh"), "Sigmoid": _unary("sigmoid"), "Relu": _unary("relu"),
    "Reciprocal": _unary("reciprocal"), "Identity": lambda i, a: i[0],
    "Where": lambda i, a: _torch().where(i[0], i[1], i[2]),
    "Cast": lambda i, a: i[0].to(_dtype(a["to"])), "Constant": _constant, "Shape": _shape,
    "ConstantOfShape": _constant_of_shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Slice": _slice, "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose,
    "Concat": lambda i, a: _torch().cat(list(i), dim=a["axis"]),
    "Range": lambda i, a: _torch().arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype),
    "Expand": _expand, "Softmax": _softmax, "ReduceSum": _reduce(lambda x, **k: x.sum(**k)),
    "ReduceMean": _reduce(lambda x, **k: x.mean(**k)), "Clip": _clip, "LayerNormalization": _layer_norm,
    "Gemm": _gemm, "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _maxpool,
    "Einsum": lambda i, a: _torch().einsum(a["equation"], *i),
    "Gelu": lambda i, a: _torch().nn.functional.gelu(i[0]),
    "GlobalAveragePool": _global_pool(lambda x, **k: x.mean(**k)),
    "GlobalMaxPool": _global_pool(lambda x, **k: x.amax(**k)), "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm, "Dropout": lambda i, a: i[0],
    "LeakyRelu": lambda i, a: _torch().nn.functional.leaky_relu(i[0], a.get("alpha", 0.01)),
    "HardSigmoid": lambda i, a: _torch().clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda i, a: i[0] * _torch().clamp(i[0] / 6 + 0.5, 0, 1),
}
