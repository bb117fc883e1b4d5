"""Progress on stderr (the CLI asks for it only on a terminal): per layer while fitting,
with the bytes of weights read from data files, and per tensor while saving, with the bytes written."""

from __future__ import annotations

import contextlib

from . import external


def size(n: int) -> str:
    """A byte count for people: 512 B, 3.1 MB, 2.4 GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def layers(items, enabled: bool, description: str = "fitting layers"):
    """`items`, iterated under a bar with the weight bytes read so far when `enabled`."""
    return _layers(list(items), description) if enabled else items


def _layers(items: list, description: str):
    start = external.traffic.read
    with _bar() as bar:
        task = bar.add_task(description, total=len(items), io="")
        for item in items:
            yield item
            bar.update(task, advance=1, io=f"read {size(external.traffic.read - start)}")


@contextlib.contextmanager
def writing(what: str, total: int, enabled: bool):
    """A callback(bytes_written) for model.save, drawing a bar when `enabled`."""
    if not enabled:
        yield None
        return
    start = external.traffic.written
    with _bar() as bar:
        task = bar.add_task(f"writing {what}", total=max(total, 1), io="")

        def update(written: int) -> None:
            bar.update(task, completed=written - start, io=f"wrote {size(written - start)}")

        yield update


def _bar():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[io]}"), TimeElapsedColumn(), console=Console(stderr=True),
                    transient=True)
