"""Torch layers of the factorised formats, for fitting and for users who train.

The public names load lazily: the format modules import tnonnx.nn.modules, and these
layers import the formats."""

_PUBLIC = {"ADMM": "admm", "FactorizedConv": "layers", "FactorizedLinear": "layers", "factorize": "convert"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
