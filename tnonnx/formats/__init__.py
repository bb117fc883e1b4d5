"""The format registry: adding a format means one module here and one line below."""

from types import ModuleType

from . import ht, hybrid, str_, stt, sttu, svd, tr, tt
from .base import ChainFactorization, ConvFactorization, ConvGeometry, Factorization, RankSpec

FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (svd, tt, tr, ht, hybrid, stt, str_, sttu)}

__all__ = ["FORMATS", "ChainFactorization", "ConvFactorization", "ConvGeometry", "Factorization", "RankSpec"]
