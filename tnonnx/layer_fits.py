"""Fitting the planned layers and emitting their replacements: one layer after another, or
their fits first in worker processes (tnonnx/workers.py); level by level for sequential
fitting, each level fed the levels before it rewritten. Also each layer's calibration data
(LayerData from one pass of the calibration batches) and the partial models built on the way."""

from __future__ import annotations

import numpy as np
import onnx

from . import activations
from . import fit as fitting
from .choose import SpeedRules, emissions_for
from .embedding import layer_data as embedding_data
from .emit import Builder
from .errors import NotApplicable
from .formats import Factorization
from .graph import Layer
from .layer_timing import LayerTimer
from .macs import all_graphs
from .plan import Fitter, LayerPlan
from .replace import replace_nodes
from .targets import EDGE_MAX_RANK
from .workers import Workers, prefit


def fit_and_emit(plans: list[LayerPlan], fitter: Fitter, force: bool, timer: LayerTimer, rules: SpeedRules,
                  advance=None, pool: Workers | None = None, shared: dict | None = None,
                  replacements: dict | None = None) -> dict:
    """Fit each planned layer (once per shared weight; in `pool`'s worker processes when
    worth it) and emit its replacement nodes in the plan's emission (or, where the planner
    left it open, the fastest measured); returns the replacements keyed by id(node) (added
    to `replacements` when given). `advance(share)`: one per layer as it is done."""
    replacements = {} if replacements is None else replacements
    shared = {} if shared is None else shared
    advance = advance or (lambda share: None)
    prefitted = prefit(fitter, plans, pool, advance)
    for plan in plans:
        try:
            _fit_one(plan, fitter, force, timer, rules, shared, replacements)
        finally:  # a weight read from a data file goes with its layer: memory stays one layer's
            plan.layer.release()
        advance(0.5 if fitter.key(plan.layer, plan.format, plan.spec, plan.modes, plan.order) in prefitted else 1.0)
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
    twin = next((o for o in replacements.values() if o.fact is fact), None)
    if twin is not None:  # a shared weight: its cores are laid out for the first user's emission
        emissions = (twin.plan.emission,)
    else:
        emissions = (plan.emission,) if plan.emission else emissions_for(fact, rules.emit, layer)
    timings = timer.candidates(layer, [(fact, e) for e in emissions])
    best = min(range(len(emissions)), key=lambda i: (timings[i].ms is None, timings[i].ms or 0.0))
    plan.emission, plan.timing, plan.dense_timing = emissions[best], timings[best], timer.dense(layer)
    # layers given the same factorisation object (one weight, one fit) share its cores
    builder = Builder(f"{layer.name}/{plan.format}", layer.store_dtype, layer.compute_dtype,
                      shared=shared, share_key=str(id(fact)))
    emit_layer(builder, layer, fact, plan.emission)
    replacements[id(layer.node)] = Replacement(layer, plan, fact, builder)


def layer_data(model: onnx.ModelProto, layers: list[Layer], batches, reference: onnx.ModelProto | None = None,
               advance=None) -> dict:
    """LayerData per layer name from one pass of the calibration batches through `model`
    (with `reference`: the original model alongside, for sequential fitting). Layers data-aware
    fitting does not apply to (see fit.probe_for), or whose input cannot be exposed, get none.
    `advance()` is called per batch run and per layer done."""
    advance = advance or (lambda share=1.0: None)
    probes: dict[str, list] = {}
    for layer in layers:
        probe = fitting.probe_for(layer)
        source = layer.probe_x or layer.x
        if probe is not None and probe.key not in [p.key for p in probes.get(source, [])]:
            probes.setdefault(source, []).append(probe)
    captures = activations.capture(model, probes, batches, reference=reference, advance=advance)
    data, bases = embedding_data(model, layers, batches), {}
    for layer in layers:
        probe = fitting.probe_for(layer)
        capture = captures.get((layer.probe_x or layer.x, probe.key)) if probe is not None else None
        if capture is not None:
            data[layer.name] = fitting.layer_data(layer, capture, bases)
        advance()
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


def fit_sequential(original, new, plans, fitter, batches, force, timer, rules, advance=None, pool=None) -> dict:
    """Fit level by level (fit.levels): each level's layers see, on the calibration data,
    the outputs of the levels before it already rewritten, and fit the original layer's
    outputs. Layers inside subgraphs are fitted last, on their weights."""
    replacements, shared = {}, {}
    groups = fitting.levels(new.graph, [p.layer for p in plans])
    by_node = {id(p.layer.node): p for p in plans}
    for group in groups:
        current = partial(new, replacements) if replacements else original
        data = layer_data(current, group, batches, reference=original if replacements else None)
        for layer in group:
            fitter.data[layer.name] = data.get(layer.name)
        fit_and_emit([by_node[id(l.node)] for l in group], fitter, force, timer, rules, advance, pool, shared,
                      replacements)
    placed = {id(l.node) for g in groups for l in g}
    rest = [p for p in plans if id(p.layer.node) not in placed]
    for plan in rest:
        fitter.data.pop(plan.layer.name, None)
    return fit_and_emit(rest, fitter, force, timer, rules, advance, pool, shared, replacements)


def partial(base: onnx.ModelProto, replacements: dict) -> onnx.ModelProto:
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


class Replacement:
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
