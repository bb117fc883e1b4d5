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
from .finetune import HIDDEN_WEIGHT, check_precision, resolve_precision
from .formats import is_nonlinear
from .recurrent_scan import to_scan
from .graph import Layer, find_layers
from .replace import replace_nodes
from .absorb import absorb_layouts
from .attention import logit_partners, weigh_logits
from .sensitivity import layer_sensitivity
from .latency import Clock, CostModelTimer, Deployment, TimingCache, default_timer, deployment_feeds
from .layer_timing import LayerTimer
from .choose import SpeedRules, meet_speedup, slower_note
from .planner import Planner
from .plan import AUTO_FORMATS, Fitter, Selection, make_plan, parse_budget, parse_ops, rank_spec
from .layer_fits import emit_layer, fit_and_emit, fit_sequential, layer_data, partial, undersampled_note
from .targets import edge_violations
from .workers import Workers
from .report import InspectReport, LatencyInfo, LayerRow, RewriteReport, Totals, describe_calibration, source_info
from .tensorize import format_modes, modes_list
from .validate import check_thresholds, count_samples, skipped_note, with_default_threshold
from .validate import validate_models as compare_models

EMIT_MODES = ("auto", "matmul", "features-first", "einsum", "custom")
FIT_MODES = ("data-free", "aware", "sequential", "blockwise")
RECURRENT_MODES = ("fused", "scan")


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


def rewrite(model, *, format: str = "tt", rank: int | None = None, tol: float | None = None,
            ratio: float | None = None, budget: float | None = None, modes: str | tuple | None = None,
            order: int | None = None, format_options: dict | None = None,
            emit: str = "auto", batch: int = 1, ops=None, recurrent: str = "fused",
            include: str | None = None,
            exclude: str | None = None, min_params: int = 0, force: bool = False, validate: bool = True,
            inputs=None, shapes=None, atol: float | None = None, rtol: float | None = None,
            min_cosine: float | None = None, max_accuracy_drop: float | None = None, fit: str = "data-free", calib=None, finetune: int = 0,
            finetune_hidden: float = HIDDEN_WEIGHT, admm: bool = False, admm_rho: float | None = None,
            train_precision: str = "auto", threads: int | None = None, speedup: float | None = None,
            allow_slower: bool = False, keep_best: bool = False, timing: bool = True, timing_cache: bool = True,
            timer=None, progress=False, target: str = "cpu", quantize: str | None = None,
            int8: str | None = None, max_model_bytes: int | None = None, short_names: bool = False,
            workers: int | None = None, keep_columns: bool = True) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite the selected layers of `model` (path or ModelProto) in a factorised format.

    Returns the new model and its report. The input is never modified. Options take the
    CLI's values: budget="2x", modes="8x8x6,4x8x12", ops="MatMul,Gemm" (None: every
    rewritable op when tnonnx chooses, --budget or --format auto; else CANDIDATE_OPS). `target` (cpu, gpu,
    edge) and `quantize` (int8, int4) make the factorised model ready for where it runs
    (deploy.py); the report's `deploy` says what was done and checked. `workers`: processes
    fitting layers side by side (default: the cores available; tnonnx/workers.py). `progress`:
    whether to draw each stage's progress on stderr, or a progress.Stages. `keep_columns`:
    whether features-first layers with only elementwise ops between them keep the columns
    layout across those ops (absorb.py; False leaves each layer's emission as it is).
    """
    started, read_before = time.perf_counter(), external.traffic.read
    if emit not in EMIT_MODES:
        raise TnonnxError(f"--emit {emit}: choose from {', '.join(EMIT_MODES)}")
    check_thresholds(atol, rtol, min_cosine, max_accuracy_drop, batch)
    deployment_target, quantization, emit = deploy.plan(target, quantize, emit, calib is not None, max_model_bytes,
                                                        int8, short_names)
    budget = parse_budget(budget)
    ops = parse_ops(ops, choosing=budget is not None or format == "auto")
    if threads is not None and threads < 1:
        raise TnonnxError(f"--threads {threads}: must be >= 1")
    pool = Workers(workers, torch=fit != "data-free" or is_nonlinear(format))
    stages = progress_bars.Stages.of(progress)
    if speedup is not None and not speedup > 0:
        raise TnonnxError(f"--speedup {speedup:g}: must be > 0 (e.g. 1.5)")
    rank = deploy.align_rank(rank, target, quantization)
    spec = rank_spec(rank, tol, ratio, budget)
    if quantization is not None and quantization.mode == "int4":
        spec = dataclasses.replace(spec, align=quantization.block_size)
    if modes is not None:
        modes = modes_list(modes)
    modes_text = None if modes is None else ";".join(map(format_modes, modes))
    original = model_io.load(model)
    if emit == "einsum" and model_io.default_opset(original) < 12:
        raise TnonnxError("--emit einsum needs opset >= 12; the model has opset "
                          f"{model_io.default_opset(original)}")
    new = onnx.ModelProto()
    new.CopyFrom(original)
    early_notes, states = _recurrent_form(new, recurrent, with_states=True)
    layers = find_layers(new)
    for layer in layers:  # R of a Scan cell is calibrated on the state sequence the Scan outputs
        layer.probe_x = states.get(layer.name, "")
    selection = Selection(ops=tuple(ops), include=include, exclude=exclude, min_params=min_params)
    plans = make_plan(layers, format, spec, selection, modes, order)
    if not plans:
        raise TnonnxError(f"nothing to rewrite: no selected {'/'.join(ops)} layer with a constant weight"
                          + _reasons_summary(layers))

    if fit not in FIT_MODES:
        raise TnonnxError(f"--fit {fit}: choose from {', '.join(FIT_MODES)}")
    batches = None
    if finetune < 0:
        raise TnonnxError(f"--finetune {finetune}: must be >= 0 epochs")
    if finetune_hidden < 0:
        raise TnonnxError(f"--finetune-hidden {finetune_hidden:g}: must be >= 0")
    if (fit != "data-free" or finetune) and calib is None:
        what = f"--fit {fit}" if fit != "data-free" else "--finetune"
        raise TnonnxError(f"{what} needs calibration data: give --calib FILE.npz or --calib-random N")
    if admm_rho is not None and not admm:
        raise TnonnxError("--admm-rho applies to --admm")
    check_precision(train_precision)  # before any fitting, though it resolves per training phase
    used_precision = None  # what the last training phase resolved it to, for the report
    if admm:
        from . import admm_graph

        if not finetune:
            raise TnonnxError("--admm trains for the --finetune epochs: give --finetune N (N >= 1)")
        admm_graph.check(format, spec, budget)
    # the fit and the fine-tuning read the calibration data, and so do fp16 ranges and static int8
    if calib is not None and (fit != "data-free" or finetune or target == "gpu"
                              or (quantization is not None and quantization.static)):
        batches, _ = calibrate.feed_batches(calib, original, batch=batch, shapes=shapes, what="--calib")
    notes = []
    if admm:  # the dense graph trained towards the rank set; the layers are then fitted to it
        dense_params = sum(p.layer.weight.size for p in plans)
        used_precision = resolve_precision(train_precision, dense_params)
        notes += admm_graph.admm_train(new, original, plans, batches, epochs=finetune, hidden_weight=finetune_hidden,
                                       rho=admm_graph.RHO if admm_rho is None else admm_rho,
                                       options=format_options or {}, precision=used_precision)
    data = {}
    if fit in ("aware", "blockwise") or (fit == "sequential" and (budget is not None or format == "auto")):
        # every layer's inputs in the original model (sequential: for choosing ranks only)
        with stages.stage("capture", len(batches) + len(plans), "batches and layers") as stage:
            data = layer_data(new if states else original, [p.layer for p in plans], batches, advance=stage.advance)
    fitter = Fitter(format_options, data, balance=target == "gpu")
    deployment = Deployment.of(batch, shapes, threads)
    clock = Clock(timer if timer is not None else (default_timer() if timing else CostModelTimer()),
                  TimingCache(enabled=timing and timing_cache), threads)
    concrete = calibrate.concrete_shapes(original, batch, shapes)
    # one look at the original's tensor shapes (one run at most) for the layers' timing models and both MAC counts
    tensor_shapes = macs.TensorShapes(original, concrete,
                                      extra=[t for p in plans for t in (p.layer.x, p.layer.bias_input) if t])
    layer_timer = LayerTimer(original, [p.layer for p in plans], deployment, clock, emit_layer,
                             model_io.default_opset(original), tensor_shapes)
    speed_feeds = deployment_feeds(original, deployment)
    rules = SpeedRules(speedup, floor=(budget is not None or format == "auto") and not allow_slower,
                       emit=emit)
    notes = model_io.upgrade_note(original) + early_notes + notes
    if fit in ("aware", "blockwise") and data:
        partners = logit_partners(new.graph, [p.layer for p in plans], tensor_shapes)
        if weighed := weigh_logits(data, [p.layer for p in plans], partners):
            notes.append(f"attention: {weighed} query/key projection(s) fitted for the attention logits they make "
                         "(each one's output error measured in its partner's per-head moments)")
    if undersampled := undersampled_note(data):
        notes.append(undersampled)
    # small SVDs run far slower multi-threaded in OpenBLAS (and collapse when cores are busy)
    with threadpool_limits(1, user_api="blas"), pool:
        candidates = AUTO_FORMATS if format == "auto" else (format,)
        sensitivity = None
        if budget is not None and data:
            sensitivity = layer_sensitivity(original, new, fitter, batches, emit)
        before_ms = clock.models([original], speed_feeds, keep=True)[0] if speedup else None
        planner = Planner(plans, fitter, candidates, budget, rules, layer_timer, sensitivity, before_ms,
                          align=spec.align)
        # a planner emits the fits it judged on the held-out rows; a fixed rank rule refits on all rows
        fitter.pool_final = not planner.choosing
        if planner.choosing:
            with stages.stage("allocate", len(planner.groups), "layers") as stage:
                planner.prepare(pool, stage.advance)

        def build(slack: float) -> dict:
            active = planner.plan(slack)
            with stages.stage("fit", len(active), "layers") as stage:
                if fit == "sequential":
                    return fit_sequential(original, new, active, fitter, batches, force, layer_timer, rules,
                                           stage.advance, pool)
                return fit_and_emit(active, fitter, force, layer_timer, rules, stage.advance, pool)

        if speedup and before_ms is not None:
            replacements = meet_speedup(build, lambda reps: _against_original(
                clock, original, _planned(new, reps, keep_columns), speed_feeds, before_ms) if reps else None,
                before_ms / speedup)
        else:
            replacements = build(0.0)
        notes.extend(planner.notes + ([used] if (used := pool.note()) else []))
    if emit == "rows":  # edge: a layer whose emission still breaks the rules stays dense
        owner = {n.name: key for key, r in replacements.items() for n in r.builder.nodes}
        for broken in edge_violations(partial(new, replacements), set(owner)):
            node, what = broken.split(": ", 1)
            r = replacements.pop(owner.get(node), None)
            if r is not None:
                r.layer.reason = f"left dense for --target edge: {what} in its {r.plan.format} emission"
    if not replacements:
        what = f"--speedup {speedup:g} cannot be met" if speedup else "no layer gets smaller at this rank"
        raise TnonnxError(f"nothing to rewrite: {what}" + _reasons_summary(layers))

    inputs_removed = replace_nodes(new, {k: (r.layer.graph, r.builder.nodes, r.builder.initializers)
                                         for k, r in replacements.items()}, layers)
    if inputs_removed:
        notes.append(f"{len(inputs_removed)} constant(s) of the rewritten layers were also listed as graph inputs (IR 3 style): "
                     f"removed from the inputs ({', '.join(inputs_removed[:4])}{', ...' if len(inputs_removed) > 4 else ''}),"
                     " so the output runs on the data inputs alone")
    model_io.normalise_versions(new)
    if emit == "custom":
        from .custom_ops import DOMAIN, needs_library

        if needs_library(new):
            notes.append(f"the output uses tnonnx's custom-op library (domain {DOMAIN}): build it with `tnonnx build-ops`; "
                         "`tnonnx validate`/`bench` load it, other runtimes need register_custom_ops_library")
    trainable = {t.name for r in replacements.values() for t in r.builder.initializers
                 if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)}
    if fit == "blockwise" or finetune:
        trained_params = sum(math.prod(t.dims) for r in replacements.values() for t in r.builder.initializers
                             if t.name in trainable)
        used_precision = resolve_precision(train_precision, trained_params)
    if fit == "blockwise":
        from .blockwise import blocks, refine_blocks

        runs = blocks(new, trainable)
        with stages.stage("refine", len(runs), "blocks") as stage:
            errors = refine_blocks(new, original, batches, trainable, log=lambda _: stage.advance(), runs=runs,
                                   precision=used_precision)
        if errors:
            notes.append(f"blockwise: {len(errors)} block(s) refined; relative error at their outputs on the "
                         f"calibration data {np.mean([b for b, _ in errors]):.4g} -> "
                         f"{np.mean([a for _, a in errors]):.4g} (mean over blocks"
                         f"{'; bf16 products' if used_precision == 'bf16' else ''})")
    if finetune:
        from .finetune import finetune as distill

        hidden = [r.layer.x for r in replacements.values()]  # what each rewritten layer is fed
        with stages.stage("finetune", finetune, "epochs") as stage:
            before_ft, after_ft = distill(new, original, batches, trainable, epochs=finetune, hidden=hidden,
                                          hidden_weight=finetune_hidden, log=lambda _: stage.advance(),
                                          precision=used_precision)
        matched = (f"outputs and the rewritten layers' inputs, weight {finetune_hidden:g}" if finetune_hidden
                   else "outputs only")
        notes.append(f"finetune: relative output error on the calibration data {before_ft:.4g} -> {after_ft:.4g} "
                     f"after {finetune} epoch(s) of end-to-end distillation ({matched}"
                     f"{', bf16 products' if used_precision == 'bf16' else ''})")
    emitted = _emitted(replacements)
    if keep_columns and (absorbed := absorb_layouts(new, emitted)):
        notes.append(f"{absorbed} pair(s) of features-first layers keep their columns layout across the "
                     "elementwise ops between them (two Transposes of the activation fewer per pair)")
    _check(new)
    factorised, deployed, baseline = new, None, None
    if target != "cpu" or quantization is not None or max_model_bytes is not None or short_names:
        stem = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
        with stages.stage("deploy"):
            new, deployed, baseline = deploy.finish(original, new, deployment_target, quantization, batches,
                                                    emitted, shapes, stem)
    # a change of precision (int8, int4, fp16) is timed apart from the factorisation
    precision = deployed is not None and (quantization is not None or target == "gpu")
    with stages.stage("latency"):
        before_ms, after_ms, *fact_ms = clock.models([original, new] + ([factorised] if precision else []),
                                                     speed_feeds, keep=True)
    fact_ms = fact_ms[0] if fact_ms else None
    if before_ms is None or after_ms is None:
        if speedup:
            raise TnonnxError(f"--speedup {speedup:g}: the models could not be timed at the deployment shape "
                              "(onnxruntime does not run them on random inputs of it)")
        notes.append("latency not measured: onnxruntime does not run the models on random inputs at the "
                     "deployment shape (give --shape)")
        before_ms = after_ms = None
    speed = before_ms / after_ms if before_ms and after_ms else float("inf")
    if speedup and speed < speedup:
        shortfall = (f"--speedup {speedup:g}: not reached; the best plan found runs {speed:.2f}x as fast as the "
                     f"original ({after_ms:.3f} ms against {before_ms:.3f} ms at {deployment.describe(original)})")
        if not keep_best:
            raise TnonnxError(shortfall + "; nothing written (--keep-best writes it anyway)")
        notes.append(shortfall + "; written because of --keep-best")
    if precision and before_ms and after_ms and fact_ms and after_ms > before_ms:
        notes.append(deploy.slower_note(quantization, before_ms, fact_ms, after_ms))
    factorised_ms = fact_ms if precision else after_ms
    if before_ms and factorised_ms and factorised_ms > before_ms:
        notes.append(slower_note(format, budget, speedup, allow_slower, before_ms, factorised_ms)
                     + (" (the factorised model, before the change of precision)" if precision else ""))
    seconds = time.perf_counter() - started
    if external.traffic.read > read_before:
        notes.append(f"weights read from the input's data file: {progress_bars.size(external.traffic.read - read_before)}"
                     f" of {progress_bars.size(external.data_bytes(original))}")
    notes.extend(calibrate.assumed_dims(original, shapes))

    before, after = macs.count(original, concrete, tensor_shapes), macs.count(factorised, concrete, tensor_shapes)
    notes.extend(after.notes)
    rows = _rows(layers, replacements, before, after)
    notes.extend(deploy.unaligned_notes(rows, target, quantization, _ranks_text))
    result = skipped = None
    with stages.stage("validate") if validate or deployed is not None else contextlib.nullcontext():
        if validate:
            # checks the user asked for (a threshold, or --inputs) fail loudly; the default check skips
            asked = inputs is not None or any(v is not None for v in (atol, rtol, min_cosine, max_accuracy_drop))
            min_cosine = with_default_threshold(atol, rtol, min_cosine, max_accuracy_drop)
            if deployed is not None:
                result = deploy.compare(deployed, original, factorised, new, baseline, inputs=inputs, shapes=shapes,
                                        batch=batch, thresholds=dict(atol=atol, rtol=rtol, min_cosine=min_cosine,
                                                                     max_accuracy_drop=max_accuracy_drop))
            else:
                try:
                    # on the sessions the timing opened (without timing, one model's at a time)
                    result = compare_models(original, new, inputs=inputs, shapes=shapes, batch=batch, atol=atol,
                                            rtol=rtol, min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop,
                                            open_session=clock.session if clock.measures else None)
                except OriginalDoesNotRun as exc:
                    if asked:
                        raise
                    skipped = skipped_note(exc)
        elif deployed is not None:
            deploy.check_ort(deployed, new, inputs=inputs, shapes=shapes, batch=batch)
    totals = Totals(before.params, after.params, model_io.nbytes(original), model_io.nbytes(new),
                    before.total, after.total,
                    ms_before=before_ms, ms_after=after_ms, ms_factorised=fact_ms)
    report = RewriteReport(
        format=format, spec=f"budget {budget:g}x" if budget else spec.describe(), emit=emit, batch=batch, rows=rows,
        totals=totals, validation=result, validation_skipped=skipped, seconds=seconds, fit=fit, notes=notes,
        deploy=deployed, stages=dict(stages.seconds),
        latency=LatencyInfo(deployment=deployment.describe(original), threads=threads, measured=clock.measures,
                            speedup_target=speedup, timing_seconds=round(clock.seconds, 3),
                            timed=clock.timed, cache_hits=clock.cache.hits, cache=str(clock.cache.path)
                            if clock.cache.enabled else None, totals_cached=clock.last_cached),
        source=source_info(model),
        settings={"format": format, "rank_rule": {"rank": rank, "tol": tol, "ratio": ratio, "budget": budget},
                  "modes": modes_text, "order": order, "format_options": dict(format_options or {}), "emit": emit,
                  "keep_columns": keep_columns,
                  "ops": list(ops), "recurrent": recurrent, "include": include, "exclude": exclude, "min_params": min_params, "force": force,
                  "calibration": describe_calibration(calib, count_samples(batches) if batches else None),
                  "fit": fit, "finetune": {"epochs": finetune, "hidden_weight": finetune_hidden, "admm": admm,
                                           "admm_rho": admm_rho, "precision": train_precision,
                                           "precision_used": used_precision},
                  "deployment": {"batch": batch, "shapes": {k: list(v) for k, v in (shapes or {}).items()},
                                 "threads": threads},
                  "speedup": speedup, "allow_slower": allow_slower, "keep_best": keep_best, "timing": timing,
                  "target": target, "quantize": quantize, "int8": int8, "short_names": short_names, "workers": workers, "max_model_bytes": max_model_bytes, "validate": validate, "inputs": describe_calibration(inputs, None)["source"] if inputs is not None else None,
                  "thresholds": {"atol": atol, "rtol": rtol, "min_cosine": min_cosine,
                                 "max_accuracy_drop": max_accuracy_drop}},
    )
    clock.cache.save()
    clock.sessions.close()
    return new, report


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


def _reasons_summary(layers: list[Layer]) -> str:
    reasons = sorted({l.reason for l in layers if l.reason})
    return f" ({'; '.join(reasons[:3])})" if reasons else ""


def save(model: onnx.ModelProto, path, *, progress: bool = False, **kwargs):
    """model_io.save, with a bar of the bytes written when `progress`."""
    with progress_bars.writing(str(path), model_io.nbytes(model), progress) as update:
        return model_io.save(model, path, progress=update, **kwargs)
