"""After factorisation: the target's precision and checks, quantization, and the
comparisons of the combined result (original, factorised, final, and the baseline a user
tries first: the original quantized the same way)."""

from __future__ import annotations

from dataclasses import dataclass, field

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


INT8_MODES = ("static", "dynamic")


def plan(target: str, quantize_mode: str | None, emit: str, has_calib: bool, max_model_bytes: int | None = None,
         int8: str | None = None, short_names: bool = False) -> tuple[targets.Target, Quantization | None, str]:
    """Check the options together, before any work: (target, quantization, emission).
    int8 is static (QDQ, per-channel) with calibration data and always on gpu and edge,
    dynamic otherwise; `int8` (--int8) chooses on cpu."""
    t = targets.Target(target, max_model_bytes, short_names)
    if int8 is not None:
        if int8 not in INT8_MODES:
            raise TnonnxError(f"--int8 {int8}: choose from {', '.join(INT8_MODES)}")
        if quantize_mode is None:
            raise TnonnxError(f"--int8 {int8}: only with --quantize int8 or int4")
        if int8 == "dynamic" and target != "cpu":
            raise TnonnxError(f"--target {target} --int8 dynamic: the {target} target takes static int8 "
                              "(QDQ, per-channel); dynamic int8 is for cpu")
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
    static = int8 == "static" if int8 is not None else has_calib or target in ("gpu", "edge")
    if static and not has_calib:
        raise TnonnxError(f"--target {target} --quantize {quantize_mode}: static int8 needs calibration data "
                          "(--calib FILE.npz or --calib-random N)")
    return t, Quantization(quantize_mode, static=static, symmetric_activations=target == "gpu"), \
        ("matmul" if emit == "auto" else emit)


def rank_rules(target: str, q: Quantization | None) -> list[tuple[int, int, str]]:
    """(multiple, from, why): ranks of at least `from` should be multiples of `multiple`."""
    rules = [(8, 1, "--target gpu")] if target == "gpu" else []  # tensor cores work on multiples of 8
    if q is not None and q.mode == "int4":  # MatMulNBits stores whole blocks of the contracted dimension
        rules.append((q.block_size, q.block_size, f"--quantize int4 (block {q.block_size})"))
    return rules


def align_rank(rank, target: str, q: Quantization | None):
    """A fixed --rank N rounded up to what the target and quantization want (a padded block
    is stored anyway: filling it with rank costs only the other factor's columns); narrower
    than an int4 block it stays, and that factor is quantized to int8."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return rank
    for multiple, start, _ in rank_rules(target, q):
        if rank >= start:
            rank = -(-rank // multiple) * multiple
    return rank


def unaligned_notes(rows, target: str, q: Quantization | None, ranks_text) -> list[str]:
    """Notes naming the layers whose ranks (chosen by the rank rule, or bounded by mode
    sizes) break rank_rules."""
    notes = []
    for multiple, start, why in rank_rules(target, q):
        odd = [f"{r.name} {ranks_text(r.ranks)}" for r in rows
               if r.ranks and any(k >= start and k % multiple for k in r.ranks)]
        if odd:
            notes.append(f"{why}: ranks not multiples of {multiple} (chosen by the rank rule, or bounded by mode "
                         f"sizes): {'; '.join(odd[:5])}" + (" ..." if len(odd) > 5 else ""))
    return notes


def slower_note(q: Quantization | None, before_ms: float, factorised_ms: float, after_ms: float) -> str:
    """The final model is slower than the original while the change of precision made it so
    (q None: fp16 for --target gpu; the factorisation's own slowdown has
    choose.slower_note): what to do differs."""
    what = q.describe() if q is not None else "fp16"
    note = (f"the final model is SLOWER than the original at the deployment shape: {after_ms:.3f} ms against "
            f"{before_ms:.3f} ms on onnxruntime's CPU provider; the factorised model ran in {factorised_ms:.3f} ms "
            f"before {what}, so ")
    if q is None:
        return note + ("the time is fp16's on the CPU provider, which this target is not for: no measure of its "
                       "speed on a GPU")
    return note + ("the quantized form costs it (its quantize and dequantize work costs more than the narrower "
                   "weights save at this size). --speedup cannot help: it times the factorisation only. Where "
                   "latency matters more than the file's size, leave out --quantize")


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
    # the edge rules look up the emitted nodes by name: checked before names are shortened
    violations = targets.edge_violations(final, emitted) if target.name == "edge" else []
    if target.short_names:
        saved = targets.short_names(final)
        if baseline is not None:
            targets.short_names(baseline)
        report.target.add("short names", True, f"{saved:,} bytes saved; graph inputs and outputs keep theirs")
    if target.name == "gpu":
        missing = cuda_kernels.fallbacks(final)
        report.target.add("every op has a CUDA kernel (onnxruntime's OperatorKernels list)", not missing,
                          "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    report.target.ops = targets.ops_used(final)
    runtime.session(final, what="final model")  # loads in the CPU provider (TnonnxError otherwise)
    report.target.add("loads in onnxruntime's CPU provider", True, f"onnxruntime {ort.__version__}")
    if target.name == "edge":
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
    got = validation.run(None, batches, what=".ort model", open_session=lambda _model, _what: sess)
    outs = validation.compare(final_outputs, got)
    worst_abs = max((o.max_abs for o in outs), default=0.0)
    worst_cos = min((o.cosine for o in outs), default=1.0)
    report.target.add(".ort loads and agrees with the .onnx", worst_cos >= 0.99999,
                      f"max abs difference {worst_abs:.3g}, least cosine {worst_cos:.7f}; "
                      f"needs onnxruntime >= {report.target.ort_version}")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
