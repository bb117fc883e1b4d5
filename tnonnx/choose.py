"""Choosing format, rank and emission per layer group (layers sharing a weight) when tnonnx
chooses (--format auto, --budget, --speedup), from measured error and measured latency.

Each group gets options (dense, and each format x rank x emission), fitted once and timed
at the deployment shape (layer_timing.LayerTimer); the never-slower floor drops options slower
than dense; `choose` allocates them under the parameter and time limits; `Planner` ties it
together (tnonnx/planner.py) and re-plans with a tighter time limit when the whole model
missed --speedup.

An embedding table is the exception to the per-layer floor under --budget: one Gather is
the fastest layer there is, so every factorised table (a Gather of the first factor, then
a MatMul) is slower than it. Its timed options are kept, and the rule applies to the
selected layers together instead: their summed time must not exceed their dense time, so a
table is factorised only where time saved in the other layers pays for it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import estimate
from .errors import NotApplicable, TnonnxError
from .formats import RankSpec
from .graph import Layer
from .plan import RANK_LADDER, Fitter, LayerPlan, fit_error


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
    if not hasattr(fact, "chain") or layer.kind in ("embedding", "tied", "recurrent"):
        return ("matmul",)
    features_first = np.dtype(layer.compute_dtype or np.float32) == np.float32
    if emit == "auto":
        return ("matmul", "features-first") if features_first else ("matmul",)
    if emit == "rows":  # the edge target: matmul over 2-D rows, nothing else
        return ("rows",)
    if emit == "features-first" and not features_first:
        return ("matmul",)
    return (emit,)


def candidate_options(plan: LayerPlan, fitter: Fitter, trials: list[tuple[str, RankSpec]],
                      counts: dict | None = None, prune=None, emit: str = "auto") -> list[Option]:
    """Options for the (format, spec) trials of one layer (data-free or closed-form fits);
    trials that do not apply, or are not smaller than the layer, are left out. svd's come
    from its spectrum without fitting (estimate.svd_estimates, exact); a format slow to fit
    is fitted only where its proxy at the same spec may win (estimate.may_win). `prune` (a
    layer_timing.Pruner, under the never-slower floor): a trial it predicts far slower than
    dense in every `emit` emission is left out unmeasured, with its format's larger ranks.
    `counts` (when given) tallies "estimated", "fitted", "skipped" and "predicted slower" trials."""
    layer, out, done = plan.layer, [], set()
    counts = {} if counts is None else counts
    svd_specs = [spec for fmt, spec in trials if fmt == "svd"]
    estimates = estimate.svd_estimates(layer, fitter.data.get(layer.name), svd_specs) if svd_specs else None
    if estimates is not None:
        for spec, params, error in estimates:
            if params >= layer.params:
                break
            out.append(Option("svd", spec, params, error, macs_ratio=_svd_macs_ratio(params, layer)))
        counts["estimated"] = counts.get("estimated", 0) + len(out)
        done.add("svd")
    for fmt, spec in trials:  # a format's trials come in growing rank: stop at the first too large
        if fmt in done:
            continue
        proxy = estimate.slow(fmt)
        if proxy is not None:
            twin = next((o for o in out if o.format == proxy and o.spec == spec), None)
            if twin is None and proxy in done:  # past the proxy's last cap: not a trial worth counting
                continue
            if twin is None or not estimate.may_win(twin.params, twin.error,
                                                     [(o.params, o.error) for o in out if o is not twin]):
                counts["skipped"] = counts.get("skipped", 0) + 1
                continue
        try:
            fact = fitter.fit(layer, fmt, spec, plan.modes, plan.order, final=False, measure=False)
        except NotApplicable:
            done.add(fmt)
            continue
        counts["fitted"] = counts.get("fitted", 0) + 1
        if fact.params() >= layer.params:
            done.add(fmt)
            continue
        if prune is not None and prune.slower(layer, fact, emissions_for(fact, emit, layer)):
            counts["predicted slower"] = counts.get("predicted slower", 0) + 1
            done.add(fmt)  # its larger ranks cost more still
            continue
        fact = fitter.fit(layer, fmt, spec, plan.modes, plan.order, final=False)  # measured now
        out.append(Option(fmt, spec, fact.params(), fit_error(fact) ** 2, macs_ratio=_macs_ratio(fact, layer)))
    return out


def _svd_macs_ratio(params: int, layer: Layer) -> float | None:
    """_macs_ratio of an svd factorisation with `params` parameters: its two stages take
    r (n + m) multiply-adds per row (per output position for convs, the first carrying the stride)."""
    if layer.kind == "embedding":  # a Gather does no multiply-adds, its factorisation does
        return math.inf
    if layer.kind == "dense" or (layer.geometry is not None and layer.geometry.in_spatial is not None
                                 and layer.geometry.out_spatial is not None):
        return params / max(layer.params, 1)
    return None


def _macs_ratio(fact, layer: Layer) -> float | None:
    if layer.kind == "embedding":
        return math.inf
    if hasattr(fact, "chain"):
        return fact.chain.macs_per_row() / max(layer.params, 1)
    geometry = layer.geometry
    if geometry is not None and geometry.in_spatial is not None and geometry.out_spatial is not None:
        # a conv costs its parameters per output position, a ConvTranspose per input position
        dense = layer.params * math.prod(geometry.in_spatial if geometry.transposed else geometry.out_spatial)
        return fact.macs(geometry) / max(dense, 1)
    return None


def time_options(group: list[LayerPlan], options: list[Option], fitter: Fitter, timer, emit: str) -> list[Option]:
    """Each option timed at the deployment shape (summed over the group's layers) in its
    fastest emission, plus the dense option; `timer` is a layer_timing.LayerTimer."""
    first = group[0]
    dense = Option(None, None, first.layer.params, 0.0, macs_ratio=1.0)
    trials, owners = [], []
    for i, o in enumerate(options):
        fact = fitter.fit(first.layer, o.format, o.spec, first.modes, first.order, final=False, measure=False)
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


def fastest(options: dict[str, list[Option]], max_params: float | None = None) -> dict[str, Option]:
    """The choice with the least time whose parameters stay within `max_params`: choose()
    with time in the place of the error (Unreachable only when the parameters cannot fit)."""
    by_time = {k: [dataclasses.replace(o, error=o.ms or 0.0, ms=None) for o in opts] for k, opts in options.items()}
    picked = choose(by_time, max_params)
    return {k: options[k][by_time[k].index(o)] for k, o in picked.items()}


def _shortfall(params, ms, max_params, max_ms) -> str:
    if max_params is not None and params > max_params:
        return (f"--budget: unreachable; the selected layers need at least {params} parameters at the lowest "
                f"ranks, the budget leaves {max(int(max_params), 0)}")
    return (f"the fastest choice for every layer still takes {ms:.3f} ms in the rewritten layers, "
            f"{max(max_ms, 0.0):.3f} ms would be needed")


def pareto(options: list[Option], by_time: bool = True) -> list[Option]:
    """Options not dominated in (params, ms, error), or (params, error) when time is not
    a limit, by another (dense always kept)."""
    def keys(o):
        return (o.params, o.error) + ((o.ms if o.ms is not None else math.inf,) if by_time else ())

    def dominated(a, b):
        keys_a, keys_b = keys(a), keys(b)
        return all(y <= x for x, y in zip(keys_a, keys_b)) and keys_a != keys_b
    return [o for o in options if o.dense or not any(dominated(o, b) for b in options if b is not o)]


SIMD_WIDTH = 8  # float32 lanes of AVX2; AVX-512 kernels also run full at multiples of 8 (16 better)


def ladder(formats, simd: bool = False, align: int = 1) -> list[tuple[str, RankSpec]]:
    """The (format, rank cap) trials of the --budget allocator; with `simd` (--speedup) only
    caps that are multiples of the SIMD width, at which GEMM and Conv kernels run full vectors
    (ALGORITHMS.md section 12: conv factorisations reach 86-96% of their MAC ratio there);
    with `align` (--quantize int4's block) caps below it or multiples of it."""
    caps = [c for c in RANK_LADDER if (not simd or c % SIMD_WIDTH == 0) and (c < align or c % align == 0)]
    return [(f, RankSpec(rank=cap)) for f in formats for cap in caps]


MAX_REPLANS = 3  # --speedup: re-plans after the whole model missed the target
RELAX_MARGIN = 0.1  # a plan this much faster than --speedup needs gives the surplus back to accuracy
RELAX_PARTS = (1.0, 0.5, 0.25)  # of the surplus, tried in turn
REPLAN_STEP = 0.02  # a re-plan after a miss asks the layers for at least this share of the target time more


@dataclass(frozen=True)
class SpeedRules:
    speedup: float | None  # the rewritten model must run this many times as fast
    floor: bool  # no layer slower than dense (auto / budget unless --allow-slower)
    emit: str


def slower_note(format, budget, speedup, allow_slower, before_ms, after_ms) -> str:
    if format != "auto" and budget is None and not speedup:
        hint = "--format auto or --budget (which never emit a layer slower than dense), or --speedup X"
    else:
        hint = "--speedup X" + (", or drop --allow-slower" if allow_slower else "")
    return (f"the rewritten model is SLOWER than the original at the deployment shape: {after_ms:.3f} ms "
            f"against {before_ms:.3f} ms ({before_ms / after_ms:.2f}x); to avoid it use {hint}")


def meet_speedup(build, measure, target_ms: float, *, before_ms: float | None = None, predict=None):
    """The plan for --speedup: `build(slack)` makes one (slack: ms the layers must give up
    beyond the per-layer estimate; may raise TnonnxError when none exists), `measure(plan)`
    times the whole model. While the model misses `target_ms`, the slack grows by the miss
    (at least REPLAN_STEP of the target; up to MAX_REPLANS times); when it beats the target
    by more than RELAX_MARGIN, plans with the surplus (then a half, then a quarter of it)
    given back to accuracy are tried, the first that still meets the target kept.
    Builds share the layers' plans, so a plan given up is rebuilt before it is returned.

    `predict(plan)` (with `before_ms`, the original's time): the plan's model time as the
    per-layer timings predict it. Layers are timed at another moment than the whole model
    (or come from the timing cache), and a machine's speed moves between moments: when the
    measured saving differs from the predicted one, the slack at which the layers' timings,
    scaled by that ratio, meet the target (with REPLAN_STEP to spare) is tried first."""
    slack = 0.0
    plan = build(slack)
    ms = measure(plan)

    def aimed() -> float | None:
        predicted = predict(plan) if predict is not None and before_ms is not None else None
        if predicted is None or ms is None or not (predicted < before_ms and ms < before_ms):
            return None
        needed = before_ms - target_ms * (1 - REPLAN_STEP)
        return needed * (before_ms - predicted) / (before_ms - ms) - (before_ms - target_ms)

    for _ in range(MAX_REPLANS):
        if ms is None or ms <= target_ms:
            break
        # at least REPLAN_STEP of the target: a miss by a hair would otherwise ask for a
        # saving smaller than any change of rank, and get the same plan back
        aim = aimed()
        step = max(ms - target_ms, REPLAN_STEP * target_ms, 0.0 if aim is None else aim - slack)
        try:
            trial = build(slack + step)
        except TnonnxError:  # no tighter plan exists: keep this one
            return build(slack)
        slack, plan = slack + step, trial
        ms = measure(plan)
    if ms is not None and ms < target_ms * (1 - RELAX_MARGIN):
        surplus = target_ms - ms
        aim = aimed()
        tries = ([aim] if aim is not None and aim < slack else []) + [slack - part * surplus for part in RELAX_PARTS]
        for relaxed in tries:
            try:
                trial = build(relaxed)
                trial_ms = measure(trial)
            except TnonnxError:
                continue
            if trial_ms is not None and trial_ms <= target_ms:
                return trial
        plan = build(slack)
    return plan

