"""The reports printed after `inspect` and `rewrite`, and their JSON form."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .progress import stage_times
from .report_table import Column, fit_table, legend

# what a layer row means only after a rewrite: left out of `inspect --json`
AFTER_FIELDS = ("format", "ranks", "params_after", "macs_after", "weight_error", "output_error", "held_out_error",
                "shared_with",
                "emission", "ms_before", "ms_after", "ms_predicted", "ms_measured")


@dataclass
class LayerRow:
    name: str
    op: str
    weight_shape: list[int]
    params_before: int
    macs_before: int | None
    format: str | None = None
    ranks: list[int] | None = None
    params_after: int | None = None
    macs_after: int | None = None
    weight_error: float | None = None
    output_error: float | None = None  # relative output error on calibration data (data-aware fitting)
    held_out_error: float | None = None  # the same on the calibration samples held out of the (first) fit
    shared_with: str | None = None  # the layer whose factors this one reuses
    reason: str | None = None  # why the layer was left alone
    emission: str | None = None  # how the replacement is emitted (matmul, features-first, ...)
    ms_before: float | None = None  # the dense layer alone at the deployment shape
    ms_after: float | None = None  # its replacement alone (measured when ms_measured)
    ms_predicted: float | None = None  # the cost model's prediction for the replacement
    ms_measured: bool = False

    @classmethod
    def for_layer(cls, layer, per_node: dict) -> "LayerRow":
        """The row of a Layer before rewriting; per_node: tnonnx.macs' count by node name."""
        return cls(layer.name, layer.op_type, list(layer.weight_shape), layer.params, layer.macs_in(per_node),
                   reason=layer.reason)


def versions() -> dict:
    """The versions a report was made with."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("tnonnx", "onnx", "onnxruntime"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def source_info(model) -> dict:
    """The input model: its path (None for a ModelProto) and the sha256 of its bytes."""
    digest = hashlib.sha256()
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"path": str(model), "sha256": digest.hexdigest()}
    digest.update(model.SerializeToString())
    return {"path": None, "sha256": digest.hexdigest()}


def describe_calibration(calib, samples: int | None) -> dict | None:
    """Where the calibration data came from: a file path, "arrays", "reader" or "random N"."""
    if calib is None:
        return None
    if isinstance(calib, int) and not isinstance(calib, bool):
        source = f"random {calib}"
    elif isinstance(calib, (str, os.PathLike)):
        source = str(calib)
    elif hasattr(calib, "get_next"):
        source = "reader"
    else:
        source = "arrays"
    return {"source": source, "samples": samples}


@dataclass
class Totals:
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    macs_before: int
    macs_after: int
    ms_before: float | None = None  # whole model, p50 at the deployment shape
    ms_after: float | None = None
    ms_factorised: float | None = None  # before a change of precision (--quantize, --target gpu)


@dataclass
class LatencyInfo:
    """Where and how the times of a rewrite report were taken."""

    deployment: str  # input shapes and threads
    threads: int | None
    measured: bool  # False: predicted by the cost model (--no-timing)
    speedup_target: float | None = None
    timing_seconds: float = 0.0  # spent timing
    timed: int = 0  # models timed (not found in the cache)
    cache_hits: int = 0
    cache: str | None = None  # the timing cache file
    totals_cached: bool = False  # the whole-model times were taken by an earlier run (same plan, machine)
    other_load: float | None = None  # cores the rest of the machine kept busy while this run timed (latency.OtherLoad)


@dataclass
class InspectReport:
    rows: list[LayerRow]
    totals: Totals
    batch: int
    rewritable_params: int = 0  # parameters of the candidate layers (a shared weight once)
    notes: list[str] = field(default_factory=list)  # e.g. the symbolic dims tnonnx assumed
    source: dict | None = None  # input path and sha256
    versions: dict = field(default_factory=versions)

    def to_dict(self) -> dict:
        """Only what means something before a rewrite: no formats, ranks, after-counts, errors, times."""
        t = self.totals
        return {"input": self.source, "versions": self.versions, "batch": self.batch, "notes": self.notes,
                "totals": {"params_before": t.params_before, "bytes_before": t.bytes_before,
                           "macs_before": t.macs_before, "params_rewritable": self.rewritable_params},
                "layers": [{k: v for k, v in asdict(r).items() if k not in AFTER_FIELDS} for r in self.rows]}

    def render(self, console: Console) -> None:
        t = self.totals
        if not self.rows:
            console.print("no node with a constant weight in this model: nothing tnonnx can rewrite")
        columns = [Column("layer", name=True), Column("op", group="op"), Column("weight", group="weight"),
                   Column("params", "right"), Column("MACs", "right", group="MACs"), Column("% MACs", "right"),
                   Column("note", wrap=True)]
        rows = []
        for r in self.rows:
            share = f"{100 * r.macs_before / t.macs_before:.1f}" if r.macs_before and t.macs_before else "-"
            rows.append([r.name, r.op, _shape(r.weight_shape), _n(r.params_before), _n(r.macs_before), share,
                         r.reason or "candidate"])
        table, dropped = fit_table(f"weights (MACs at batch {self.batch})", columns, rows, console.width,
                                   ("MACs", "weight", "op"), n_essential=2)
        console.print(table)
        if dropped:
            console.print(legend(dropped, console.width, "tnonnx inspect --json"), highlight=False)
        console.print(f"model: {_n(t.params_before)} parameters, {_bytes(t.bytes_before)}, "
                      f"{_n(t.macs_before)} MACs at batch {self.batch}")
        candidates = sum(1 for r in self.rows if r.reason is None)
        share = f" ({100 * self.rewritable_params / t.params_before:.1f}% of the model)" if t.params_before else ""
        console.print(f"rewritable: {_n(self.rewritable_params)} parameters in {candidates} candidate layers{share}; "
                      f"{len(self.rows) - candidates} layers left alone, each with its reason", highlight=False)
        for note in self.notes:
            console.print(note, highlight=False)


@dataclass
class RewriteReport:
    format: str
    spec: str
    emit: str
    batch: int
    rows: list[LayerRow]
    totals: Totals
    validation: object | None = None  # validate.ValidationResult
    validation_skipped: str | None = None  # why, and how to give feeds (validate.skipped_note)
    validation_hint: str | None = None  # what a failed validation may owe to the plan, and the way out
    seconds: float = 0.0
    output_path: str | None = None
    notes: list[str] = field(default_factory=list)
    fit: str = "data-free"
    latency: LatencyInfo | None = None
    source: dict | None = None  # input path and sha256 (source_info)
    settings: dict = field(default_factory=dict)  # every option of the run, as given
    versions: dict = field(default_factory=versions)
    deploy: object | None = None  # deploy.DeployReport: target, quantization, comparisons
    stages: dict = field(default_factory=dict)  # wall seconds per stage (progress.STAGES), in the order run

    @property
    def ok(self) -> bool:
        """Validation passed (when run) and the target's checks held."""
        return (self.validation is None or self.validation.ok) and (self.deploy is None or self.deploy.ok)

    @property
    def rewritten(self) -> list[LayerRow]:
        return [r for r in self.rows if r.format]

    def to_dict(self) -> dict:
        return {
            "input": self.source, "versions": self.versions, "settings": self.settings,
            "format": self.format, "rank_rule": self.spec, "emit": self.emit, "fit": self.fit, "batch": self.batch,
            "seconds": round(self.seconds, 3), "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "output": self.output_path, "notes": self.notes,
            "totals": asdict(self.totals),
            "latency": asdict(self.latency) if self.latency is not None else None,
            "validation": self.validation.to_dict() if self.validation is not None else None,
            "validation_skipped": self.validation_skipped,
            "validation_hint": self.validation_hint,
            "deploy": self.deploy.to_dict() if self.deploy is not None else None,
            "layers": [asdict(r) for r in self.rows],
        }

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=False, default=str)

    def render(self, console: Console) -> None:
        fit = "" if self.fit == "data-free" else f", fit {self.fit}"
        title = f"tnonnx rewrite: {self.format}, {self.spec}, emit {self.emit}{fit}"
        # the output error on calibration data, when fitted to some; the weight error always
        # (none for nonlinear formats)
        with_output = any(r.output_error is not None for r in self.rows)
        timed = any(r.ms_after is not None for r in self.rows)
        columns = [Column("layer", name=True), Column("op", group="op"), Column("weight", group="weight"),
                   Column("format"), Column("emit", group="emit"), Column("ranks"), Column("params", "right"),
                   Column("→", "right"), Column("MACs", "right", group="MACs"), Column("→ ", "right", group="MACs")]
        if timed:
            columns += [Column("ms", "right", group="ms"), Column("→  ", "right", group="ms")]
        columns.append(Column("weight err", "right", group="weight err", short_header=True))
        with_held = any(r.held_out_error is not None for r in self.rows)
        if with_output:
            columns.append(Column("output err", "right", group="output err", short_header=True))
        if with_held:
            columns.append(Column("held-out err", "right", group="held-out err", short_header=True))
        columns.append(Column("note", wrap=True))
        rows = []
        for r in self.rows:
            times = [_ms(r.ms_before), _ms(r.ms_after, r.ms_measured)] if timed else []
            if r.format:
                notes = [f"shares {r.shared_with}" if r.shared_with else "", _growth(r, self.spec)]
                errors = ([_err(r.weight_error)] + ([_err(r.output_error)] if with_output else [])
                          + ([_err(r.held_out_error)] if with_held else []))
                rows.append([r.name, r.op, _shape(r.weight_shape), r.format, r.emission or "-", _ranks(r.ranks),
                             _n(r.params_before),
                             _n(r.params_after), _n(r.macs_before), _n(r.macs_after), *times, *errors,
                             "; ".join(n for n in notes if n)])
            else:
                rows.append([r.name, r.op, _shape(r.weight_shape), "dense", "-", "-", _n(r.params_before), "-",
                             _n(r.macs_before), "-", *(["-", "-"] if timed else []), "-",
                             *(["-"] if with_output else []), *(["-"] if with_held else []),
                             f"left alone: {r.reason}"])
        # on a narrow console: the output error is what a data-aware fit keeps small, so it stays longer
        errors = ("weight err",) + (("output err",) if with_output else ()) + (("held-out err",) if with_held else ())
        table, dropped = fit_table(title, columns, rows, console.width,
                                   ("MACs", "ms", "emit", "weight", "op") + errors, n_essential=len(errors))
        console.print(table)
        if dropped:
            console.print(legend(dropped, console.width, "the --report JSON"), highlight=False)
        if self.fit != "data-free" and any(r.weight_error is not None and r.weight_error > 1 for r in self.rows):
            console.print("weight err above 1: the data-aware fit targets each layer's outputs on the calibration "
                          "data, not its weights (output err is what it keeps small)", highlight=False)
        t = self.totals
        console.print(
            f"parameters {_n(t.params_before)} → {_n(t.params_after)} ({_ratio(t.params_before, t.params_after)}), "
            f"size {_bytes(t.bytes_before)} → {_bytes(t.bytes_after)}, "
            f"MACs at batch {self.batch} {_n(t.macs_before)} → {_n(t.macs_after)} "
            f"({_ratio(t.macs_before, t.macs_after)}); {len(self.rewritten)} of {len(self.rows)} layers rewritten "
            f"in {self.seconds:.2f} s")
        if self.stages:
            console.print(stage_times(self.stages), highlight=False)
        if t.macs_after > t.macs_before:
            console.print("[yellow]note: the rewritten model needs more MACs than the original[/yellow]")
        if t.ms_before is not None and t.ms_after is not None and self.latency is not None:
            how = "measured, p50" if self.latency.measured else "predicted by the cost model (--no-timing)"
            if self.latency.measured and self.latency.totals_cached:
                how += " (by an earlier run of the same plan: timing cache)"
            fact = (f" (factorised, before the change of precision: {t.ms_factorised:.3f} ms, "
                    f"{_speed(t.ms_before, t.ms_factorised)})" if t.ms_factorised is not None else "")
            load = self.latency.other_load
            console.print(f"latency {t.ms_before:.3f} ms → {t.ms_after:.3f} ms ({_speed(t.ms_before, t.ms_after)})"
                          f"{fact}, {how}, at {self.latency.deployment}"
                          + (f"; other work kept {load:.2f} cores busy while timing" if load is not None else "")
                          + (f"; --speedup {self.latency.speedup_target:g} asked" if self.latency.speedup_target else ""))
        for note in self.notes:
            console.print(f"[yellow]{note}[/yellow]" if "SLOWER" in note or "not reached" in note else note,
                          markup=True, highlight=False)
        if self.deploy is not None:
            render_deploy(self.deploy, console)
        if self.validation is not None:
            render_validation(self.validation, console)
            if self.validation_hint:
                console.print(f"[yellow]{escape(self.validation_hint)}[/yellow]", markup=True, highlight=False)
        if self.validation_skipped:
            console.print(f"[yellow]{escape(self.validation_skipped)}[/yellow]", markup=True, highlight=False)


def render_deploy(d, console: Console) -> None:
    """Target checks, quantization and the comparisons of the combined result, in lines
    and one table that fit 80 columns."""
    t = d.target
    console.print(f"target {t.target}: ops {', '.join(t.ops)}", highlight=False)
    q = d.quantization
    if q is not None:
        bits = f"{q.bits_per_weight:.2f}" if q.bits_per_weight is not None else "-"
        padded = f" ({len(q.int4_padded)} with a part-padded last block)" if q.int4_padded else ""
        console.print(f"quantized: {q.method}; {len(q.int4)} weights in int4{padded}, {len(q.int8)} in int8, "
                      f"{len(q.left_float)} left float; {bits} bits per weight", highlight=False)
    s = d.sizes
    if s.get("baseline"):
        console.print(f"size: original {_bytes(s['original'])}, factorised {_bytes(s['factorised'])}, final "
                      f"{_bytes(s['final'])} ({_ratio(s['original'], s['final'])}); quantized alone "
                      f"{_bytes(s['baseline'])} ({_ratio(s['original'], s['baseline'])})", highlight=False)
    if d.comparisons:
        table = Table(title="comparisons (same feeds)")
        for col in ("models", "cosine", "rel L2", "max abs", "top-1"):
            table.add_column(col, justify="left" if col == "models" else "right")
        for label, r in d.comparisons.items():
            o = min(r.outputs, key=lambda o: o.cosine)
            table.add_row(label, f"{o.cosine:.6f}", f"{o.rel_l2:.2e}", f"{o.max_abs:.2e}",
                          "-" if o.top1 is None else f"{o.top1:.4f}")
        console.print(table)
        final, base = d.comparisons.get("original → final"), d.comparisons.get("original → baseline")
        if final is not None and base is not None and final.accuracy_ref is not None:
            console.print(f"accuracy: original {final.accuracy_ref:.4f}, final {final.accuracy_test:.4f}, "
                          f"quantized alone {base.accuracy_test:.4f}", highlight=False)
        if final is not None and base is not None and s.get("baseline"):
            smaller = s["final"] <= s["baseline"]
            better = min(o.cosine for o in final.outputs) >= min(o.cosine for o in base.outputs)
            console.print("factorise-then-quantize " + ("is" if smaller else "is not") + " smaller than quantizing "
                          "alone and " + ("agrees at least as well" if better else "agrees less well")
                          + " with the original", highlight=False)
    for c in t.checks:
        mark = "[green]ok[/green]" if c["ok"] else "[red]FAIL[/red]"
        console.print(f"{mark} {c['check']}" + (f": {c['detail']}" if c["detail"] else ""), highlight=False)
    if t.ort_version:
        console.print(f".ort written by onnxruntime {t.ort_version}: loads in that version or newer", highlight=False)


def render_validation(result, console: Console) -> None:
    random = getattr(result, "random_feeds", False)
    what = f"{result.samples} {'random ' if random else ''}samples" if result.samples else None
    table = Table(title=f"validation on {what}" if what else "validation")
    for col in ("output", "max abs", "max rel", "rel L2", "cosine", "SNR dB", "top-1 agree"):
        table.add_column(col, justify="left" if col == "output" else "right")
    for o in result.outputs:
        table.add_row(o.name, f"{o.max_abs:.3e}", f"{o.max_rel:.3e}", f"{o.rel_l2:.3e}", f"{o.cosine:.6f}",
                      f"{o.snr_db:.1f}", "-" if o.top1 is None else f"{o.top1:.4f}")
    console.print(table)
    if random:
        console.print(f"validated on made-up inputs ({what or 'random feeds'} drawn from the model's input shapes), "
                      "not real data: give --inputs FILE.npz for a meaningful check", highlight=False)
    for note in getattr(result, "assumed", []):
        console.print(note, highlight=False)
    if result.accuracy_ref is not None:
        console.print(f"accuracy: original {result.accuracy_ref:.4f}, rewritten {result.accuracy_test:.4f} "
                      f"({100 * (result.accuracy_test - result.accuracy_ref):+.2f} points)")
    if result.failures:
        for f in result.failures:
            console.print(f"[red]FAIL[/red] {f}")
        console.print(f"validation failed ({_thresholds(result)}): the model is written, the exit code is 1")
    elif _thresholds(result):
        console.print(f"[green]validation passed[/green] ({_thresholds(result)})")


def _err(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def _n(v) -> str:
    if v is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return str(v)


def _bytes(v: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v} B"


def _shape(s) -> str:
    return "x".join(map(str, s)) if s else "-"


def _ranks(r) -> str:
    return ",".join(map(str, r)) if r else "-"


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x smaller" if b and a >= b else (f"{b / a:.2f}x larger" if a else "-")


def _ms(v, measured: bool = True) -> str:
    if v is None:
        return "?"
    return f"{v:.3f}" + ("" if measured else "*")


def _speed(before: float, after: float) -> str:
    if after <= 0 or before <= 0:
        return "-"
    return f"{before / after:.2f}x faster" if after <= before else f"{after / before:.2f}x SLOWER"


def _growth(r, spec: str = "") -> str:
    """A layer whose replacement costs more MACs than it did, said per layer; under --tol, that
    the tolerance asked for is what forces it."""
    if r.macs_before and r.macs_after and r.macs_after > r.macs_before:
        grown = f"MACs up {r.macs_after / r.macs_before:.2f}x"
        if spec.startswith("tol "):
            grown += (f": --{spec} needs ranks that cost more than the dense layer; a looser --tol, --rank or "
                      "--exclude keeps it cheaper")
        return grown
    return ""


def _thresholds(result) -> str:
    given = [f"{flag} {v:g}" for flag, v in (("--atol", result.atol), ("--rtol", result.rtol),
                                              ("--min-cosine", result.min_cosine),
                                              ("--max-accuracy-drop", getattr(result, "max_accuracy_drop", None)))
             if v is not None]
    basis = getattr(result, "accuracy_basis", None)
    if getattr(result, "max_accuracy_drop", None) is not None and basis:
        given[-1] += f" (on {basis}" + (")" if basis == "accuracy" else " with the original: no labels)")
    return ", ".join(given)
