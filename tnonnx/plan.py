"""Which layers to rewrite, in which format, with which rank rule."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
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
    emission: str | None = None  # None: the fastest measured when the layer is emitted
    timing: object = None  # latency.Timing of the emitted replacement
    dense_timing: object = None  # latency.Timing of the dense layer


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


# ------------------------------------------------------------------ choosing per layer


@dataclass
class Option:
    """One way to carry a group of layers that share a weight: dense (format None) or a
    format at a rank rule, emitted one way, with what it costs and the error it makes."""

    format: str | None
    spec: RankSpec | None
    params: int
    error: float  # squared relative error the choice minimises (weighted by sensitivity)
    emission: str = "matmul"
    ms: float | None = None  # all layers of the group at the deployment shape (None: not known)
    predicted_ms: float | None = None
    measured: bool = False
    macs_ratio: float | None = None  # MACs against dense, for layers whose time is not known

    @property
    def dense(self) -> bool:
        return self.format is None


def emissions_for(fact, emit: str, layer: Layer) -> tuple[str, ...]:
    """The emissions a factorisation can be timed in: conv factorisations have one (Conv
    nodes); chains all standard-op layouts under --emit auto, else the one asked for.
    Features-first is float32 only: onnxruntime (1.2x CPU) crashed loading a float16 one,
    and float16 models are not what its layout was measured on."""
    if not hasattr(fact, "chain"):
        return ("matmul",)
    features_first = np.dtype(layer.compute_dtype or np.float32) == np.float32
    if emit == "auto":
        return ("matmul", "features-first") if features_first else ("matmul",)
    if emit == "features-first" and not features_first:
        return ("matmul",)
    return (emit,)


def candidate_options(plan: LayerPlan, fitter: Fitter, trials: list[tuple[str, RankSpec]]) -> list[Option]:
    """Options for the (format, spec) trials of one layer (data-free or closed-form fits);
    trials that do not apply, or are not smaller than the layer, are left out."""
    layer, out, done = plan.layer, [], set()
    for fmt, spec in trials:  # a format's trials come in growing rank: stop at the first too large
        if fmt in done:
            continue
        try:
            fact = fitter.fit(layer, fmt, spec, plan.modes, plan.order, final=False)
        except NotApplicable:
            done.add(fmt)
            continue
        if fact.params() >= layer.params:
            done.add(fmt)
            continue
        out.append(Option(fmt, spec, fact.params(), fit_error(fact) ** 2, macs_ratio=_macs_ratio(fact, layer)))
    return out


def _macs_ratio(fact, layer: Layer) -> float | None:
    if hasattr(fact, "chain"):
        return fact.chain.macs_per_row() / max(layer.params, 1)
    geometry = layer.geometry
    if geometry is not None and geometry.in_spatial is not None and geometry.out_spatial is not None:
        dense = layer.params * math.prod(geometry.out_spatial)
        return fact.macs(geometry) / max(dense, 1)
    return None


def time_options(group: list[LayerPlan], options: list[Option], fitter: Fitter, timer, emit: str) -> list[Option]:
    """Each option timed at the deployment shape (summed over the group's layers) in its
    fastest emission, plus the dense option; `timer` is a latency.LayerTimer or None."""
    first = group[0]
    dense = Option(None, None, first.layer.params, 0.0, macs_ratio=1.0)
    if timer is None:
        return [dense] + options
    trials, owners = [], []
    for i, o in enumerate(options):
        fact = fitter.fit(first.layer, o.format, o.spec, first.modes, first.order, final=False)
        for emission in emissions_for(fact, emit, first.layer):
            trials.append((fact, emission))
            owners.append(i)
    per_layer = [timer.candidates(p.layer, trials) for p in group]
    dense_times = [timer.dense(p.layer) for p in group]
    dense.ms, dense.predicted_ms, dense.measured = _sum_timings(dense_times)
    out = [dense]
    for i, o in enumerate(options):
        best = None
        for j in (j for j, owner in enumerate(owners) if owner == i):
            ms, predicted, measured = _sum_timings([t[j] for t in per_layer])
            if best is None or (ms is not None and (best.ms is None or ms < best.ms)):
                best = dataclasses.replace(o, emission=trials[j][1], ms=ms, predicted_ms=predicted, measured=measured)
        out.append(best)
    return out


def _sum_timings(timings) -> tuple:
    if any(t.ms is None for t in timings):
        return None, None, False
    return (sum(t.ms for t in timings), sum(t.predicted_ms for t in timings), all(t.measured for t in timings))


def apply_floor(options: list[Option]) -> tuple[list[Option], int]:
    """The never-slower rule: options measured (or, where the layer could not be timed,
    counted in MACs) slower than the dense layer are dropped. Returns (kept, dropped)."""
    dense = options[0]
    kept = [o for o in options if o.dense or not _slower(o, dense)]
    return kept, len(options) - len(kept)


# timings within this of each other are one speed: interleaved medians of tiny layers still
# scatter by a few percent and a microsecond
FLOOR_RELATIVE, FLOOR_ABSOLUTE_MS = 0.05, 0.001


def _slower(option: Option, dense: Option) -> bool:
    if option.ms is not None and dense.ms is not None:
        return option.ms > dense.ms * (1 + FLOOR_RELATIVE) + FLOOR_ABSOLUTE_MS
    return option.macs_ratio is not None and option.macs_ratio > 1.0


class Unreachable(TnonnxError):
    """A target (--budget, --speedup) no choice of the candidates meets."""


def choose(options: dict[str, list[Option]], max_params: float | None = None,
           max_ms: float | None = None) -> dict[str, Option]:
    """One option per group minimising the summed error with the groups' parameters at most
    `max_params` and their time at most `max_ms` (None: no limit).

    Greedy on a combined resource, parameters / max_params + ms / max_ms: start from the
    cheapest feasible choice, then repeatedly take the change with the largest error drop per
    unit of resource that keeps both limits (free changes first). With only a parameter
    limit this is the error-per-parameter allocator of section 10 of ALGORITHMS.md."""
    def usage(choice):
        params = sum(o.params for o in choice.values())
        ms = sum(o.ms or 0.0 for o in choice.values())
        return params, ms

    def fits(params, ms):
        return (max_params is None or params <= max_params) and (max_ms is None or ms <= max_ms + 1e-12)

    def resource(o):
        r = o.params / max_params if max_params else 0.0
        return r + ((o.ms or 0.0) / max_ms if max_ms else 0.0)

    if max_params is None and max_ms is None:
        return {k: min(opts, key=lambda o: (o.error, o.params)) for k, opts in options.items()}
    starts = [{k: min(opts, key=lambda o: (resource(o), o.error)) for k, opts in options.items()},
              {k: min(opts, key=lambda o: ((o.ms or 0.0), o.params)) for k, opts in options.items()},
              {k: min(opts, key=lambda o: (o.params, o.ms or 0.0)) for k, opts in options.items()}]
    current = next((c for c in starts if fits(*usage(c))), None)
    if current is None:
        params = sum(min(o.params for o in opts) for opts in options.values())
        ms = sum(min(o.ms or 0.0 for o in opts) for opts in options.values())
        raise Unreachable(_shortfall(params, ms, max_params, max_ms))
    while True:
        params, ms = usage(current)
        best = None
        for key, opts in options.items():
            cur = current[key]
            for o in opts:
                if o.error >= cur.error:
                    continue
                if not fits(params - cur.params + o.params, ms - (cur.ms or 0.0) + (o.ms or 0.0)):
                    continue
                extra = resource(o) - resource(cur)
                drop = cur.error - o.error
                rank = (1, drop) if extra <= 0 else (0, drop / extra)
                if best is None or rank > best[0]:
                    best = (rank, key, o)
        if best is None:
            return current
        current[best[1]] = best[2]


def _shortfall(params, ms, max_params, max_ms) -> str:
    if max_params is not None and params > max_params:
        return (f"--budget: unreachable; the selected layers need at least {params} parameters at the lowest "
                f"ranks, the budget leaves {max(int(max_params), 0)}")
    return (f"the fastest choice for every layer still takes {ms:.3f} ms in the rewritten layers, "
            f"{max(max_ms, 0.0):.3f} ms would be needed")


def pareto(options: list[Option]) -> list[Option]:
    """Options not dominated in (params, ms, error) by another (dense always kept)."""
    def dominated(a, b):
        keys_a = (a.params, a.ms if a.ms is not None else math.inf, a.error)
        keys_b = (b.params, b.ms if b.ms is not None else math.inf, b.error)
        return all(y <= x for x, y in zip(keys_a, keys_b)) and keys_a != keys_b
    return [o for o in options if o.dense or not any(dominated(o, b) for b in options if b is not o)]


def ladder(formats, layer: Layer) -> list[tuple[str, RankSpec]]:
    """The (format, rank cap) trials of the --budget allocator."""
    return [(f, RankSpec(rank=cap)) for f in formats for cap in RANK_LADDER]
