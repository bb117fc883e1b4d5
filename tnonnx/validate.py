"""Run two models on the same feeds and compare their outputs."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import calibrate, runtime
from . import model as _model
from .errors import ModelTooLarge, OriginalDoesNotRun, TnonnxError

# Chunk size for many-sample inputs when the model's batch dim is symbolic.
RUN_CHUNK = 64
# Samples of made-up (random) feeds when no inputs are given: enough for a cosine or a
# top-1 agreement to mean something, run in batches of the deployment batch.
RANDOM_SAMPLES = 32


DEFAULT_MIN_COSINE = 0.99  # when no threshold is given, in `tnonnx rewrite` as in `tnonnx validate`


def with_default_threshold(atol=None, rtol=None, min_cosine=None, max_accuracy_drop=None) -> float | None:
    """min_cosine, or DEFAULT_MIN_COSINE when no threshold at all is given."""
    if atol is None and rtol is None and min_cosine is None and max_accuracy_drop is None:
        return DEFAULT_MIN_COSINE
    return min_cosine


def check_thresholds(atol=None, rtol=None, min_cosine=None, max_accuracy_drop=None, batch: int = 1) -> None:
    """TnonnxError (exit 2) for threshold values no comparison can meet or mean."""
    for flag, v in (("--atol", atol), ("--rtol", rtol), ("--max-accuracy-drop", max_accuracy_drop)):
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            raise TnonnxError(f"{flag} {v}: must be a number >= 0")
    if max_accuracy_drop is not None and max_accuracy_drop > 100:
        raise TnonnxError(f"--max-accuracy-drop {max_accuracy_drop:g}: percentage points, at most 100")
    if min_cosine is not None and not (isinstance(min_cosine, (int, float)) and -1 <= min_cosine <= 1):
        raise TnonnxError(f"--min-cosine {min_cosine}: must be in [-1, 1] (a cosine similarity)")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise TnonnxError(f"--batch {batch}: must be a whole number >= 1")


def run(
    model: onnx.ModelProto | str | os.PathLike, batches: Iterable[Mapping[str, np.ndarray]], *, what: str = "model",
    open_session=None,
) -> dict[str, np.ndarray]:
    """Run the model on every batch; each output concatenated along axis 0 (scalars stacked).
    `open_session(model, what)` gives the session (one already open), else a new one."""
    sess = open_session(model, what) if open_session is not None else runtime.session(model, what=what)
    names = [o.name for o in sess.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feeds in batches:
        for name, value in zip(names, runtime.infer(sess, dict(feeds), what=what)):
            collected[name].append(np.asarray(value))
    if not any(collected.values()):
        raise TnonnxError(f"{what}: no inputs to run it on")
    out = {}
    for name, parts in collected.items():
        if parts[0].ndim == 0:
            out[name] = np.stack(parts)
            continue
        try:
            out[name] = np.concatenate(parts, axis=0)
        except ValueError:
            shapes = sorted({p.shape for p in parts})
            raise TnonnxError(f"{what}: output '{name}' changes shape between batches {shapes}") from None
    return out


@dataclass
class OutputAgreement:
    """How closely one output of the candidate matches the reference's."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float  # max |a-b| / max |a|
    rel_l2: float  # ||a-b|| / ||a||
    cosine: float
    snr_db: float
    top1: float | None  # argmax agreement, for outputs that look like class scores
    _ref: np.ndarray = field(repr=False, compare=False, default=None)
    _test: np.ndarray = field(repr=False, compare=False, default=None)

    def allclose(self, atol: float = 1e-8, rtol: float = 1e-5) -> bool:
        """numpy.allclose(test, ref, rtol, atol): |test - ref| <= atol + rtol * |ref|."""
        return bool(np.allclose(self._test, self._ref, rtol=rtol, atol=atol))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "rel_l2": _json_float(self.rel_l2),
            "cosine": _json_float(self.cosine),
            "snr_db": _json_float(self.snr_db),
            "top1": _json_float(self.top1),
        }


def agreement(name: str, ref: np.ndarray, test: np.ndarray) -> OutputAgreement:
    """Compare one output (``ref`` is the reference)."""
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    d = b - a
    amax = float(np.abs(a).max()) if a.size else 0.0
    dmax = float(np.abs(d).max()) if d.size else 0.0
    na, nb, nd = (float(np.linalg.norm(x.ravel())) for x in (a, b, d))
    if na == 0 and nb == 0:
        cosine = 1.0
    elif na == 0 or nb == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(a.ravel(), b.ravel()) / (na * nb))
    return OutputAgreement(
        name=name,
        shape=tuple(np.shape(ref)),
        max_abs=dmax,
        max_rel=_ratio(dmax, amax),
        rel_l2=_ratio(nd, na),
        cosine=cosine,
        snr_db=_snr_db(na, nd),
        top1=None if _FEATURE_NAMES.search(name) else _top1(ref, test),
        _ref=np.asarray(ref),
        _test=np.asarray(test),
    )


def compare(ref: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray]) -> list[OutputAgreement]:
    """Per-output agreement; TnonnxError if the outputs' names or shapes differ."""
    if set(ref) != set(test):
        raise TnonnxError(f"the models have different outputs: reference {sorted(ref)}, candidate {sorted(test)}")
    for name in ref:
        if np.shape(ref[name]) != np.shape(test[name]):
            raise TnonnxError(
                f"output '{name}' has shape {list(np.shape(ref[name]))} in the reference "
                f"but {list(np.shape(test[name]))} in the candidate"
            )
    return [agreement(name, ref[name], test[name]) for name in ref]


@dataclass
class ValidationResult:
    outputs: list[OutputAgreement]
    samples: int | None = None  # samples fed (axis 0), when known
    accuracy_ref: float | None = None
    accuracy_test: float | None = None
    # thresholds used; when one of atol/rtol is given the other is 0, like a plain np.allclose
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    max_accuracy_drop: float | None = None  # percentage points (accuracy, else top-1 agreement)
    random_feeds: bool = False  # made-up inputs from the model's shapes, not real data
    assumed: list[str] = field(default_factory=list)  # symbolic dims given a value by tnonnx

    @property
    def accuracy_basis(self) -> str | None:
        """What --max-accuracy-drop is measured on: "accuracy" (labels), "top-1 agreement"
        (no labels: agreement with the original's top-1), or None (no class-score output)."""
        if self.accuracy_ref is not None:
            return "accuracy"
        return "top-1 agreement" if any(o.top1 is not None for o in self.outputs) else None

    @property
    def accuracy_drop(self) -> float | None:
        """Percentage points lost on the accuracy basis."""
        if self.accuracy_ref is not None:
            return 100.0 * (self.accuracy_ref - self.accuracy_test)
        top1 = next((o.top1 for o in self.outputs if o.top1 is not None), None)
        return None if top1 is None else 100.0 * (1.0 - top1)

    @property
    def failures(self) -> list[str]:
        out = []
        for o in self.outputs:
            if self.atol is not None and not o.allclose(self.atol, self.rtol):
                out.append(
                    f"output '{o.name}': not within atol={self.atol:g} rtol={self.rtol:g} "
                    f"(max abs error {o.max_abs:.3g}, max rel error {o.max_rel:.3g})"
                )
            if self.min_cosine is not None and not o.cosine >= self.min_cosine:
                out.append(f"output '{o.name}': cosine {o.cosine:.6f} < {self.min_cosine:g}")
        if self.max_accuracy_drop is not None:
            drop, basis = self.accuracy_drop, self.accuracy_basis
            if drop is None:
                out.append("--max-accuracy-drop: no output looks like class scores (2-D float, one row per "
                           "sample), so neither accuracy nor top-1 agreement can be measured")
            elif basis == "accuracy" and drop > self.max_accuracy_drop + 1e-9:
                out.append(f"accuracy dropped {drop:.2f} points ({self.accuracy_ref:.4f} -> {self.accuracy_test:.4f}),"
                           f" more than --max-accuracy-drop {self.max_accuracy_drop:g}")
            elif basis == "top-1 agreement" and drop > self.max_accuracy_drop + 1e-9:
                out.append(f"top-1 agreement with the original {1 - drop / 100:.4f} < "
                           f"{1 - self.max_accuracy_drop / 100:.4f} (--max-accuracy-drop {self.max_accuracy_drop:g} "
                           "applied to agreement: no labels in --inputs)")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """JSON-ready; non-finite floats are written as the strings "inf", "-inf", "nan"."""
        return {
            "ok": self.ok,
            "failures": self.failures,
            "samples": self.samples,
            "feeds": "random" if self.random_feeds else "inputs",
            "assumed_dims": self.assumed,
            "thresholds": {"atol": self.atol, "rtol": self.rtol, "min_cosine": self.min_cosine,
                           "max_accuracy_drop": self.max_accuracy_drop},
            "accuracy_basis": self.accuracy_basis if self.max_accuracy_drop is not None else None,
            "accuracy_ref": _json_float(self.accuracy_ref),
            "accuracy_test": _json_float(self.accuracy_test),
            "outputs": [o.to_dict() for o in self.outputs],
        }


def validate(
    reference: onnx.ModelProto | str | os.PathLike,
    candidate: onnx.ModelProto | str | os.PathLike,
    *,
    inputs=None,
    labels=None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    batch: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
    max_accuracy_drop: float | None = None,
) -> ValidationResult:
    """Run both models on the same inputs and compare every output.

    ``inputs``: None (RANDOM_SAMPLES made-up samples from the reference's shapes in batches
    of ``batch``, with ``shapes`` and ``seed``; the result says they were random; when the
    reference cannot run on them: OriginalDoesNotRun),
    a path to an .npz, a dict of arrays, or an object with get_next(). Labels: ``labels``, or
    the ``labels`` array of an .npz/dict; they give top-1 accuracy of both models.
    ``max_accuracy_drop`` (percentage points): with labels, the most accuracy may drop;
    without, applied to top-1 agreement with the reference (at least 1 - points/100).
    """
    check_thresholds(atol, rtol, min_cosine, max_accuracy_drop, batch)
    ref = _model.load(reference, what="reference")
    cand = _model.load(candidate, what="candidate")
    return validate_models(ref, cand, inputs=inputs, labels=labels, shapes=shapes, batch=batch, seed=seed,
                           atol=atol, rtol=rtol, min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop)


def validate_models(ref: onnx.ModelProto, cand: onnx.ModelProto, *, inputs=None, labels=None, shapes=None,
                    batch: int = 1, seed: int = 0, atol=None, rtol=None, min_cosine=None, max_accuracy_drop=None,
                    open_session=None) -> ValidationResult:
    """validate() of two loaded models (thresholds checked by the caller); `open_session`
    as in run() (a rewrite validates on the sessions its timing opened)."""
    runtime.check_same_inputs(ref, cand)
    try:
        batches, extras = feeds(ref, inputs, shapes=shapes, batch=batch, seed=seed)
        ref_out = run(ref, batches, what="reference", open_session=open_session)
    except TnonnxError as exc:
        if inputs is not None or isinstance(exc, ModelTooLarge):
            raise
        raise OriginalDoesNotRun(str(exc)) from None
    return result(ref_out, run(cand, batches, what="candidate", open_session=open_session), batches, ref,
                  inputs=inputs, labels=extras.get("labels") if labels is None else labels, shapes=shapes,
                  atol=atol, rtol=rtol, min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop)


def feeds(ref: onnx.ModelProto, inputs=None, *, shapes=None, batch: int = 1, seed: int = 0):
    """(batches, extras) a validation runs on: `inputs` (see validate), or RANDOM_SAMPLES
    made-up samples from the reference's shapes."""
    if inputs is None:
        return calibrate.random_batches(ref, RANDOM_SAMPLES, batch, shapes, seed), {}
    return calibrate.feed_batches(inputs, ref, batch=batch, shapes=shapes, seed=seed, chunk=RUN_CHUNK)


def result(ref_out, test_out, batches, ref: onnx.ModelProto, *, inputs=None, labels=None, shapes=None,
           atol=None, rtol=None, min_cosine=None, max_accuracy_drop=None) -> "ValidationResult":
    """The ValidationResult of two models' outputs (`run`) on the same `batches`."""
    outputs = compare(ref_out, test_out)
    acc_ref = acc_test = None
    if labels is not None:
        acc_ref, acc_test = _accuracies(np.asarray(labels), outputs)

    if atol is not None or rtol is not None:
        atol, rtol = atol or 0.0, rtol or 0.0
    return ValidationResult(
        outputs=outputs,
        samples=count_samples(batches),
        accuracy_ref=acc_ref,
        accuracy_test=acc_test,
        atol=atol,
        rtol=rtol,
        min_cosine=min_cosine,
        max_accuracy_drop=max_accuracy_drop,
        random_feeds=inputs is None or (isinstance(inputs, int) and not isinstance(inputs, bool)),
        assumed=calibrate.assumed_dims(ref, shapes) if inputs is None or isinstance(inputs, int) else [],
    )


def skipped_note(exc: OriginalDoesNotRun) -> str:
    """What a rewrite says when it skips validation because the original does not run on
    made-up feeds: why (onnxruntime's message, shortened) and how to give feeds."""
    why = str(exc).removeprefix("reference: ")
    if "Status Message: " in why:  # a failure inside an If/Loop body: its innermost message says why
        why = "onnxruntime failed to run it: " + why.rsplit("Status Message: ", 1)[1]
    why = calibrate.clip(why, 200)
    return (f"validation skipped: the original does not run on the inputs tnonnx made up ({why}); "
            "give real inputs with --inputs FILE.npz, or input shapes with --shape NAME:DIMS")


def _accuracies(labels: np.ndarray, outputs: list[OutputAgreement]) -> tuple[float | None, float | None]:
    """Top-1 accuracy of both models on the first class-like output (None, None if none)."""
    scores = next((o for o in outputs if o.top1 is not None), None)
    if scores is None:
        return None, None
    if labels.dtype.kind not in "iu" or labels.size != scores.shape[0]:
        raise TnonnxError(
            f"labels: expected {scores.shape[0]} integer class ids (one per sample of output "
            f"'{scores.name}'), got {labels.dtype} of shape {list(labels.shape)}"
        )
    labels = labels.reshape(-1)
    return (
        float(np.mean(np.argmax(scores._ref, axis=-1) == labels)),
        float(np.mean(np.argmax(scores._test, axis=-1) == labels)),
    )


def count_samples(batches: list[Mapping[str, np.ndarray]]) -> int | None:
    total = 0
    for feeds in batches:
        first = next((v for v in feeds.values() if np.ndim(v) >= 1), None)
        if first is None:
            return None
        total += np.shape(first)[0]
    return total


# rank-2 outputs that are features, not class scores: argmax agreement means nothing there
_FEATURE_NAMES = re.compile(r"embed|hidden|feature|pool|encod", re.IGNORECASE)


def _top1(ref: np.ndarray, test: np.ndarray) -> float | None:
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.dtype.kind != "f" or ref.ndim != 2 or ref.shape[-1] < 2 or ref.shape[0] == 0:
        return None
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)))


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _snr_db(signal_norm: float, noise_norm: float) -> float:
    if noise_norm == 0:
        return math.inf
    if signal_norm == 0:
        return -math.inf
    return 20.0 * math.log10(signal_norm / noise_norm)


def _json_float(x: float | None):
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
