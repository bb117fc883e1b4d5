"""Progress on stderr (the CLI asks for it only on a terminal, and not with --quiet): per
stage of a rewrite (Stages: capture, allocate, fit, refine, finetune, deploy, validate) with
an estimate of the time left and the bytes of weights read from data files, and per tensor
while saving, with the bytes written. Every stage's wall time goes into the report, shown or not."""

from __future__ import annotations

import contextlib
import time

from . import external


def size(n: int) -> str:
    """A byte count for people: 512 B, 3.1 MB, 2.4 GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


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


# ------------------------------------------------------------------ the rewrite's stages

STAGES = ("capture", "allocate", "fit", "refine", "finetune", "deploy", "validate")


def time_left(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left at the rate so far: elapsed * (total - done) / done; None before any
    work is done (no rate yet), 0 once all of it is."""
    if done >= total:
        return 0.0
    if done <= 0:
        return None
    return elapsed * (total - done) / done


def duration(seconds: float | None) -> str:
    """A duration for people: 0:07, 12:05, 1:02:05 (None: "?")."""
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def stage_times(seconds: dict) -> str:
    """"time by stage: capture 1.20 s, fit 3.40 s, ..." in the order they first ran."""
    return "time by stage: " + ", ".join(f"{name} {t:.2f} s" for name, t in seconds.items())


class Stage:
    """One stage's progress: `total` units of work (what a unit is: `unit`), `done` so far,
    timed on the owner's clock."""

    def __init__(self, name: str, total: float, unit: str, clock, display=None):
        self.name, self.total, self.unit, self.clock, self.display = name, float(total), unit, clock, display
        self.done = 0.0
        self.started = clock()
        self.ended: float | None = None

    def advance(self, amount: float = 1.0) -> None:
        self.done = min(self.done + amount, self.total)
        if self.display is not None:
            self.display.update(self)

    @property
    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else self.clock()) - self.started

    @property
    def left(self) -> float | None:
        return time_left(self.elapsed, self.done, self.total)

    def describe(self) -> str:
        """"fit: 3/12 layers, 0:12, about 0:36 left" (units shown as whole numbers done)."""
        count = f"{int(self.done)}/{int(self.total)} {self.unit}".rstrip() if self.unit else ""
        head = f"{self.name}: {count}, " if count else f"{self.name}: "
        if self.ended is not None:
            return f"{head}{duration(self.elapsed)}"
        return f"{head}{duration(self.elapsed)}, about {duration(self.left)} left"


class Stages:
    """The rewrite's stages (STAGES) as they run: each one's wall time for the report
    (`seconds`, summed when a stage runs again) and, with a display, its progress with an
    estimate of the time left. `clock` and `display` are injectable (tests give fixed
    times and record what would be shown); `show=True` draws on stderr with rich."""

    def __init__(self, show: bool = False, clock=time.perf_counter, display=None):
        self.clock = clock
        self.display = display if display is not None else (_RichStages() if show else None)
        self.seconds: dict[str, float] = {}

    @classmethod
    def of(cls, progress) -> "Stages":
        """`progress` as the API takes it: a Stages, or whether to draw on stderr."""
        return progress if isinstance(progress, Stages) else cls(show=bool(progress))

    @property
    def shown(self) -> bool:
        return self.display is not None

    @contextlib.contextmanager
    def stage(self, name: str, total: float = 1, unit: str = ""):
        """A Stage for the block; its time is recorded when the block ends, raising or not."""
        stage = Stage(name, total, unit, self.clock, self.display)
        if self.display is not None:
            self.display.start(stage)
        try:
            yield stage
        finally:
            stage.ended = self.clock()
            self.seconds[name] = self.seconds.get(name, 0.0) + stage.elapsed
            if self.display is not None:
                self.display.end(stage)



class _RichStages:
    """Each stage as a line on stderr while it runs: bar, share done, elapsed, time left
    (its own clock's estimate), and the weight bytes read from data files so far."""

    def __init__(self):
        self.bar = self.task = None

    def start(self, stage: Stage) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn
        from rich.text import Text

        read = external.traffic.read

        class Info(ProgressColumn):  # rendered on every refresh: the elapsed time moves between advances
            def render(self, task):
                got = external.traffic.read - read
                return Text(stage.describe().split(": ", 1)[1] + (f", read {size(got)}" if got else ""))

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), Info(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(stage.name, total=max(stage.total, 1e-9))

    def update(self, stage: Stage) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=stage.done)

    def end(self, stage: Stage) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar = self.task = None
