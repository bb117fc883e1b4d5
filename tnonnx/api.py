"""The pipeline, in one place: load -> find layers -> plan -> fit -> emit -> replace ->
validate -> report. The CLI and the Python API both call these functions."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from . import calibrate, deploy, external, macs
from . import progress as progress_bars
from . import model as model_io
from .errors import OriginalDoesNotRun, TnonnxError
from .finetune import check_precision, resolve_precision
from .formats import is_nonlinear
from .recurrent_scan import to_scan
from .graph import Layer, find_layers
from .replace import replace_nodes
from .absorb import absorb_layouts
from .attention import logit_partners, weigh_logits
from .sensitivity import layer_sensitivity
from .latency import Clock, CostModelTimer, TimingCache, default_timer, deployment_feeds
from .layer_timing import LayerTimer
from .choose import SpeedRules, meet_speedup, slower_note
from .planner import Planner
from .plan import AUTO_FORMATS, Fitter, make_plan
from .layer_fits import emit_layer, fit_and_emit, fit_sequential, layer_data, partial, undersampled_note
from .targets import edge_violations
from .workers import Workers
from .report import InspectReport, LatencyInfo, LayerRow, RewriteReport, Totals, describe_calibration, source_info
from .validate import count_samples, skipped_note, with_default_threshold
from .validate import validate_models as compare_models
from .settings import FIT_MODES, RECURRENT_MODES, RewriteSettings



def inspect(model, *, batch: int = 1, shapes=None, recurrent: str = "fused") -> InspectReport:
    """The candidate layers of a model with their parameters and MACs (recurrent="scan": of
    the model as `rewrite --recurrent scan` sees it, its recurrent nodes written as Scans)."""
    m = model_io.load(model)
    notes = _recurrent_form(m, recurrent)
    layers = find_layers(m)
    cost = macs.count(m, calibrate.concrete_shapes(m, batch, shapes))
    rows = [LayerRow.for_layer(layer, cost.per_node) for layer in layers]
    rewritable = {l.weight_key: l.params for l in layers if l.reason is None}  # a shared weight once
    size = model_io.nbytes(m)
    return InspectReport(rows=rows, totals=Totals(cost.params, cost.params, size, size,
                                                  cost.total, cost.total), batch=batch,
                         rewritable_params=sum(rewritable.values()),
                         notes=model_io.upgrade_note(m) + notes + calibrate.assumed_dims(m, shapes) + cost.notes,
                         source=source_info(model))


def rewrite(model, *, progress=False, **options) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite the selected layers of `model` (path or ModelProto) in a factorised format.

    Returns the new model and its report. The input is never modified. The options are the
    CLI's, under the names and with the defaults of settings.RewriteSettings.of: budget="2x",
    modes="8x8x6,4x8x12", ops="MatMul,Gemm" (None: every rewritable op when tnonnx chooses,
    --budget or --format auto; else CANDIDATE_OPS). `target` (cpu, gpu, edge) and `quantize`
    (int8, int4) make the factorised model ready for where it runs (deploy.py); the report's
    `deploy` says what was done and checked. `workers`: processes fitting layers side by side
    (default: the cores available; tnonnx/workers.py). `progress`: whether to draw each
    stage's progress on stderr, or a progress.Stages. `keep_columns`: whether features-first
    layers with only elementwise ops between them keep the columns layout across those ops
    (absorb.py; False leaves each layer's emission as it is).
    """
    return rewrite_with(model, RewriteSettings.of(**options), progress=progress)


@dataclasses.dataclass
class _Work:
    """What one rewrite has made so far, passed from stage to stage."""

    original: onnx.ModelProto
    new: onnx.ModelProto
    layers: list
    plans: list
    states: dict
    notes: list
    batches: list | None = None
    used_precision: str | None = None  # what the last training phase resolved --train-precision to
    clock: Clock | None = None  # the timings (and their sessions) of this rewrite
    speed_feeds: dict | None = None  # random inputs at the deployment shape
    tensor_shapes: macs.TensorShapes | None = None  # the original's, for the timing models and MAC counts
    concrete: dict | None = None  # the original's input shapes at the deployment shape
    floored: int = 0  # candidates the never-slower rule left out (Planner.floored)


def rewrite_with(model, s: RewriteSettings, progress=False) -> tuple[onnx.ModelProto, RewriteReport]:
    """tnonnx.rewrite with its settings grouped (settings.RewriteSettings)."""
    started, read_before = time.perf_counter(), external.traffic.read
    pool = Workers(s.fitting.workers, torch=s.fitting.mode != "data-free" or is_nonlinear(s.rule.format))
    stages = progress_bars.Stages.of(progress)
    _check_training(s)  # the command line's own errors first, before the model is read
    work = _load_and_plan(model, s)
    original, new, plans = work.original, work.new, work.plans
    fitting, speed, delivery = s.fitting, s.speed, s.delivery
    shapes = s.deployment.given_shapes
    # the fit and the fine-tuning read the calibration data, and so do fp16 ranges and static int8
    if fitting.calib is not None and (fitting.mode != "data-free" or fitting.finetune or delivery.target == "gpu"
                                      or (delivery.quantization is not None and delivery.quantization.static)):
        work.batches, _ = calibrate.feed_batches(fitting.calib, original, batch=s.deployment.batch, shapes=shapes,
                                                 what="--calib")
    if fitting.admm:  # the dense graph trained towards the rank set; the layers are then fitted to it
        from . import admm_graph

        work.used_precision = resolve_precision(fitting.train_precision, sum(p.layer.weight.size for p in plans))
        work.notes += admm_graph.admm_train(new, original, plans, work.batches, epochs=fitting.finetune,
                                            hidden_weight=fitting.finetune_hidden,
                                            rho=admm_graph.RHO if fitting.admm_rho is None else fitting.admm_rho,
                                            options=s.rule.format_options or {}, precision=work.used_precision)
    replacements = _fit_layers(work, s, pool, stages)
    clock = work.clock
    _train_after_fitting(work, s, replacements, stages)
    emitted = _emitted(replacements)
    if speed.keep_columns and (absorbed := absorb_layouts(new, emitted)):
        work.notes.append(f"{absorbed} pair(s) of features-first layers keep their columns layout across the "
                          "elementwise ops between them (two Transposes of the activation fewer per pair)")
    _check(new)
    factorised, deployed, baseline = new, None, None
    if delivery.changes_model:
        stem = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
        with stages.stage("deploy"):
            new, deployed, baseline = deploy.finish(original, new, delivery.deployment_target, delivery.quantization,
                                                    work.batches, emitted, shapes, stem)
    before_ms, after_ms, fact_ms = _latency(work, s, new, factorised, deployed, stages)
    seconds = time.perf_counter() - started
    if external.traffic.read > read_before:
        work.notes.append(f"weights read from the input's data file: "
                          f"{progress_bars.size(external.traffic.read - read_before)} of "
                          f"{progress_bars.size(external.data_bytes(original))}")
    work.notes.extend(calibrate.assumed_dims(original, shapes))
    before, after = (macs.count(m, work.concrete, work.tensor_shapes) for m in (original, factorised))
    work.notes.extend(after.notes)
    rows = _rows(work.layers, replacements, before, after)
    work.notes.extend(deploy.unaligned_notes(rows, delivery.target, delivery.quantization, _ranks_text))
    result, skipped, min_cosine = _validate(work, s, new, factorised, deployed, baseline, stages)
    totals = Totals(before.params, after.params, model_io.nbytes(original), model_io.nbytes(new),
                    before.total, after.total, ms_before=before_ms, ms_after=after_ms, ms_factorised=fact_ms)
    report = RewriteReport(
        format=s.rule.format, spec=s.rule.describe(), emit=speed.emit, batch=s.deployment.batch, rows=rows,
        totals=totals, validation=result, validation_skipped=skipped, seconds=seconds, fit=fitting.mode,
        validation_hint=_floor_hint(work.floored) if result is not None and result.failures else None,
        notes=work.notes, deploy=deployed, stages=dict(stages.seconds),
        latency=LatencyInfo(deployment=s.deployment.describe(original), threads=s.deployment.threads,
                            measured=clock.measures, speedup_target=speed.speedup,
                            timing_seconds=round(clock.seconds, 3), timed=clock.timed, cache_hits=clock.cache.hits,
                            cache=str(clock.cache.path) if clock.cache.enabled else None,
                            totals_cached=clock.last_cached, other_load=_two_places(clock.other_load.cores)),
        source=source_info(model), settings=_settings_record(s, work, min_cosine))
    clock.cache.save()
    clock.sessions.close()
    return new, report


def _load_and_plan(model, s: RewriteSettings) -> _Work:
    """The original, the copy to rewrite (recurrent nodes as Scans with --recurrent scan), its
    layers and the plan for the selected ones."""
    original = model_io.load(model)
    if s.speed.emit == "einsum" and model_io.default_opset(original) < 12:
        raise TnonnxError("--emit einsum needs opset >= 12; the model has opset "
                          f"{model_io.default_opset(original)}")
    new = onnx.ModelProto()
    new.CopyFrom(original)
    early_notes, states = _recurrent_form(new, s.scope.recurrent, with_states=True)
    layers = find_layers(new)
    for layer in layers:  # R of a Scan cell is calibrated on the state sequence the Scan outputs
        layer.probe_x = states.get(layer.name, "")
    plans = make_plan(layers, s.rule.format, s.rule.spec, s.scope.selection, s.rule.modes, s.rule.order)
    if not plans:
        raise TnonnxError(f"nothing to rewrite: no selected {'/'.join(s.scope.selection.ops)} layer with a "
                          "constant weight" + _reasons_summary(layers))
    return _Work(original, new, layers, plans, states, model_io.upgrade_note(original) + early_notes)


def _two_places(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _check_training(s: RewriteSettings) -> None:
    """TnonnxError for fitting and training options that do not go together."""
    f = s.fitting
    if f.mode not in FIT_MODES:
        raise TnonnxError(f"--fit {f.mode}: choose from {', '.join(FIT_MODES)}")
    if f.finetune < 0:
        raise TnonnxError(f"--finetune {f.finetune}: must be >= 0 epochs")
    if f.finetune_hidden < 0:
        raise TnonnxError(f"--finetune-hidden {f.finetune_hidden:g}: must be >= 0")
    if (f.mode != "data-free" or f.finetune) and f.calib is None:
        what = f"--fit {f.mode}" if f.mode != "data-free" else "--finetune"
        raise TnonnxError(f"{what} needs calibration data: give --calib FILE.npz or --calib-random N")
    if f.admm_rho is not None and not f.admm:
        raise TnonnxError("--admm-rho applies to --admm")
    check_precision(f.train_precision)  # before any fitting, though it resolves per training phase
    if f.admm:
        from . import admm_graph

        if not f.finetune:
            raise TnonnxError("--admm trains for the --finetune epochs: give --finetune N (N >= 1)")
        admm_graph.check(s.rule.format, s.rule.spec, s.rule.budget)


def _fit_layers(work: _Work, s: RewriteSettings, pool: Workers, stages):
    """Capture the calibration data, plan (the planner where tnonnx chooses), fit and emit;
    returns the replacements keyed by id(node) (and sets work's clock, feeds and shapes)."""
    original, new, plans, rule, speed = work.original, work.new, work.plans, s.rule, s.speed
    fit, batches = s.fitting.mode, work.batches
    data = {}
    if fit in ("aware", "blockwise") or (fit == "sequential" and rule.choosing):
        # every layer's inputs in the original model (sequential: for choosing ranks only)
        with stages.stage("capture", len(batches) + len(plans), "batches and layers") as stage:
            data = layer_data(new if work.states else original, [p.layer for p in plans], batches,
                              advance=stage.advance)
    fitter = Fitter(rule.format_options, data, balance=s.delivery.target == "gpu")
    clock = Clock(speed.timer if speed.timer is not None else (default_timer() if speed.timing else CostModelTimer()),
                  TimingCache(enabled=speed.timing and speed.timing_cache), s.deployment.threads)
    work.concrete = concrete = calibrate.concrete_shapes(original, s.deployment.batch, s.deployment.given_shapes)
    # one look at the original's tensor shapes (one run at most) for the layers' timing models and both MAC counts
    tensor_shapes = macs.TensorShapes(original, concrete,
                                      extra=[t for p in plans for t in (p.layer.x, p.layer.bias_input) if t])
    layer_timer = LayerTimer(original, [p.layer for p in plans], s.deployment, clock, emit_layer,
                             model_io.default_opset(original), tensor_shapes)
    speed_feeds = deployment_feeds(original, s.deployment)
    work.clock, work.speed_feeds, work.tensor_shapes = clock, speed_feeds, tensor_shapes
    rules = SpeedRules(speed.speedup, floor=rule.choosing and not speed.allow_slower, emit=speed.emit)
    if fit in ("aware", "blockwise") and data:
        partners = logit_partners(new.graph, [p.layer for p in plans], tensor_shapes)
        if weighed := weigh_logits(data, [p.layer for p in plans], partners):
            work.notes.append(f"attention: {weighed} query/key projection(s) fitted for the attention logits they "
                              "make (each one's output error measured in its partner's per-head moments)")
    if undersampled := undersampled_note(data):
        work.notes.append(undersampled)
    # small SVDs run far slower multi-threaded in OpenBLAS (and collapse when cores are busy)
    with threadpool_limits(1, user_api="blas"), pool:
        candidates = AUTO_FORMATS if rule.format == "auto" else (rule.format,)
        sensitivity = None
        if rule.budget is not None and data:
            sensitivity = layer_sensitivity(original, new, fitter, batches, speed.emit)
        before_ms = clock.models([original], speed_feeds, keep=True)[0] if speed.speedup else None
        planner = Planner(plans, fitter, candidates, rule.budget, rules, layer_timer, sensitivity, before_ms,
                          align=rule.spec.align)
        # a planner emits the fits it judged on the held-out rows; a fixed rank rule refits on all rows
        fitter.pool_final = not planner.choosing
        if planner.choosing:
            with stages.stage("allocate", len(planner.groups), "layers") as stage:
                planner.prepare(pool, stage.advance)

        predicted = {}  # id of a plan built -> its time as the layers' timings predict it

        def build(slack: float) -> dict:
            active = planner.plan(slack)
            with stages.stage("fit", len(active), "layers") as stage:
                if fit == "sequential":
                    reps = fit_sequential(original, new, active, fitter, batches, s.scope.force, layer_timer, rules,
                                          stage.advance, pool)
                else:
                    reps = fit_and_emit(active, fitter, s.scope.force, layer_timer, rules, stage.advance, pool)
            predicted[id(reps)] = planner.predicted_ms
            return reps

        if speed.speedup and before_ms is not None:
            replacements = meet_speedup(build, lambda reps: _against_original(
                clock, original, _planned(new, reps, speed.keep_columns), speed_feeds, before_ms) if reps else None,
                before_ms / speed.speedup, before_ms=before_ms, predict=lambda reps: predicted.get(id(reps)))
        else:
            replacements = build(0.0)
        work.notes.extend(planner.notes + ([used] if (used := pool.note()) else []))
        work.floored = sum(planner.floored.values())
    if speed.emit == "rows":  # edge: a layer whose emission still breaks the rules stays dense
        owner = {n.name: key for key, r in replacements.items() for n in r.builder.nodes}
        for broken in edge_violations(partial(new, replacements), set(owner)):
            node, what = broken.split(": ", 1)
            r = replacements.pop(owner.get(node), None)
            if r is not None:
                r.layer.reason = f"left dense for --target edge: {what} in its {r.plan.format} emission"
    if not replacements:
        what = f"--speedup {speed.speedup:g} cannot be met" if speed.speedup else "no layer gets smaller at this rank"
        raise TnonnxError(f"nothing to rewrite: {what}" + _reasons_summary(work.layers))
    inputs_removed = replace_nodes(new, {k: (r.layer.graph, r.builder.nodes, r.builder.initializers)
                                         for k, r in replacements.items()}, work.layers)
    if inputs_removed:
        work.notes.append(f"{len(inputs_removed)} constant(s) of the rewritten layers were also listed as graph inputs "
                          f"(IR 3 style): removed from the inputs ({', '.join(inputs_removed[:4])}"
                          f"{', ...' if len(inputs_removed) > 4 else ''}), so the output runs on the data inputs alone")
    model_io.normalise_versions(new)
    if speed.emit == "custom":
        from .custom_ops import DOMAIN, needs_library

        if needs_library(new):
            work.notes.append(f"the output uses tnonnx's custom-op library (domain {DOMAIN}): build it with `tnonnx "
                              "build-ops`; `tnonnx validate`/`bench` load it, other runtimes need "
                              "register_custom_ops_library")
    return replacements


def _train_after_fitting(work: _Work, s: RewriteSettings, replacements: dict, stages) -> None:
    """--fit blockwise and --finetune: the factorised layers' cores trained through the graph."""
    fitting, new, batches = s.fitting, work.new, work.batches
    trainable = {t.name for r in replacements.values() for t in r.builder.initializers
                 if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)}
    if fitting.mode == "blockwise" or fitting.finetune:
        trained_params = sum(math.prod(t.dims) for r in replacements.values() for t in r.builder.initializers
                             if t.name in trainable)
        work.used_precision = resolve_precision(fitting.train_precision, trained_params)
    bf16 = work.used_precision == "bf16"
    if fitting.mode == "blockwise":
        from .blockwise import blocks, refine_blocks

        runs = blocks(new, trainable)
        with stages.stage("refine", len(runs), "blocks") as stage:
            errors = refine_blocks(new, work.original, batches, trainable, log=lambda _: stage.advance(), runs=runs,
                                   precision=work.used_precision)
        if errors:
            work.notes.append(f"blockwise: {len(errors)} block(s) refined; relative error at their outputs on the "
                              f"calibration data {np.mean([b for b, _ in errors]):.4g} -> "
                              f"{np.mean([a for _, a in errors]):.4g} (mean over blocks"
                              f"{'; bf16 products' if bf16 else ''})")
    if fitting.finetune:
        from .finetune import finetune as distill

        hidden = [r.layer.x for r in replacements.values()]  # what each rewritten layer is fed
        with stages.stage("finetune", fitting.finetune, "epochs") as stage:
            before_ft, after_ft = distill(new, work.original, batches, trainable, epochs=fitting.finetune,
                                          hidden=hidden, hidden_weight=fitting.finetune_hidden,
                                          log=lambda _: stage.advance(), precision=work.used_precision)
        matched = (f"outputs and the rewritten layers' inputs, weight {fitting.finetune_hidden:g}"
                   if fitting.finetune_hidden else "outputs only")
        work.notes.append(f"finetune: relative output error on the calibration data {before_ft:.4g} -> "
                          f"{after_ft:.4g} after {fitting.finetune} epoch(s) of end-to-end distillation ({matched}"
                          f"{', bf16 products' if bf16 else ''})")


def _latency(work: _Work, s: RewriteSettings, new, factorised, deployed, stages):
    """The original's and the output's latency at the deployment shape (and the factorised
    model's before a change of precision): (before, after, factorised) ms; --speedup judged."""
    speed, delivery = s.speed, s.delivery
    # a change of precision (int8, int4, fp16) is timed apart from the factorisation
    precision = deployed is not None and (delivery.quantization is not None or delivery.target == "gpu")
    with stages.stage("latency"):
        before_ms, after_ms, *fact_ms = work.clock.models([work.original, new] + ([factorised] if precision else []),
                                                     work.speed_feeds, keep=True)
    fact_ms = fact_ms[0] if fact_ms else None
    if before_ms is None or after_ms is None:
        if speed.speedup:
            raise TnonnxError(f"--speedup {speed.speedup:g}: the models could not be timed at the deployment shape "
                              "(onnxruntime does not run them on random inputs of it)")
        work.notes.append("latency not measured: onnxruntime does not run the models on random inputs at the "
                          "deployment shape (give --shape)")
        before_ms = after_ms = None
    ratio = before_ms / after_ms if before_ms and after_ms else float("inf")
    if speed.speedup and ratio < speed.speedup:
        shortfall = (f"--speedup {speed.speedup:g}: not reached; the best plan found runs {ratio:.2f}x as fast as "
                     f"the original ({after_ms:.3f} ms against {before_ms:.3f} ms at "
                     f"{s.deployment.describe(work.original)})")
        if not speed.keep_best:
            raise TnonnxError(shortfall + "; nothing written (--keep-best writes it anyway)")
        work.notes.append(shortfall + "; written because of --keep-best")
    if precision and before_ms and after_ms and fact_ms and after_ms > before_ms:
        work.notes.append(deploy.slower_note(delivery.quantization, before_ms, fact_ms, after_ms))
    factorised_ms = fact_ms if precision else after_ms
    if before_ms and factorised_ms and factorised_ms > before_ms:
        work.notes.append(slower_note(s.rule.format, s.rule.budget, speed.speedup, speed.allow_slower, before_ms,
                                      factorised_ms)
                          + (" (the factorised model, before the change of precision)" if precision else ""))
    return before_ms, after_ms, fact_ms


def _validate(work: _Work, s: RewriteSettings, new, factorised, deployed, baseline, stages):
    """The comparison with the original: (result, the note when the default check was skipped,
    the min-cosine threshold used)."""
    c, batch, shapes = s.checks, s.deployment.batch, s.deployment.given_shapes
    result = skipped = None
    min_cosine = c.min_cosine
    with stages.stage("validate") if c.validate or deployed is not None else contextlib.nullcontext():
        if c.validate:
            # checks the user asked for (a threshold, or --inputs) fail loudly; the default check skips
            min_cosine = with_default_threshold(c.atol, c.rtol, c.min_cosine, c.max_accuracy_drop)
            if deployed is not None:
                result = deploy.compare(deployed, work.original, factorised, new, baseline, inputs=c.inputs,
                                        shapes=shapes, batch=batch,
                                        thresholds=dict(atol=c.atol, rtol=c.rtol, min_cosine=min_cosine,
                                                        max_accuracy_drop=c.max_accuracy_drop))
            else:
                try:
                    # on the sessions the timing opened (without timing, one model's at a time)
                    result = compare_models(work.original, new, inputs=c.inputs, shapes=shapes, batch=batch,
                                            atol=c.atol, rtol=c.rtol, min_cosine=min_cosine,
                                            max_accuracy_drop=c.max_accuracy_drop,
                                            open_session=work.clock.session if work.clock.measures else None)
                except OriginalDoesNotRun as exc:
                    if c.asked:
                        raise
                    skipped = skipped_note(exc)
        elif deployed is not None:
            deploy.check_ort(deployed, new, inputs=c.inputs, shapes=shapes, batch=batch)
    return result, skipped, min_cosine


def _settings_record(s: RewriteSettings, work: _Work, min_cosine) -> dict:
    """The report's record of the settings (its JSON `settings`)."""
    rule, sel, f, speed, c, d = s.rule, s.scope.selection, s.fitting, s.speed, s.checks, s.delivery
    return {"format": rule.format, "rank_rule": {"rank": rule.rank, "tol": rule.tol, "ratio": rule.ratio,
                                                 "budget": rule.budget},
            "modes": rule.modes_text, "order": rule.order, "format_options": dict(rule.format_options or {}),
            "emit": speed.emit, "keep_columns": speed.keep_columns,
            "ops": list(sel.ops), "recurrent": s.scope.recurrent, "include": sel.include, "exclude": sel.exclude,
            "min_params": sel.min_params, "force": s.scope.force,
            "calibration": describe_calibration(f.calib, count_samples(work.batches) if work.batches else None),
            "fit": f.mode, "finetune": {"epochs": f.finetune, "hidden_weight": f.finetune_hidden, "admm": f.admm,
                                        "admm_rho": f.admm_rho, "precision": f.train_precision,
                                        "precision_used": work.used_precision},
            "deployment": {"batch": s.deployment.batch,
                           "shapes": {k: list(v) for k, v in s.deployment.shape_map.items()},
                           "threads": s.deployment.threads},
            "speedup": speed.speedup, "allow_slower": speed.allow_slower, "keep_best": speed.keep_best,
            "timing": speed.timing, "target": d.target, "quantize": d.quantize, "int8": d.int8,
            "short_names": d.short_names, "workers": f.workers, "max_model_bytes": d.max_model_bytes,
            "validate": c.validate,
            "inputs": describe_calibration(c.inputs, None)["source"] if c.inputs is not None else None,
            "thresholds": {"atol": c.atol, "rtol": c.rtol, "min_cosine": min_cosine,
                           "max_accuracy_drop": c.max_accuracy_drop}}


def _recurrent_form(model: onnx.ModelProto, recurrent: str, with_states: bool = False):
    """--recurrent scan: the recurrent nodes written as Scans in `model` (in place); the notes
    (and with_states: the Scan outputs that calibrate each R, see recurrent_scan.to_scan)."""
    if recurrent not in RECURRENT_MODES:
        raise TnonnxError(f"--recurrent {recurrent}: choose from {', '.join(RECURRENT_MODES)}")
    notes, states = to_scan(model) if recurrent == "scan" else ([], {})
    return (notes, states) if with_states else notes


def _check(model: onnx.ModelProto) -> None:
    if model_io.came_with_external_data(model):  # their data files were checked when loaded
        model = external.emptied(model)
    onnx.checker.check_model(model_io.skeleton(model, dims=False))  # weights' values unread: all but them checked


def _rows(layers, replacements, before, after) -> list[LayerRow]:
    rows, first_user = [], {}
    for layer in layers:
        rep = replacements.get(id(layer.node))
        row = LayerRow.for_layer(layer, before.per_node)
        if rep is not None and rep.layer is layer:  # (an LSTM's R row shares its node with W)
            fact = rep.fact
            shared_with = first_user.setdefault(id(fact), layer.name)
            row.format, row.ranks = rep.plan.format, list(fact.ranks)
            row.params_after = fact.params() if shared_with == layer.name else 0
            row.shared_with = None if shared_with == layer.name else shared_with
            row.macs_after = sum(after.per_node.get(n.name, 0) for n in rep.builder.nodes)
            if layer.kind == "recurrent" and row.macs_before:  # the new node's R products stay on R's row
                row.macs_after -= round(before.per_node[layer.name] * (1 - layer.macs_share))
            row.weight_error = fact.weight_error
            row.output_error = fact.output_error
            row.held_out_error = getattr(fact, "held_out_error", None)
            row.reason = None
            row.emission = rep.plan.emission
            if rep.plan.timing is not None:
                row.ms_after, row.ms_predicted = rep.plan.timing.ms, rep.plan.timing.predicted_ms
                row.ms_measured = rep.plan.timing.measured
            if rep.plan.dense_timing is not None:
                row.ms_before = rep.plan.dense_timing.ms
        rows.append(row)
    return rows


def _ranks_text(ranks) -> str:
    return ",".join(map(str, ranks))


def _emitted(replacements: dict) -> set[str]:
    """The names of the nodes tnonnx emitted for the replacements."""
    return {n.name for r in replacements.values() for n in r.builder.nodes}


def _planned(base: onnx.ModelProto, replacements: dict, keep_columns: bool) -> onnx.ModelProto:
    """The model a plan makes, its layouts kept across elementwise ops as the written model's
    will be: what --speedup times."""
    model = partial(base, replacements)
    if keep_columns:
        absorb_layouts(model, _emitted(replacements))
    return model


def _against_original(clock, original, candidate, feeds, before_ms: float) -> float | None:
    """`candidate`'s time in the frame of `before_ms` (the original's first timing): both
    models timed again, interleaved, and their ratio taken. A plan measured alone, minutes
    after the original, is judged against a machine whose load has moved since (on a busy
    machine that sent --speedup re-planning to ranks far lower than needed)."""
    original_ms, candidate_ms = clock.models([original, candidate], feeds, keep=True)
    if original_ms is None or candidate_ms is None:
        return None
    return before_ms * candidate_ms / original_ms


def _floor_hint(floored: int) -> str | None:
    """What a failed validation may owe to the never-slower rule, and the way out."""
    if not floored:
        return None
    return (f"the never-slower rule left out {floored} candidate(s) timed slower than their dense layer, so "
            "fewer layers carry the budget, at lower ranks: --allow-slower lets them share it (the report "
            "then says how much slower the model is), or give the speed you need with --speedup X")


def _reasons_summary(layers: list[Layer]) -> str:
    reasons = sorted({l.reason for l in layers if l.reason})
    return f" ({'; '.join(reasons[:3])})" if reasons else ""


def save(model: onnx.ModelProto, path, *, progress: bool = False, **kwargs):
    """model_io.save, with a bar of the bytes written when `progress`."""
    with progress_bars.writing(str(path), model_io.nbytes(model), progress) as update:
        return model_io.save(model, path, progress=update, **kwargs)
