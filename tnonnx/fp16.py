"""The gpu target's precision: fp16 weights and activations, fp32 inputs and outputs.

Before converting, the cores of each factorisation are scaled to equal norms (the weight
they multiply to is unchanged), so that no intermediate of a chain is much larger than the
layer's input or output; then the range of every float tensor is measured on calibration
data, and a node whose output or input reaches FP16_MAX / HEADROOM stays in fp32. The conversion
itself is onnxruntime.transformers.float16's.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from . import runtime

FP16_MAX = 65504.0
HEADROOM = 2.0  # kept in fp32 from half the largest fp16 value: unseen inputs run larger
RANGE_SAMPLES = 64  # calibration samples the ranges are measured on


def balance_cores(fact) -> bool:
    """Scale the cores of a linear factorisation to equal Frobenius norms, their product
    (the weight) unchanged. Returns whether it did; nonlinear chains and factorisations
    whose weight the scaling would change (checked) are left as they are."""
    cores = getattr(fact, "cores", None)
    if not fact.linear or not isinstance(cores, dict) or len(cores) < 2:
        return False
    norms = {k: float(np.linalg.norm(c)) for k, c in cores.items()}
    if min(norms.values()) <= 0:
        return False
    try:
        before = fact.to_dense()
    except (NotImplementedError, ValueError, AttributeError):
        return False
    mean = float(np.exp(np.mean(np.log(list(norms.values())))))
    saved = dict(cores)
    for k in cores:
        cores[k] = cores[k] * (mean / norms[k])
    after = fact.to_dense()
    if np.linalg.norm(after - before) > 1e-6 * max(np.linalg.norm(before), 1e-300):
        cores.update(saved)  # not a product of its cores alone (e.g. a fixed scale elsewhere)
        return False
    return True


def measure_ranges(model: onnx.ModelProto, batches) -> dict[str, float]:
    """The largest |value| of every float tensor the main graph's nodes produce, over up to
    RANGE_SAMPLES calibration samples."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    floats = [o for n in model.graph.node for o in n.output if types.get(o) == onnx.TensorProto.FLOAT]
    exposed, wanted = runtime.with_outputs(model, floats, inferred, inputs=False)
    sess = runtime.session(exposed, optimize=False, what="range measurement")
    names = [o.name for o in sess.get_outputs()]
    ranges: dict[str, float] = {}
    seen = 0
    for feeds in batches:
        for name, value in zip(names, runtime.infer(sess, dict(feeds), what="range measurement")):
            value = np.asarray(value)
            if value.size and value.dtype.kind == "f":
                ranges[name] = max(ranges.get(name, 0.0), float(np.nanmax(np.abs(value))))
        seen += max((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), default=1)
        if seen >= RANGE_SAMPLES:
            break
    return ranges


def to_fp16(model: onnx.ModelProto, batches) -> tuple[onnx.ModelProto, list[str], float]:
    """(fp16 model with fp32 inputs and outputs, the nodes kept in fp32 because their
    measured range would overflow, the largest range measured)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    name_nodes(model)
    ranges = measure_ranges(model, batches)
    limit = FP16_MAX / HEADROOM
    # a node producing or reading a tensor out of fp16's range stays fp32 (a Cast to fp16 of
    # its input would overflow as surely as its own fp16 output)
    keep = [n.name for n in model.graph.node if any(ranges.get(t, 0.0) >= limit for t in (*n.input, *n.output))]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the converter warns about every clamped value
    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    finally:
        logging.getLogger().setLevel(level)
    _drop_round_trips(half)
    return half, keep, max(ranges.values(), default=0.0)


def _drop_round_trips(model: onnx.ModelProto) -> None:
    """Remove the Cast fp32 -> fp16 -> fp32 pairs the converter leaves between two nodes kept
    in fp32: they would overflow the very tensors kept in fp32 for their range."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    drop, rename = set(), {}

    def cast_to(node, dtype) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)

    for down in graph.node:
        if not cast_to(down, onnx.TensorProto.FLOAT):
            continue
        up = producer.get(down.input[0])
        if up is None or not cast_to(up, onnx.TensorProto.FLOAT16) or down.output[0] in outputs:
            continue
        if all(cast_to(c, onnx.TensorProto.FLOAT) for c in consumers.get(up.output[0], [])) \
                and up.output[0] not in outputs:
            rename[down.output[0]] = up.input[0]
            drop |= {id(up), id(down)}
    if not drop:
        return
    keep = [n for n in graph.node if id(n) not in drop]
    for n in keep:
        for k, name in enumerate(n.input):
            n.input[k] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(keep)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a name (onnxruntime's converters select nodes by name)."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
