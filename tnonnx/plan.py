"""Which layers to rewrite, in which format, with which rank rule."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import NotApplicable, TnonnxError
from .formats import FORMATS, RankSpec, is_nonlinear
from .formats.base import GroupedConvFactorization, check_transposable
from .graph import CANDIDATE_OPS, REWRITABLE_OPS, Layer
from .tensorize import format_modes


# the formats `--format auto` and `--budget` choose from: those that represent any weight
# (hybrid is a fixed pairing of two of them; the semi-tensor formats only fit weights of
# their structure; CP's ALS takes minutes per layer at the ranks the budget ladder tries;
# the nonlinear chains are distilled per layer, too slow for the allocator's many trials)
AUTO_FORMATS = tuple(f for f in FORMATS
                     if f not in ("hybrid", "cp") and not getattr(FORMATS[f], "STRUCTURED", False)
                     and not is_nonlinear(f))


@dataclass
class Selection:
    """Layer selection in the style of onnxruntime.quantization."""

    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv", "ConvTranspose")
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
    timing: object = None  # layer_timing.Timing of the emitted replacement
    dense_timing: object = None  # layer_timing.Timing of the dense layer


def parse_ops(ops, choosing: bool) -> tuple[str, ...]:
    """--ops as the CLI writes it ("MatMul,Gemm") or a sequence; unknown op types are refused.
    Not given: every rewritable op when tnonnx `choosing` where to factorise (--budget,
    --format auto: a layer not worth it stays dense), else the plain layers, so that one
    rank rule does not also truncate embedding tables and recurrent weights."""
    if ops is None:
        return REWRITABLE_OPS if choosing else CANDIDATE_OPS
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
              modes: list | None = None, order: int | None = None) -> list[LayerPlan]:
    """Plans for the selected rewritable layers; the others get their reason set. `modes`:
    (in-modes, out-modes) pairs (tensorize.modes_list); a dense layer takes the first whose
    products are its shape, and each pair must match a layer."""
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
        if modes and layer.kind == "dense":
            n, m = layer.weight_shape
            layer_modes = next((pair for pair in modes if _prod(pair[0]) == n and _prod(pair[1]) == m), None)
        plans.append(LayerPlan(layer, format, spec, layer_modes, order))
    for pair in modes or ():
        if not any(p.modes == pair for p in plans):
            raise TnonnxError(f"--modes {format_modes(pair)}: matches no selected dense layer's shape")
    return plans


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


# ------------------------------------------------------------------ fitting choices

MAX_ORDER = 8  # cores per dense layer; more only fragments the modes into 1s and 2s
# rank caps the budget allocator tries, about 1.5x apart; up to 8192 so that a 4096-wide
# layer can keep half its parameters (svd rank 1024): a ladder ending at 512 held such a
# layer at 4x fewer parameters whatever the budget (docs/RESULTS.md)
RANK_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
               3072, 4096, 6144, 8192)


class Fitter:
    """Fits layers, once per (weight, format, spec, modes, order, data): layers that share a
    weight share the factorisation, and the budget allocator's many trials are reused.

    With calibration data for a layer (tnonnx.fit.LayerData, keyed by layer name): formats
    with SUPPORTS_DATA take it in their closed form (svd's whitened SVD), formats with
    NEEDS_DATA fit to it (the nonlinear chains), and the other linear formats are refined on
    it from their data-free decomposition in the final fit (`final=True`); the budget
    allocator's trials skip that refinement and are ranked by their measured output error."""

    def __init__(self, options: dict | None = None, data: dict | None = None, balance: bool = False,
                 pool_final: bool = False):
        self.options = options or {}
        self.balance = balance  # cores scaled to equal norms (the gpu target's fp16 range)
        # final fits on all calibration rows, the held-out ones included (key()): where no
        # planner judges candidates on the held-out rows, they would only be withheld from the fit
        self.pool_final = pool_final
        self.data = data if data is not None else {}
        self.cache: dict = {}

    def settings(self) -> dict:
        """What a Fitter in a worker process is made with besides options and data."""
        return {"balance": self.balance, "pool_final": self.pool_final}

    def key(self, layer: Layer, format: str, spec: RankSpec, modes=None, order=None, *, final: bool = True,
            pool: bool = True):
        """The cache key of fit(...): fits with equal keys give equal factorisations."""
        module = FORMATS[format]
        data = self.data.get(layer.name)
        refine = data is not None and final and not self._takes_data(module, layer) \
            and not getattr(module, "DATA_FREE", False)
        # with pool_final, a closed-form fit (svd's whitened SVD) is made again on all calibration
        # rows where some were held out. Refined chains keep their fit: 50 more L-BFGS steps on
        # all rows cost LeNet-5's TT/TR 20-35% more time for no gain (docs/RESULTS.md), and the
        # nonlinear formats fit to the sampled rows, which include the held-out ones already
        pooled = pool and self.pool_final and final and getattr(data, "held_basis", None) is not None \
            and getattr(module, "SUPPORTS_DATA", False)
        return (layer.weight_key, format, spec, modes, order, id(data) if data is not None else None, refine, pooled)

    @staticmethod
    def _takes_data(module, layer: Layer) -> bool:
        return getattr(module, "SUPPORTS_DATA", False) or getattr(module, "NEEDS_DATA", False) \
            or layer.kind in ("embedding", "tied")  # row weights, see tnonnx/embedding.py

    def fit(self, layer: Layer, format: str, spec: RankSpec, modes=None, order=None, *, final: bool = True,
            measure: bool = True, pool: bool = True):
        """The factorisation (cached by key()); `measure`: with its weight, output and
        held-out errors, which cost more than an svd fit itself (the planner's timing only
        needs the cores; errors are measured when a later call asks). With pool_final, a final
        closed-form fit of a layer with held-out calibration rows is made twice (see key()):
        on the rows without them, whose held-out error it reports, then on all rows
        (`pool=False`: the first only)."""
        data = self.data.get(layer.name)
        key = self.key(layer, format, spec, modes, order, final=final, pool=pool)
        refine, pooled = key[-2:]
        if key not in self.cache and pooled:
            split = self.fit(layer, format, spec, modes, order, final=True, measure=False, pool=False)
            self.cache[key] = self._on_all_rows(split, layer, format, spec, modes, order, data)
        elif key not in self.cache:
            self.cache[key] = self._new_fit(layer, format, spec, modes, order, data, refine)
        fact = self.cache[key]
        if isinstance(fact, NotApplicable):  # as a worker process found it (tnonnx/workers.py)
            raise fact
        if measure and not getattr(fact, "measured", False):
            self._measure(fact, layer, data)
        return fact

    def _new_fit(self, layer: Layer, format: str, spec: RankSpec, modes, order, data, refine: bool):
        module = FORMATS[format]
        takes_data = self._takes_data(module, layer)
        options = dict(self.options, data=data) if takes_data and data is not None else self.options
        transposed = layer.kind == "conv" and layer.geometry.transposed
        if transposed:  # formats with a choice of layout take one a ConvTranspose keeps
            options = dict(options, transposed=True)
        if layer.kind in ("embedding", "tied"):
            from .embedding import fit as fit_embedding

            fact = fit_embedding(module, layer, spec, modes, order, data)
        elif layer.kind == "recurrent":
            from .recurrent import fit as fit_recurrent

            fact = fit_recurrent(module, layer, spec, modes, order, **options)
        else:
            fact = fit_weight(format, layer.weight, spec, groups=layer.groups if layer.kind == "conv" else 1,
                              modes=modes, order=order, options=options)
        if transposed:
            check_transposable(fact)
        if refine:
            from .fit import refine as refine_on_data

            refine_on_data(fact, data)
        if self.balance:
            from .fp16 import balance_cores

            balance_cores(fact)
        return fact

    def _on_all_rows(self, split, layer: Layer, format: str, spec: RankSpec, modes, order, data):
        """The closed-form fit again on all calibration rows (LayerData.pooled), measured on
        them; its held-out error is the `split` fit's, measured on the rows it did not see
        (only that error of the split fit is reported, so only it is measured)."""
        pooled = data.pooled()
        fact = self._new_fit(layer, format, spec, modes, order, pooled, refine=False)
        self._measure(fact, layer, pooled)
        if split.measured:
            fact.held_out_error = split.held_out_error
        else:
            fact.held_out_error = data.held_out_error(split, split.to_dense() if split.linear else None)
        return fact

    @staticmethod
    def _measure(fact, layer: Layer, data) -> None:
        dense = fact.to_dense() if fact.linear else None  # once: a ring's takes long
        fact.weight_error = fact.relative_error(layer.weight, dense) if dense is not None else None
        fact.output_error = data.output_error(fact, dense) if data is not None else None
        fact.held_out_error = data.held_out_error(fact, dense) if data is not None else None
        fact.measured = True


def fit_weight(format: str, weight, spec: RankSpec, *, groups: int = 1, modes=None, order=None,
               options: dict | None = None, fitted: bool = True):
    """The format's factorisation of a dense weight (N x M, y = x W) or a conv kernel
    (T x S/g x k...; a grouped conv group by group). `fitted=False`: only the structure
    (nonlinear formats skip their distillation), for training from scratch."""
    module = FORMATS[format]
    options = options or {}
    fit_dense, fit_conv = module.fit_dense, module.fit_conv
    if not fitted and hasattr(module, "start"):
        fit_dense = fit_conv = module.start
    if weight.ndim == 2:
        return fit_dense(weight, spec, modes=modes, order=order, **options)
    if groups > 1:
        per = weight.shape[0] // groups
        return GroupedConvFactorization(format, [fit_conv(weight[i * per:(i + 1) * per], spec, **options)
                                                 for i in range(groups)])
    return fit_conv(weight, spec, **options)


def fit_error(fact) -> float:
    """The error a choice between candidates minimises: the output error on the held-out
    calibration samples when there are some, else on the calibration data when measured,
    else the weight error."""
    for error in (getattr(fact, "held_out_error", None), fact.output_error):
        if error is not None:
            return error
    return fact.weight_error
