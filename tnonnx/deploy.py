"""After factorisation: the target's precision and checks, quantization, and the
comparisons of the combined result (original, factorised, final, and the baseline a user
tries first: the original quantized the same way)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from . import cuda_kernels, fp16, runtime, targets
from . import validate as validation
from .errors import TnonnxError
from .quantize import QUANT_MODES, QuantInfo, Quantization, quantize


@dataclass
class DeployReport:
    target: targets.TargetReport
    quantization: QuantInfo | None = None
    baseline: QuantInfo | None = None  # the original quantized the same way
    comparisons: dict = field(default_factory=dict)  # label -> ValidationResult
    sizes: dict = field(default_factory=dict)  # bytes: original, factorised, final, baseline
    kept_fp32: list[str] = field(default_factory=list)  # gpu: nodes whose range would overflow fp16
    max_range: float | None = None  # gpu: the largest |value| measured

    @property
    def ok(self) -> bool:
        return self.target.ok and (self.quantization is None or self.quantization.ok)

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(),
                "quantization": self.quantization.to_dict() if self.quantization else None,
                "baseline": self.baseline.to_dict() if self.baseline else None,
                "comparisons": {k: v.to_dict() for k, v in self.comparisons.items()},
                "sizes": self.sizes, "kept_fp32": self.kept_fp32, "max_range": self.max_range}


def plan(target: str, quantize_mode: str | None, emit: str, has_calib: bool,
         max_model_bytes: int | None = None) -> tuple[targets.Target, Quantization | None, str]:
    """Check the options together, before any work: (target, quantization, emission)."""
    t = targets.Target(target, max_model_bytes)
    emit = t.emission(emit)
    if max_model_bytes is not None and max_model_bytes < 1:
        raise TnonnxError(f"--max-model-bytes {max_model_bytes}: must be >= 1")
    if target == "gpu" and not has_calib:
        raise TnonnxError("--target gpu measures activation ranges for fp16: give --calib FILE.npz or --calib-random N")
    if quantize_mode is None:
        return t, None, emit
    if quantize_mode not in QUANT_MODES:
        raise TnonnxError(f"--quantize {quantize_mode}: choose from {', '.join(QUANT_MODES)}")
    if emit in ("einsum", "custom", "features-first"):
        raise TnonnxError(f"--quantize: --emit {emit} is not quantized by onnxruntime's quantizers "
                          "(they take MatMuls with a constant right operand): give --emit auto or matmul")
    if target == "edge" and quantize_mode == "int4":
        raise TnonnxError("--target edge --quantize int4: MatMulNBits is a contrib op; edge takes int8")
    static = has_calib or target in ("gpu", "edge")
    if static and not has_calib:
        raise TnonnxError(f"--target {target} --quantize {quantize_mode}: static int8 needs calibration data "
                          "(--calib FILE.npz or --calib-random N)")
    return t, Quantization(quantize_mode, static=static, symmetric_activations=target == "gpu"), \
        ("matmul" if emit == "auto" else emit)


def finish(original: onnx.ModelProto, factorised: onnx.ModelProto, target: targets.Target,
           q: Quantization | None, batches, emitted: set[str], shapes=None, stem: str = "model"):
    """(final model, DeployReport, baseline model or None): the factorised model made ready
    for its target and quantized; the baseline is the original given the same treatment."""
    report = DeployReport(targets.TargetReport(target.name))
    final = _copy(factorised)
    baseline = None
    if target.name == "edge":
        targets.fix_shapes(final, shapes)
    if q is not None:
        final, report.quantization = quantize(final, q, batches)
        base = _copy(original)
        if target.name == "edge":
            targets.fix_shapes(base, shapes)
        baseline, report.baseline = quantize(base, q, batches)
        report.target.add("every weight quantized", report.quantization.ok,
                          "left in float: " + ", ".join(report.quantization.left_float)
                          if report.quantization.left_float else report.quantization.method)
    elif target.name == "gpu":
        final, report.kept_fp32, report.max_range = fp16.to_fp16(final, batches)
        ios = [v.type.tensor_type.elem_type for v in (*final.graph.input, *final.graph.output)]
        orig = [v.type.tensor_type.elem_type for v in (*original.graph.input, *original.graph.output)]
        report.target.add("inputs and outputs keep their dtypes", ios == orig)
        report.target.add("fp16 ranges measured on calibration data", True,
                          f"largest |value| {report.max_range:.4g}; kept in fp32 (>= {fp16.FP16_MAX / fp16.HEADROOM:g}):"
                          f" {', '.join(report.kept_fp32) or 'none'}")
    if target.name == "gpu":
        missing = cuda_kernels.fallbacks(final)
        report.target.add("every op has a CUDA kernel (onnxruntime's OperatorKernels list)", not missing,
                          "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    report.target.ops = targets.ops_used(final)
    runtime.session(final, what="final model")  # loads in the CPU provider (TnonnxError otherwise)
    report.target.add("loads in onnxruntime's CPU provider", True, f"onnxruntime {ort.__version__}")
    if target.name == "edge":
        violations = targets.edge_violations(final, emitted)
        report.target.add("edge rules: default-domain ops, no Einsum, rank <= 4, depthwise or group-1 convs",
                          not violations, "; ".join(violations[:5]) + (" ..." if len(violations) > 5 else ""))
        ort_bytes, config = targets.convert_to_ort(final, stem)
        report.target.files = {".ort": ort_bytes, ".required_operators.config": config}
        report.target.ort_version = ort.__version__
    report.sizes = {"original": original.ByteSize(), "factorised": factorised.ByteSize(), "final": final.ByteSize(),
                    "baseline": baseline.ByteSize() if baseline is not None else None}
    if target.name == "edge":
        report.sizes["ort"] = len(report.target.files[".ort"])
    targets.check_size(final, target.max_model_bytes,
                       {"the .ort": report.sizes["ort"]} if target.name == "edge" else None)
    return final, report, baseline


COMPARISONS = ("original → factorised", "factorised → final", "original → final", "original → baseline")


def compare(report: DeployReport, original, factorised, final, baseline, *, inputs=None, shapes=None,
            batch: int = 1, thresholds: dict | None = None) -> validation.ValidationResult:
    """Run every model once on the same feeds and fill report.comparisons; returns the
    original → final comparison, which carries the thresholds. The edge target's .ort is
    checked against the final .onnx on the same feeds."""
    fixed = report.target.target == "edge" and shapes  # feeds in the chunks the fixed shapes take
    batches, extras = validation.feeds(final if fixed else original, inputs, shapes=shapes, batch=batch)
    labels = extras.get("labels")
    outs = {"original": validation.run(original, batches, what="original"),
            "factorised": validation.run(factorised, batches, what="factorised model"),
            "final": validation.run(final, batches, what="final model")}
    if baseline is not None:
        outs["baseline"] = validation.run(baseline, batches, what="baseline")
    for label in COMPARISONS:
        ref, test = label.split(" → ")
        if test in outs:
            given = thresholds if label == "original → final" else {}
            report.comparisons[label] = validation.result(outs[ref], outs[test], batches, original, inputs=inputs,
                                                          labels=labels, shapes=shapes, **(given or {}))
    _compare_ort(report, outs["final"], batches)
    return report.comparisons["original → final"]


def check_ort(report: DeployReport, final: onnx.ModelProto, *, inputs=None, shapes=None, batch: int = 1) -> None:
    """Without a validation: the edge target's .ort against the final .onnx all the same."""
    if ".ort" in report.target.files:
        batches, _ = validation.feeds(final, inputs, shapes=shapes, batch=batch)
        _compare_ort(report, validation.run(final, batches, what="final model"), batches)


def _compare_ort(report: DeployReport, final_outputs: dict, batches) -> None:
    """Load the edge target's .ort and compare it with the final .onnx's outputs on `batches`."""
    if ".ort" not in report.target.files:
        return
    sess = targets.ort_session(report.target.files[".ort"])
    names = [o.name for o in sess.get_outputs()]
    got = {n: [] for n in names}
    for feeds in batches:
        for n, v in zip(names, sess.run(None, dict(feeds))):
            got[n].append(v)
    got = {n: np.concatenate(v) if np.ndim(v[0]) else np.stack(v) for n, v in got.items()}
    worst_abs, worst_cos = targets.agreement(final_outputs, got)
    report.target.add(".ort loads and agrees with the .onnx", worst_cos >= 0.99999,
                      f"max abs difference {worst_abs:.3g}, least cosine {worst_cos:.7f}; "
                      f"needs onnxruntime >= {report.target.ort_version}")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
