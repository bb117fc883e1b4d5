"""The pipeline, in one place: load -> find layers -> plan -> fit -> emit -> replace ->
validate -> report. The CLI and the Python API both call these functions."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from . import calibrate, deploy, external, macs
from . import progress as progress_bars
from . import fit as fitting
from . import model as model_io
from .embedding import layer_data as embedding_data
from .emit import Builder
from .errors import NotApplicable, OriginalDoesNotRun, TnonnxError
from .finetune import HIDDEN_WEIGHT
from .formats import Factorization
from .recurrent_scan import to_scan
from .graph import REWRITABLE_OPS, Layer, find_layers, replace_nodes
from .macs import all_graphs
from .latency import Clock, CostModelTimer, Deployment, LayerTimer, TimingCache, default_timer, deployment_feeds
from .choose import Planner, SpeedRules, emissions_for, meet_speedup, slower_note
from .plan import AUTO_FORMATS, Fitter, LayerPlan, Selection, fit_error, make_plan, rank_spec
from .targets import EDGE_MAX_RANK, edge_violations
from .report import InspectReport, LatencyInfo, LayerRow, RewriteReport, Totals, describe_calibration, source_info
from .tensorize import format_modes, parse_modes
from .validate import check_thresholds, count_samples, skipped_note, with_default_threshold
from .validate import run as run_model
from .validate import validate as compare_models

EMIT_MODES = ("auto", "matmul", "features-first", "einsum", "custom")
FIT_MODES = ("data-free", "aware", "sequential", "blockwise")
RECURRENT_MODES = ("fused", "scan")


def inspect(model, *, batch: int = 1, shapes=None) -> InspectReport:
    """The candidate layers of a model with their parameters and MACs."""
    m = model_io.load(model)
    layers = find_layers(m)
    cost = macs.count(m, calibrate.concrete_shapes(m, batch, shapes))
    rows = [LayerRow.for_layer(layer, cost.per_node.get(layer.name)) for layer in layers]
    rewritable = {l.weight_key: l.params for l in layers if l.reason is None}  # a shared weight once
    size = model_io.nbytes(m)
    return InspectReport(rows=rows, totals=Totals(cost.params, cost.params, size, size,
                                                  cost.total, cost.total), batch=batch,
                         rewritable_params=sum(rewritable.values()),
                         notes=model_io.upgrade_note(m) + calibrate.assumed_dims(m, shapes) + cost.notes,
                         source=source_info(model))


def rewrite(model, *, format: str = "tt", rank: int | None = None, tol: float | None = None,
            ratio: float | None = None, budget: float | None = None, modes: str | tuple | None = None,
            order: int | None = None, format_options: dict | None = None,
            emit: str = "auto", batch: int = 1, ops=("MatMul", "Gemm", "Conv", "ConvTranspose"), recurrent: str = "fused",
            include: str | None = None,
            exclude: str | None = None, min_params: int = 0, force: bool = False, validate: bool = True,
            inputs=None, shapes=None, atol: float | None = None, rtol: float | None = None,
            min_cosine: float | None = None, max_accuracy_drop: float | None = None, fit: str = "data-free", calib=None, finetune: int = 0,
            finetune_hidden: float = HIDDEN_WEIGHT, threads: int | None = None, speedup: float | None = None,
            allow_slower: bool = False, keep_best: bool = False, timing: bool = True, timing_cache: bool = True,
            timer=None, progress: bool = False, target: str = "cpu", quantize: str | None = None,
            int8: str | None = None, max_model_bytes: int | None = None,
            short_names: bool = False) -> tuple[onnx.ModelProto, RewriteReport]:
    """Rewrite the selected layers of `model` (path or ModelProto) in a factorised format.

    Returns the new model and its report. The input is never modified. Options take the
    CLI's values: budget="2x", modes="8x8x6,4x8x12", ops="MatMul,Gemm". `target` (cpu, gpu,
    edge) and `quantize` (int8, int4) make the factorised model ready for where it runs
    (deploy.py); the report's `deploy` says what was done and checked.
    """
    started, read_before = time.perf_counter(), external.traffic.read
    if emit not in EMIT_MODES:
        raise TnonnxError(f"--emit {emit}: choose from {', '.join(EMIT_MODES)}")
    check_thresholds(atol, rtol, min_cosine, max_accuracy_drop, batch)
    deployment_target, quantization, emit = deploy.plan(target, quantize, emit, calib is not None, max_model_bytes,
                                                        int8, short_names)
    ops = _parse_ops(ops)
    if threads is not None and threads < 1:
        raise TnonnxError(f"--threads {threads}: must be >= 1")
    if speedup is not None and not speedup > 0:
        raise TnonnxError(f"--speedup {speedup:g}: must be > 0 (e.g. 1.5)")
    budget = parse_budget(budget)
    rank = deploy.align_rank(rank, target, quantization)
    spec = rank_spec(rank, tol, ratio, budget)
    if quantization is not None and quantization.mode == "int4":
        spec = dataclasses.replace(spec, align=quantization.block_size)
    modes_text = modes if isinstance(modes, str) or modes is None else format_modes(modes)
    if isinstance(modes, str):
        modes = parse_modes(modes)
    original = model_io.load(model)
    if emit == "einsum" and model_io.default_opset(original) < 12:
        raise TnonnxError("--emit einsum needs opset >= 12; the model has opset "
                          f"{model_io.default_opset(original)}")
    new = onnx.ModelProto()
    new.CopyFrom(original)
    if recurrent not in RECURRENT_MODES:
        raise TnonnxError(f"--recurrent {recurrent}: choose from {', '.join(RECURRENT_MODES)}")
    early_notes, states = to_scan(new) if recurrent == "scan" else ([], {})
    layers = find_layers(new)
    for layer in layers:  # R of a Scan cell is calibrated on the state sequence the Scan outputs
        layer.probe_x = states.get(layer.name, "")
    selection = Selection(ops=tuple(ops), include=include, exclude=exclude, min_params=min_params)
    plans = make_plan(layers, format, spec, selection, modes, order)
    if not plans:
        raise TnonnxError("nothing to rewrite: no selected MatMul/Gemm/Conv/ConvTranspose layer with a constant weight"
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
    # the fit and the fine-tuning read the calibration data, and so do fp16 ranges and static int8
    if calib is not None and (fit != "data-free" or finetune or target == "gpu"
                              or (quantization is not None and quantization.static)):
        batches, _ = calibrate.feed_batches(calib, original, batch=batch, shapes=shapes, what="--calib")
    data = {}
    if fit in ("aware", "blockwise") or (fit == "sequential" and (budget is not None or format == "auto")):
        # every layer's inputs in the original model (sequential: for choosing ranks only)
        data = layer_data(new if states else original, [p.layer for p in plans], batches)
    fitter = Fitter(format_options, data, balance=target == "gpu")
    deployment = Deployment.of(batch, shapes, threads)
    clock = Clock(timer if timer is not None else (default_timer() if timing else CostModelTimer()),
                  TimingCache(enabled=timing and timing_cache), threads)
    layer_timer = LayerTimer(original, [p.layer for p in plans], deployment, clock, emit_layer,
                             model_io.default_opset(original))
    speed_feeds = deployment_feeds(original, deployment)
    rules = SpeedRules(speedup, floor=(budget is not None or format == "auto") and not allow_slower,
                       emit=emit)
    notes = model_io.upgrade_note(original) + early_notes
    if undersampled := undersampled_note(data):
        notes.append(undersampled)
    # small SVDs run far slower multi-threaded in OpenBLAS (and collapse when cores are busy)
    with threadpool_limits(1, user_api="blas"):
        candidates = AUTO_FORMATS if format == "auto" else (format,)
        sensitivity = None
        if budget is not None and data:
            sensitivity = _sensitivity(original, new, fitter, batches, emit)
        before_ms = clock.models([original], speed_feeds)[0] if speedup else None
        planner = Planner(plans, fitter, candidates, budget, rules, layer_timer, sensitivity, before_ms,
                          align=spec.align)

        def build(slack: float) -> dict:
            active = planner.plan(slack)
            if fit == "sequential":
                return _fit_sequential(original, new, active, fitter, batches, force, layer_timer, rules, progress)
            return _fit_and_emit(active, fitter, force, layer_timer, rules, progress)

        if speedup and before_ms is not None:
            replacements = meet_speedup(
                build, lambda reps: clock.models([_partial(new, reps)], speed_feeds)[0] if reps else None,
                before_ms / speedup)
        else:
            replacements = build(0.0)
        notes.extend(planner.notes)
    if emit == "rows":  # edge: a layer whose emission still breaks the rules stays dense
        owner = {n.name: key for key, r in replacements.items() for n in r.builder.nodes}
        for broken in edge_violations(_partial(new, replacements), set(owner)):
            node, what = broken.split(": ", 1)
            r = replacements.pop(owner.get(node), None)
            if r is not None:
                r.layer.reason = f"left dense for --target edge: {what} in its {r.plan.format} emission"
    if not replacements:
        raise TnonnxError("nothing to rewrite: no layer gets smaller at this rank" + _reasons_summary(layers))

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
    if fit == "blockwise":
        from .blockwise import refine_blocks

        errors = refine_blocks(new, original, batches, trainable)
        if errors:
            notes.append(f"blockwise: {len(errors)} block(s) refined; relative error at their outputs on the "
                         f"calibration data {np.mean([b for b, _ in errors]):.4g} -> "
                         f"{np.mean([a for _, a in errors]):.4g} (mean over blocks)")
    if finetune:
        from .finetune import finetune as distill

        hidden = [r.layer.x for r in replacements.values()]  # what each rewritten layer is fed
        before_ft, after_ft = distill(new, original, batches, trainable, epochs=finetune, hidden=hidden,
                                      hidden_weight=finetune_hidden)
        matched = (f"outputs and the rewritten layers' inputs, weight {finetune_hidden:g}" if finetune_hidden
                   else "outputs only")
        notes.append(f"finetune: relative output error on the calibration data {before_ft:.4g} -> {after_ft:.4g} "
                     f"after {finetune} epoch(s) of end-to-end distillation ({matched})")
    _check(new)
    factorised, deployed, baseline = new, None, None
    if target != "cpu" or quantization is not None or max_model_bytes is not None or short_names:
        emitted = {n.name for r in replacements.values() for n in r.builder.nodes}
        stem = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
        new, deployed, baseline = deploy.finish(original, new, deployment_target, quantization, batches, emitted,
                                                shapes, stem)
    # a change of precision (int8, int4, fp16) is timed apart from the factorisation
    precision = deployed is not None and (quantization is not None or target == "gpu")
    before_ms, after_ms, *fact_ms = clock.models([original, new] + ([factorised] if precision else []), speed_feeds)
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

    concrete = calibrate.concrete_shapes(original, batch, shapes)
    before, after = macs.count(original, concrete), macs.count(factorised, concrete)
    notes.extend(after.notes)
    rows = _rows(layers, replacements, before, after)
    notes.extend(deploy.unaligned_notes(rows, target, quantization, _ranks_text))
    result = skipped = None
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
                result = compare_models(original, new, inputs=inputs, shapes=shapes, batch=batch, atol=atol,
                                        rtol=rtol, min_cosine=min_cosine, max_accuracy_drop=max_accuracy_drop)
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
        deploy=deployed,
        latency=LatencyInfo(deployment=deployment.describe(original), threads=threads, measured=clock.measures,
                            speedup_target=speedup, timing_seconds=round(clock.seconds, 3),
                            timed=clock.timed, cache_hits=clock.cache.hits, cache=str(clock.cache.path)
                            if clock.cache.enabled else None),
        source=source_info(model),
        settings={"format": format, "rank_rule": {"rank": rank, "tol": tol, "ratio": ratio, "budget": budget},
                  "modes": modes_text, "order": order, "format_options": dict(format_options or {}), "emit": emit,
                  "ops": list(ops), "recurrent": recurrent, "include": include, "exclude": exclude, "min_params": min_params, "force": force,
                  "calibration": describe_calibration(calib, count_samples(batches) if batches else None),
                  "fit": fit, "finetune": {"epochs": finetune, "hidden_weight": finetune_hidden},
                  "deployment": {"batch": batch, "shapes": {k: list(v) for k, v in (shapes or {}).items()},
                                 "threads": threads},
                  "speedup": speedup, "allow_slower": allow_slower, "keep_best": keep_best, "timing": timing,
                  "target": target, "quantize": quantize, "int8": int8, "max_model_bytes": max_model_bytes, "short_names": short_names, "validate": validate, "inputs": describe_calibration(inputs, None)["source"] if inputs is not None else None,
                  "thresholds": {"atol": atol, "rtol": rtol, "min_cosine": min_cosine,
                                 "max_accuracy_drop": max_accuracy_drop}},
    )
    clock.cache.save()
    return new, report


def _parse_ops(ops) -> tuple[str, ...]:
    """--ops as the CLI writes it ("MatMul,Gemm") or a sequence; unknown op types are refused."""
    names = [o.strip() for o in (ops.split(",") if isinstance(ops, str) else ops) if o.strip()]
    unknown = [o for o in names if o not in REWRITABLE_OPS]
    if unknown or not names:
        raise TnonnxError(f"--ops {','.join(names) or repr(ops)}: "
                          + (f"unknown op {', '.join(unknown)}; " if unknown else "")
                          + f"choose from {', '.join(REWRITABLE_OPS)}")
    return tuple(names)


def parse_budget(budget) -> float | None:
    """--budget as the CLI writes it ("3x", "3") or a number."""
    if budget is None or isinstance(budget, (int, float)):
        return budget
    text = str(budget).strip().lower().removesuffix("x")
    try:
        return float(text)
    except ValueError:
        raise TnonnxError(f"--budget {budget}: not a reduction factor (e.g. 3x)") from None


def _fit_and_emit(plans: list[LayerPlan], fitter: Fitter, force: bool, timer: LayerTimer, rules: SpeedRules,
                  progress: bool, shared: dict | None = None, replacements: dict | None = None) -> dict:
    """Fit each planned layer (once per shared weight) and emit its replacement nodes in the
    plan's emission (or, where the planner left it open, the fastest measured); returns the
    replacements keyed by id(node) (added to `replacements` when given)."""
    replacements = {} if replacements is None else replacements
    shared = {} if shared is None else shared
    for plan in _progress(plans, progress):
        try:
            _fit_one(plan, fitter, force, timer, rules, shared, replacements)
        finally:  # a weight read from a data file goes with its layer: memory stays one layer's
            plan.layer.release()
    return replacements


def _fit_one(plan: LayerPlan, fitter: Fitter, force: bool, timer: LayerTimer, rules: SpeedRules,
             shared: dict, replacements: dict) -> None:
    layer = plan.layer
    try:
        fact = fitter.fit(layer, plan.format, plan.spec, plan.modes, plan.order)
    except NotApplicable as exc:
        layer.reason = str(exc)
        return
    saved = fact.params() < layer.params or any(o.fact is fact for o in replacements.values())
    if not saved and not force:
        layer.reason = f"no saving at this rank ({fact.params()} >= {layer.params} parameters; --force rewrites anyway)"
        return
    emissions = (plan.emission,) if plan.emission else emissions_for(fact, rules.emit, layer)
    timings = timer.candidates(layer, [(fact, e) for e in emissions])
    best = min(range(len(emissions)), key=lambda i: (timings[i].ms is None, timings[i].ms or 0.0))
    plan.emission, plan.timing, plan.dense_timing = emissions[best], timings[best], timer.dense(layer)
    # layers given the same factorisation object (one weight, one fit) share its cores
    builder = Builder(f"{layer.name}/{plan.format}", layer.store_dtype, layer.compute_dtype,
                      shared=shared, share_key=str(id(fact)))
    emit_layer(builder, layer, fact, plan.emission)
    replacements[id(layer.node)] = _Replacement(layer, plan, fact, builder)


def layer_data(model: onnx.ModelProto, layers: list[Layer], batches, reference: onnx.ModelProto | None = None) -> dict:
    """LayerData per layer name from one pass of the calibration batches through `model`
    (with `reference`: the original model alongside, for sequential fitting). Layers data-aware
    fitting does not apply to (see fit.probe_for), or whose input cannot be exposed, get none."""
    probes: dict[str, list] = {}
    for layer in layers:
        probe = fitting.probe_for(layer)
        source = layer.probe_x or layer.x
        if probe is not None and probe.key not in [p.key for p in probes.get(source, [])]:
            probes.setdefault(source, []).append(probe)
    captures = calibrate.capture(model, probes, batches, reference=reference)
    data, bases = embedding_data(model, layers, batches), {}
    for layer in layers:
        probe = fitting.probe_for(layer)
        capture = captures.get((layer.probe_x or layer.x, probe.key)) if probe is not None else None
        if capture is not None:
            data[layer.name] = fitting.layer_data(layer, capture, bases)
    return data


def undersampled_note(data: dict) -> str | None:
    """The warning for layers whose calibration rows are fewer than their input features."""
    few = [(name, d.rows, d.features) for name, d in data.items()
           if isinstance(d, fitting.LayerData) and d.rows < d.features]  # embeddings have index counts
    if not few:
        return None
    listed = ", ".join(f"{name} ({rows} < {features})" for name, rows, features in few[:5])
    more = f" and {len(few) - 5} more" if len(few) > 5 else ""
    return (f"calibration: {len(few)} layer(s) saw fewer calibration rows than input features ({listed}{more}): "
            "their fits trust the data only in part (the Gram matrix shrunk towards the identity); "
            "more calibration samples would help")


def _fit_sequential(original, new, plans, fitter, batches, force, timer, rules, progress) -> dict:
    """Fit level by level (fit.levels): each level's layers see, on the calibration data,
    the outputs of the levels before it already rewritten, and fit the original layer's
    outputs. Layers inside subgraphs are fitted last, on their weights."""
    replacements, shared = {}, {}
    groups = fitting.levels(new.graph, [p.layer for p in plans])
    by_node = {id(p.layer.node): p for p in plans}
    for group in _progress(groups, progress, "fitting levels"):
        current = _partial(new, replacements) if replacements else original
        data = layer_data(current, group, batches, reference=original if replacements else None)
        for layer in group:
            fitter.data[layer.name] = data.get(layer.name)
        _fit_and_emit([by_node[id(l.node)] for l in group], fitter, force, timer, rules, False, shared, replacements)
    placed = {id(l.node) for g in groups for l in g}
    rest = [p for p in plans if id(p.layer.node) not in placed]
    for plan in rest:
        fitter.data.pop(plan.layer.name, None)
    return _fit_and_emit(rest, fitter, force, timer, rules, False, shared, replacements)


SENSITIVITY_SAMPLES = 128


def _sensitivity(original, new, fitter, batches, emit):
    """sensitivity(plan, format, spec): the model's squared relative output error on (part
    of) the calibration data with this one layer rewritten, per unit of the layer's own
    squared output error. Layers whose errors the rest of the network amplifies (or damps)
    are weighted accordingly by the budget allocator."""
    subset, rows = [], 0
    for feeds in batches:
        if rows >= SENSITIVITY_SAMPLES:
            break
        subset.append(feeds)
        rows += max((np.shape(v)[0] for v in feeds.values() if np.ndim(v)), default=1)
    reference = _float_outputs(original, subset)

    def measure(plan, fmt, spec) -> float:
        fact = fitter.fit(plan.layer, fmt, spec, plan.modes, plan.order, final=False)
        builder = Builder(f"{plan.layer.name}/{fmt}", plan.layer.store_dtype, plan.layer.compute_dtype)
        emit_layer(builder, plan.layer, fact, emit)
        single = _partial(new, {id(plan.layer.node): _Replacement(plan.layer, plan, fact, builder)})
        got = _float_outputs(single, subset)
        model_error = sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, reference)) / max(
            sum(float(np.sum(r**2)) for r in reference), 1e-300)
        layer_error = fit_error(fact) ** 2
        return model_error / layer_error if layer_error > 1e-12 else 1.0

    return measure


def _float_outputs(model, batches) -> list[np.ndarray]:
    """The model's float outputs over the batches (validate.run), as float64."""
    return [np.asarray(v, np.float64) for v in run_model(model, batches).values()
            if np.issubdtype(v.dtype, np.floating)]


def _partial(base: onnx.ModelProto, replacements: dict) -> onnx.ModelProto:
    """A copy of `base` (still unmodified) with the replacements made so far in place."""
    out = onnx.ModelProto()
    out.CopyFrom(base)
    nodes, graphs = {}, {}
    for g0, g1 in zip(all_graphs(base.graph), all_graphs(out.graph)):
        graphs[id(g0)] = g1
        nodes.update({id(n0): n1 for n0, n1 in zip(g0.node, g1.node)})
    replace_nodes(out, {id(nodes[k]): (graphs[id(r.layer.graph)], r.builder.nodes, r.builder.initializers)
                        for k, r in replacements.items()}, [])
    return out


class _Replacement:
    def __init__(self, layer: Layer, plan: LayerPlan, fact: Factorization, builder: Builder):
        self.layer, self.plan, self.fact, self.builder = layer, plan, fact, builder


def emit_layer(builder: Builder, layer: Layer, fact: Factorization, emit: str = "matmul") -> None:
    """Append to `builder` the nodes computing what `layer.node` computed, into its output,
    in emission `emit` (EMIT_MODES; "auto" here means the plain MatMul chain)."""
    output = layer.node.output[0]
    if layer.kind in ("embedding", "tied", "recurrent"):  # their own emission (one form each)
        from . import embedding, recurrent

        {"embedding": embedding.emit, "tied": embedding.emit_tied, "recurrent": recurrent.emit}[layer.kind](
            builder, layer, fact)
        return
    if layer.kind == "conv":
        fact.emit(builder, layer.x, layer.geometry, layer.bias, output)
        return
    x, batch_rank = layer.x, layer.batch_rank
    if layer.trans_x:
        x = builder.op("Transpose", [x], "transpose", perm=[1, 0])
    swap = list(range(batch_rank - 1)) + [batch_rank, batch_rank - 1]
    if layer.side == "left":  # W @ x  ==  (x^T W^T)^T over the last two axes
        x = builder.op("Transpose", [x], "transpose", perm=swap)
    unflat = None
    if emit == "rows":
        builder.max_rank = EDGE_MAX_RANK
    if emit == "rows" and batch_rank > 1:  # batch axes folded into one row axis (edge: rank <= 4)
        unflat = x
        x = builder.op("Reshape", [x, builder.int64s([-1, layer.weight.shape[0]])], "rows")
    if emit == "einsum":
        y = fact.emit_einsum(builder, x, batch_rank)
    elif emit == "features-first":  # rows trailing: cores multiply from the left, few Transposes
        y = fact.emit_features_first(builder, x, batch_rank)
    elif emit == "custom":  # one fused operator from the tnonnx custom-op library
        y = fact.emit_custom(builder, x, batch_rank)
    elif unflat is not None:
        y = fact.emit(builder, x, 1)
        lead = builder.op("Slice", [builder.op("Shape", [unflat], "shape"), builder.int64s([0]), builder.int64s([-1])],
                          "batch_shape")
        shape = builder.op("Concat", [lead, builder.int64s([layer.weight.shape[1]])], "out_shape", axis=0)
        y = builder.op("Reshape", [y, shape], "reshape")
    else:
        y = fact.emit(builder, x, batch_rank)
    if layer.side == "left":
        y = builder.op("Transpose", [y], "transpose", perm=swap)
    if layer.bias is not None:
        y = builder.op("Add", [y, builder.cast(builder.constant(layer.bias, "bias"))], "bias")
    if layer.bias_input:
        c = layer.bias_input
        if layer.beta != 1.0:
            beta = builder.cast(builder.constant(np.asarray(layer.beta), "beta"))
            c = builder.op("Mul", [c, beta], "beta")
        y = builder.op("Add", [y, c], "bias")
    builder.rename_output(output)


def _check(model: onnx.ModelProto) -> None:
    if model_io.came_with_external_data(model):  # their data files were checked when loaded
        model = external.emptied(model)
    if model.ByteSize() < model_io.PROTO_LIMIT:
        onnx.checker.check_model(model)


def _rows(layers, replacements, before, after) -> list[LayerRow]:
    rows, first_user = [], {}
    for layer in layers:
        rep = replacements.get(id(layer.node))
        row = LayerRow.for_layer(layer, before.per_node.get(layer.name))
        if rep is not None:
            fact = rep.fact
            shared_with = first_user.setdefault(id(fact), layer.name)
            row.format, row.ranks = rep.plan.format, list(fact.ranks)
            row.params_after = fact.params() if shared_with == layer.name else 0
            row.shared_with = None if shared_with == layer.name else shared_with
            row.macs_after = sum(after.per_node.get(n.name, 0) for n in rep.builder.nodes)
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


def _reasons_summary(layers: list[Layer]) -> str:
    reasons = sorted({l.reason for l in layers if l.reason})
    return f" ({'; '.join(reasons[:3])})" if reasons else ""


def _progress(items, enabled: bool, description: str = "fitting layers"):
    return progress_bars.layers(items, enabled, description)


def save(model: onnx.ModelProto, path, *, progress: bool = False, **kwargs):
    """model_io.save, with a bar of the bytes written when `progress`."""
    with progress_bars.writing(str(path), model_io.nbytes(model), progress) as update:
        return model_io.save(model, path, progress=update, **kwargs)
