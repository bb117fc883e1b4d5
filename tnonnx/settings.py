"""The settings of one rewrite, in a few small frozen groups (DESIGN.md): what each layer
becomes (RankRule), which layers (plan.Selection, with Scope), how they are fitted and
trained (Fitting), where the model runs and how fast it must be (latency.Deployment, Speed),
what is checked (Checks) and what the output is made ready for (Delivery).

`RewriteSettings.of(...)` takes tnonnx.rewrite's keywords (the CLI's options under the same
names), checks and parses them in one place before any model is read, and the pipeline
(api.rewrite_with) passes the groups along."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import deploy
from .errors import TnonnxError
from .finetune import HIDDEN_WEIGHT
from .formats import RankSpec
from .latency import Deployment
from .plan import Selection, parse_budget, parse_ops, rank_spec
from .quantize import Quantization
from .targets import Target
from .tensorize import format_modes, modes_list
from .validate import check_thresholds

EMIT_MODES = ("auto", "matmul", "features-first", "einsum", "custom")
FIT_MODES = ("data-free", "aware", "sequential", "blockwise")
RECURRENT_MODES = ("fused", "scan")


@dataclass(frozen=True)
class RankRule:
    """What each selected layer becomes: the format, its rank rule (`spec`, parsed and aligned
    to the target's multiples), the tensorization and core count, the format's own options."""

    format: str = "tt"
    rank: int | str | None = None  # as aligned (deploy.align_rank)
    tol: float | None = None
    ratio: float | None = None
    budget: float | None = None  # parsed: 3.0 for "3x"
    spec: RankSpec | None = None
    modes: tuple | None = None  # parsed (tensorize.modes_list)
    order: int | None = None
    format_options: dict | None = None

    @property
    def choosing(self) -> bool:
        """Whether tnonnx chooses where to factorise (--budget, --format auto)."""
        return self.budget is not None or self.format == "auto"

    @property
    def modes_text(self) -> str | None:
        return None if self.modes is None else ";".join(map(format_modes, self.modes))

    def describe(self) -> str:
        return f"budget {self.budget:g}x" if self.budget else self.spec.describe()


@dataclass(frozen=True)
class Scope:
    """Which layers, and in which form of the graph: the Selection, --force (rewrite where
    nothing is saved), --recurrent (fused nodes, or written as Scans first)."""

    selection: Selection = field(default_factory=Selection)
    force: bool = False
    recurrent: str = "fused"


@dataclass(frozen=True)
class Fitting:
    """How the layers are fitted (--fit, --calib) and trained after (--finetune, --admm)."""

    mode: str = "data-free"
    calib: object = None  # a path, a folder of .npz files, a dict of arrays, or calibrate's random spec
    finetune: int = 0
    finetune_hidden: float = HIDDEN_WEIGHT
    admm: bool = False
    admm_rho: float | None = None
    train_precision: str = "auto"
    workers: int | None = None


@dataclass(frozen=True)
class Speed:
    """How the layers are emitted and what speed is asked for at the deployment shape."""

    emit: str = "auto"  # as the target allows (deploy.plan)
    keep_columns: bool = True
    speedup: float | None = None
    allow_slower: bool = False
    keep_best: bool = False
    timing: bool = True
    timing_cache: bool = True
    timer: object = None  # an injected timer (tests); None: onnxruntime, or the cost model without timing


@dataclass(frozen=True)
class Checks:
    """The comparison with the original after the rewrite."""

    validate: bool = True
    inputs: object = None
    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    max_accuracy_drop: float | None = None

    @property
    def asked(self) -> bool:
        """Whether the user asked for a check (a threshold, or --inputs): it then fails loudly."""
        return self.inputs is not None or any(v is not None for v in
                                              (self.atol, self.rtol, self.min_cosine, self.max_accuracy_drop))


@dataclass(frozen=True)
class Delivery:
    """What the output is made ready for: the target and its checked form, the quantization."""

    target: str = "cpu"
    quantize: str | None = None
    int8: str | None = None
    max_model_bytes: int | None = None
    short_names: bool = False
    deployment_target: Target | None = None  # deploy.plan's, from the fields above
    quantization: Quantization | None = None

    @property
    def changes_model(self) -> bool:
        """Whether deploy.finish has work after the factorisation."""
        return (self.target != "cpu" or self.quantization is not None or self.max_model_bytes is not None
                or self.short_names)


@dataclass(frozen=True)
class RewriteSettings:
    rule: RankRule
    scope: Scope
    fitting: Fitting
    deployment: Deployment
    speed: Speed
    checks: Checks
    delivery: Delivery

    @classmethod
    def of(cls, *, format: str = "tt", rank=None, tol=None, ratio=None, budget=None, modes=None, order=None,
           format_options=None, emit: str = "auto", batch: int = 1, ops=None, recurrent: str = "fused",
           include=None, exclude=None, min_params: int = 0, force: bool = False, validate: bool = True,
           inputs=None, shapes=None, atol=None, rtol=None, min_cosine=None, max_accuracy_drop=None,
           fit: str = "data-free", calib=None, finetune: int = 0, finetune_hidden: float = HIDDEN_WEIGHT,
           admm: bool = False, admm_rho=None, train_precision: str = "auto", threads=None, speedup=None,
           allow_slower: bool = False, keep_best: bool = False, timing: bool = True, timing_cache: bool = True,
           timer=None, target: str = "cpu", quantize=None, int8=None, max_model_bytes=None,
           short_names: bool = False, workers=None, keep_columns: bool = True) -> "RewriteSettings":
        """The groups from tnonnx.rewrite's keywords; TnonnxError (exit 2) for a value no
        rewrite can take. Checks that need the model (opset, layers) come later."""
        if emit not in EMIT_MODES:
            raise TnonnxError(f"--emit {emit}: choose from {', '.join(EMIT_MODES)}")
        check_thresholds(atol, rtol, min_cosine, max_accuracy_drop, batch)
        deployment_target, quantization, emit = deploy.plan(target, quantize, emit, calib is not None,
                                                            max_model_bytes, int8, short_names)
        budget = parse_budget(budget)
        ops = parse_ops(ops, choosing=budget is not None or format == "auto")
        if threads is not None and threads < 1:
            raise TnonnxError(f"--threads {threads}: must be >= 1")
        if speedup is not None and not speedup > 0:
            raise TnonnxError(f"--speedup {speedup:g}: must be > 0 (e.g. 1.5)")
        rank = deploy.align_rank(rank, target, quantization)
        spec = rank_spec(rank, tol, ratio, budget)
        if quantization is not None and quantization.mode == "int4":
            spec = dataclasses.replace(spec, align=quantization.block_size)
        return cls(
            rule=RankRule(format, rank, tol, ratio, budget, spec, None if modes is None else tuple(modes_list(modes)),
                          order, format_options),
            scope=Scope(Selection(ops=tuple(ops), include=include, exclude=exclude, min_params=min_params),
                        force, recurrent),
            fitting=Fitting(fit, calib, finetune, finetune_hidden, admm, admm_rho, train_precision, workers),
            deployment=Deployment.of(batch, shapes, threads),
            speed=Speed(emit, keep_columns, speedup, allow_slower, keep_best, timing, timing_cache, timer),
            checks=Checks(validate, inputs, atol, rtol, min_cosine, max_accuracy_drop),
            delivery=Delivery(target, quantize, int8, max_model_bytes, short_names, deployment_target, quantization),
        )
