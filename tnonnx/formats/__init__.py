"""The format registry: adding a format means one module here and one line below."""

from types import ModuleType

from . import adtn, cp, ht, hybrid, ntr, ntt, str_, stt, sttu, svd, tr, tt, tucker
from .base import ChainFactorization, ConvFactorization, ConvGeometry, Factorization, RankSpec

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (svd, tt, tr, ht, tucker, cp, hybrid, stt, str_, sttu, ntt, ntr,
                                                 adtn)}



def is_nonlinear(name: str) -> bool:
    """Whether format `name` is a nonlinear chain (ntt, ntr: an activation between its cores,
    so no dense weight to rebuild or project on); False for a name that is no format."""
    return bool(getattr(FORMATS.get(name), "NONLINEAR", False))


def nonlinear_formats() -> list[str]:
    return [name for name in FORMATS if is_nonlinear(name)]


__all__ = ["FORMATS", "ChainFactorization", "ConvFactorization", "ConvGeometry", "Factorization", "RankSpec",
           "is_nonlinear", "nonlinear_formats"]
