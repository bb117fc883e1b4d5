"""Which layers to rewrite, in which format, with which rank rule."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import NotApplicable, TnonnxError
from .formats import FORMATS, RankSpec
from .formats.base import GroupedConvFactorization
from .graph import Layer


# the formats `--format auto` and `--budget` choose from: those that represent any weight
# (hybrid is a fixed pairing of two of them; the semi-tensor formats only fit weights of
# their structure; CP's ALS takes minutes per layer at the ranks the budget ladder tries;
# the nonlinear chains are distilled per layer, too slow for the allocator's many trials)
AUTO_FORMATS = tuple(f for f in FORMATS
                     if f not in ("hybrid", "cp") and not getattr(FORMATS[f], "STRUCTURED", False)
                     and not getattr(FORMATS[f], "NONLINEAR", False))


@dataclass
class Selection:
    """Layer selection in the style of onnxruntime.quantization."""

    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    include: str | None = None  # regex on node names
    exclude: str | None = None
    min_params: int = 0

    def __post_init__(self):
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise TnonnxError(f"{flag} '{pattern}': not a valid regular expression ({exc})") from None

    def reason_to_skip(self, layer: Layer) -> str | None:
        if layer.op_type not in self.ops:
            return f"op {layer.op_type} not selected (--ops)"
        if self.include and not re.search(self.include, layer.name):
            return "name does not match --include"
        if self.exclude and re.search(self.exclude, layer.name):
            return "name matches --exclude"
        if layer.params < self.min_params:
            return f"{layer.params} parameters < --min-params {self.min_params}"
        return None


@dataclass
class LayerPlan:
    layer: Layer
    format: str
    spec: RankSpec
    modes: tuple | None = None
    order: int | None = None


def rank_spec(rank: int | None = None, tol: float | None = None, ratio: float | None = None,
              budget: float | None = None) -> RankSpec:
    """The per-layer rank rule. With --budget the allocator chooses ranks across layers."""
    given = [v is not None for v in (rank, tol, ratio, budget)]
    if sum(given) > 1:
        raise TnonnxError("give one of --rank, --tol, --ratio, --budget")
    if budget is not None:
        if budget <= 1:
            raise TnonnxError(f"--budget {budget}: must be > 1 (e.g. 3x)")
        return RankSpec()
    if rank == "vbmf":
        return RankSpec(rank="vbmf")
    if rank is not None and rank < 1:
        raise TnonnxError(f"--rank {rank}: must be >= 1")
    if tol is not None and not 0 < tol < 1:
        raise TnonnxError(f"--tol {tol}: must be in (0, 1)")
    if ratio is not None and ratio <= 1:
        raise TnonnxError(f"--ratio {ratio}: must be > 1")
    if not any(given):
        rank = 8
    return RankSpec(rank=rank, tol=tol, ratio=ratio)


def make_plan(layers: list[Layer], format: str, spec: RankSpec, selection: Selection,
              modes: tuple | None = None, order: int | None = None) -> list[LayerPlan]:
    """Plans for the selected rewritable layers; the others get their reason set."""
    if order is not None and not 1 <= order <= MAX_ORDER:
        raise TnonnxError(f"--order {order}: must be between 1 and {MAX_ORDER}")
    if format not in FORMATS and format != "auto":
        raise TnonnxError(f"--format {format}: unknown (choose from {', '.join(list(FORMATS) + ['auto'])})")
    if spec.rank == "vbmf" and not getattr(FORMATS.get(format), "SUPPORTS_VBMF", False):
        supported = ", ".join(f for f, m in FORMATS.items() if getattr(m, "SUPPORTS_VBMF", False))
        raise TnonnxError(f"--rank vbmf: only for {supported}, not --format {format}")
    plans = []
    for layer in layers:
        if layer.reason is None:
            layer.reason = selection.reason_to_skip(layer)
        if layer.reason is not None:
            continue
        layer_modes = None
        if modes is not None and layer.kind == "dense":
            n, m = layer.weight.shape
            if _prod(modes[0]) == n and _prod(modes[1]) == m:
                layer_modes = modes
        plans.append(LayerPlan(layer, format, spec, layer_modes, order))
    if modes is not None and not any(p.modes for p in plans):
        raise TnonnxError(f"--modes {modes}: matches no selected dense layer's shape")
    return plans


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


# ------------------------------------------------------------------ fitting choices

MAX_ORDER = 8  # cores per dense layer; more only fragments the modes into 1s and 2s
RANK_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class Fitter:
    """Fits layers, once per (weight, format, spec, modes, order, data): layers that share a
    weight share the factorisation, and the budget allocator's many trials are reused.

    With calibration data for a layer (tnonnx.fit.LayerData, keyed by layer name): formats
    with SUPPORTS_DATA take it in their closed form (svd's whitened SVD), formats with
    NEEDS_DATA fit to it (the nonlinear chains), and the other linear formats are refined on
    it from their data-free decomposition in the final fit (`final=True`); the budget
    allocator's trials skip that refinement and are ranked by their measured output error."""

    def __init__(self, options: dict | None = None, data: dict | None = None):
        self.options = options or {}
        self.data = data if data is not None else {}
        self.cache: dict = {}

    def fit(self, layer: Layer, format: str, spec: RankSpec, modes=None, order=None, *, final: bool = True):
        module = FORMATS[format]
        data = self.data.get(layer.name)
        takes_data = getattr(module, "SUPPORTS_DATA", False) or getattr(module, "NEEDS_DATA", False)
        refine = data is not None and final and not takes_data
        key = (layer.weight_key, format, spec, modes, order, id(data) if data is not None else None, refine)
        if key not in self.cache:
            options = dict(self.options, data=data) if takes_data and data is not None else self.options
            if layer.kind == "conv" and layer.groups > 1:
                per = layer.weight.shape[0] // layer.groups
                fact = GroupedConvFactorization(format, [
                    module.fit_conv(layer.weight[i * per:(i + 1) * per], spec, **options)
                    for i in range(layer.groups)])
            elif layer.kind == "conv":
                fact = module.fit_conv(layer.weight, spec, **options)
            else:
                fact = module.fit_dense(layer.weight, spec, modes=modes, order=order, **options)
            if refine:
                from .fit import refine as refine_on_data

                refine_on_data(fact, data)
            fact.weight_error = fact.relative_error(layer.weight) if fact.linear else None
            fact.output_error = data.output_error(fact) if data is not None else None
            self.cache[key] = fact
        return self.cache[key]


def fit_error(fact) -> float:
    """The error a choice between candidates minimises: the output error on calibration data
    when measured, else the weight error."""
    return fact.output_error if fact.output_error is not None else fact.weight_error


def choose_auto(plans: list[LayerPlan], fitter: Fitter, formats: tuple[str, ...]) -> None:
    """Per layer, the format with the lowest error (fit_error) under the same rank rule
    (with --tol: the fewest parameters meeting it)."""
    for plan in plans:
        trials = []
        for f in formats:
            try:
                trials.append((f, fitter.fit(plan.layer, f, plan.spec, plan.modes, plan.order, final=False)))
            except NotApplicable:
                continue
        if not trials:
            plan.layer.reason = "no format applies to this layer"
            continue
        if plan.spec.tol is not None:
            best = min(trials, key=lambda t: (fit_error(t[1]) > plan.spec.tol, t[1].params()))
        else:
            best = min(trials, key=lambda t: (fit_error(t[1]), t[1].params()))
        plan.format = best[0]


def allocate_budget(plans: list[LayerPlan], fitter: Fitter, formats: tuple[str, ...], available: int,
                    sensitivity=None) -> None:
    """Choose a format and rank per layer so that the selected layers hold at most
    `available` parameters, minimising the sum of squared relative errors (output errors on
    calibration data when there is some, else weight errors), each weighted by the layer's
    `sensitivity(plan, format, spec)` when given: how much of a layer's error reaches the
    model's outputs, measured at the candidate nearest the layer's proportional share.

    Each distinct weight gets a Pareto front of (parameters, error) candidates (rank caps
    from RANK_LADDER in every allowed format, and keeping the layer dense). Starting from
    the cheapest candidates, the allocator repeatedly takes the upgrade with the largest
    error drop per parameter that still fits: large insensitive layers give up more than
    small sensitive ones. Layers left dense get that reason."""
    groups: dict[str, list[LayerPlan]] = {}
    for plan in plans:
        groups.setdefault(plan.layer.weight_key, []).append(plan)
    fronts = {key: _front(group[0], fitter, formats) for key, group in groups.items()}
    if sensitivity is not None:
        share = available / max(sum(group[0].layer.params for group in groups.values()), 1)
        for key, front in fronts.items():
            layer = groups[key][0].layer
            probe = min(front[1:] or front, key=lambda c: abs(c[0] - share * layer.params))
            weight = sensitivity(groups[key][0], probe[2], probe[3]) if probe[2] is not None else 1.0
            fronts[key] = [(p, e * weight, f, spec) for p, e, f, spec in front]
    current = {key: 0 for key in fronts}
    spent = sum(front[0][0] for front in fronts.values())
    if spent > available:
        raise TnonnxError(f"--budget: unreachable; the selected layers need at least {spent} parameters "
                          f"at the lowest ranks, the budget leaves {max(available, 0)}")
    while True:
        best = None
        for key, front in fronts.items():
            p0, e0 = front[current[key]][:2]
            for j in range(current[key] + 1, len(front)):
                p1, e1 = front[j][:2]
                if spent - p0 + p1 > available:
                    break
                slope = (e0 - e1) / max(p1 - p0, 1)
                if best is None or slope > best[0]:
                    best = (slope, key, j)
        if best is None:
            break
        _, key, j = best
        spent += fronts[key][j][0] - fronts[key][current[key]][0]
        current[key] = j
    for key, group in groups.items():
        _, _, fmt, spec = fronts[key][current[key]]
        for plan in group:
            if fmt is None:
                plan.layer.reason = "kept dense by the --budget allocator"
            else:
                plan.format, plan.spec = fmt, spec


def _front(plan: LayerPlan, fitter: Fitter, formats) -> list[tuple]:
    """(params, squared relative error, format, spec) on the lower Pareto front, by params."""
    layer = plan.layer
    candidates = [(layer.params, 0.0, None, None)]
    for fmt in formats:
        for cap in RANK_LADDER:
            spec = RankSpec(rank=cap)
            try:
                fact = fitter.fit(layer, fmt, spec, plan.modes, plan.order, final=False)
            except NotApplicable:
                break
            if fact.params() >= layer.params:
                break
            candidates.append((fact.params(), fit_error(fact)**2, fmt, spec))
    candidates.sort(key=lambda c: (c[0], c[1]))
    front = []
    for c in candidates:
        if not front or c[1] < front[-1][1]:
            front.append(c)
    return front
