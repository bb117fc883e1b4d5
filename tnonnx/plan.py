"""Which layers to rewrite, in which format, with which rank rule."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TnonnxError
from .formats import FORMATS, RankSpec
from .graph import Layer


@dataclass
class Selection:
    """Layer selection in the style of onnxruntime.quantization."""

    ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    include: str | None = None  # regex on node names
    exclude: str | None = None
    min_params: int = 0

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


def rank_spec(rank: int | None = None, tol: float | None = None, ratio: float | None = None) -> RankSpec:
    given = [v is not None for v in (rank, tol, ratio)]
    if sum(given) > 1:
        raise TnonnxError("give one of --rank, --tol, --ratio")
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
    if format not in FORMATS:
        raise TnonnxError(f"--format {format}: unknown (choose from {', '.join(FORMATS)})")
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
