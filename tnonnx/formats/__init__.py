"""The format registry: adding a format means one module here and one line below."""

from types import ModuleType

from . import adtn, cp, ht, hybrid, ntr, ntt, str_, stt, sttu, svd, tr, tt, tucker
from .base import ChainFactorization, ConvFactorization, ConvGeometry, Factorization, RankSpec

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (svd, tt, tr, ht, tucker, cp, hybrid, stt, str_, sttu, ntt, ntr,
                                                 adtn)}

__all__ = ["FORMATS", "ChainFactorization", "ConvFactorization", "ConvGeometry", "Factorization", "RankSpec"]
