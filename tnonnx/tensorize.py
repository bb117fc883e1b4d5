"""Choosing mode factorisations ("tensorization") of layer dimensions."""

from __future__ import annotations

import math
from functools import lru_cache

from .errors import TnonnxError


@lru_cache(maxsize=None)
def _factorisations(n: int, d: int, smallest: int = 1) -> tuple[tuple[int, ...], ...]:
    """All non-decreasing tuples of d factors >= smallest whose product is n."""
    if d == 1:
        return ((n,),) if n >= smallest else ()
    out = []
    f = max(smallest, 1)
    while f ** d <= n:
        if n % f == 0:
            out.extend((f,) + rest for rest in _factorisations(n // f, d - 1, f))
        f += 1
    return tuple(out)


def factor_dims(n: int, d: int) -> tuple[int, ...]:
    """The most balanced factorisation of n into d factors, ascending.

    Balanced means the smallest spread of log-factors around log(n)/d. A prime n gives
    (1, ..., 1, n): exact, but it compresses nothing along that dimension.
    """
    if n < 1 or d < 1:
        raise ValueError("n and d must be positive")
    target = math.log(n) / d
    return min(_factorisations(n, d), key=lambda fs: sum((math.log(f) - target) ** 2 for f in fs))


def default_order(n: int, m: int) -> int:
    """Number of cores for an n x m matrix: modes of about 8, between 2 and 4 cores."""
    return max(2, min(4, round(math.log(max(n, m), 8))))


def choose_modes(n: int, m: int, order: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """In-modes and out-modes with the same number of cores for an n x m weight."""
    d = order or default_order(n, m)
    return factor_dims(n, d), factor_dims(m, d)


def format_modes(modes) -> str:
    """(in-modes, out-modes) in the notation --modes takes: 8x8x6,4x8x12."""
    return ",".join("x".join(map(str, side)) for side in modes)


def modes_list(modes) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """--modes as a list of (in-modes, out-modes) pairs: from text ("16x24,24x64", or several
    pairs joined by ";"), one pair, or a list of pairs. Each layer takes the first pair
    whose products are its shape."""
    if isinstance(modes, str):
        return [parse_modes(part) for part in modes.split(";") if part.strip()]
    if modes and isinstance(modes[0][0], int):
        return [tuple(map(tuple, modes))]
    return [tuple(map(tuple, pair)) for pair in modes]


def parse_modes(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Parse `--modes 8x8x6,4x8x12` (in-modes, out-modes)."""
    try:
        left, right = text.split(",")
        ins = tuple(int(v) for v in left.lower().split("x"))
        outs = tuple(int(v) for v in right.lower().split("x"))
    except ValueError:
        raise TnonnxError(f"--modes '{text}': expected IN,OUT such as 8x8x6,4x8x12") from None
    if len(ins) != len(outs) or min(ins + outs) < 1:
        raise TnonnxError(f"--modes '{text}': in and out need the same number of positive modes")
    return ins, outs
