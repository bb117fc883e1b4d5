"""The gpu target's precision: fp16 weights and activations, fp32 inputs and outputs.

Before converting, the cores of each factorisation are scaled to equal norms (the weight
they multiply to is unchanged), so that no intermediate of a chain is much larger than the
layer's input or output; then the range of every float tensor is measured on calibration
data, and a node whose output reaches FP16_MAX / HEADROOM stays in fp32. The conversion
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
    keep = [n.name for n in model.graph.node if any(ranges.get(o, 0.0) >= limit for o in n.output)]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the converter warns about every clamped value
    try:
        half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    finally:
        logging.getLogger().setLevel(level)
    return half, keep, max(ranges.values(), default=0.0)


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
