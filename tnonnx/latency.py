"""Latency at the deployment shape: one-layer models timed in onnxruntime, interleaved with
the dense layer, medians, cached on disk; a cost model that predicts (and prunes) first.

Everything that times goes through a Timer, so that tests drive the planner with fixed
timings: `OrtTimer` measures, `CostModelTimer` predicts from MACs, bytes moved and nodes,
and any callable `model -> ms` can stand in (`CallableTimer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from . import calibrate, macs, runtime
from .macs_ops import _attr

# ------------------------------------------------------------------ deployment


@dataclass(frozen=True)
class Deployment:
    """Where the model will run: batch size, concrete input shapes (`--shape`), and
    onnxruntime's intra-op threads (None: onnxruntime's own default, all cores)."""

    batch: int = 1
    shapes: tuple = ()  # ((input name, dims), ...): hashable form of --shape
    threads: int | None = None

    @classmethod
    def of(cls, batch: int = 1, shapes=None, threads: int | None = None) -> "Deployment":
        return cls(batch, tuple(sorted((k, tuple(v)) for k, v in (shapes or {}).items())), threads)

    @property
    def shape_map(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.shapes}

    @property
    def given_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """--shape as the calibration and validation functions take it (None: not given)."""
        return self.shape_map or None

    def describe(self, model: onnx.ModelProto) -> str:
        concrete = calibrate.concrete_shapes(model, self.batch, self.shape_map)
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in concrete.items())
        threads = f"{self.threads} thread(s)" if self.threads else f"onnxruntime's default threads ({os.cpu_count()} cores)"
        return f"{shapes}; {threads}"


# ------------------------------------------------------------------ timers


class CostModelTimer:
    """Predicted milliseconds from a model's MACs, the bytes its nodes write (Transposes
    dearer: onnxruntime runs them on one thread), the weight bytes it reads, and a fixed
    cost per node; nodes onnxruntime constant-folds at load cost nothing. Deterministic;
    used to prune candidates before timing and, with --no-timing, instead of timing.
    Constants fitted loosely to onnxruntime 1.2x-1.3x on the 2-core machines of
    docs/RESULTS.md (per thread)."""

    MACS_PER_MS = 1.6e7  # per thread
    BYTES_PER_MS = 8e6  # activations written by ordinary nodes
    TRANSPOSE_BYTES_PER_MS = 1.5e6
    WEIGHT_BYTES_PER_MS = 1e7
    NODE_MS = 0.002  # per node: kernel dispatch and allocation

    def __call__(self, models: list[onnx.ModelProto], feeds: dict, threads: int | None) -> list[float]:
        return [self.predict(m, feeds, threads) for m in models]

    def predict(self, model: onnx.ModelProto, feeds: dict, threads: int | None) -> float:
        shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
        cost = macs.count(model, shapes)
        threads = threads or os.cpu_count() or 1
        inferred = _inferred(model, shapes)
        sizes = {vi.name: _elements(vi) for vi in (*inferred.graph.value_info, *inferred.graph.output,
                                                    *inferred.graph.input)}
        moved = transposed = 0
        folded = macs.folded_outputs(model.graph)  # an in-graph decode of a weight (adtn) runs once, at load
        nodes = [n for n in model.graph.node if not (n.output and all(o in folded for o in n.output if o))]
        for node in nodes:
            out = sizes.get(node.output[0]) or 0
            if node.op_type == "Transpose":
                transposed += out * 4
            elif node.op_type not in ("Reshape", "Shape", "Slice", "Concat", "Squeeze", "Unsqueeze", "Identity"):
                moved += out * 4
        users: dict[str, list] = {}
        for n in model.graph.node:
            for x in set(n.input):
                users.setdefault(x, []).append(n)
        weights = sum(_read(t, users.get(t.name, []), sizes) * 4 for t in model.graph.initializer)
        read = {x for n in nodes for x in n.input}  # a folded weight is read at run time like an initializer
        weights += sum((sizes.get(x) or 0) * 4 for x in folded & read)
        return (cost.total / (self.MACS_PER_MS * threads) + moved / self.BYTES_PER_MS
                + transposed / self.TRANSPOSE_BYTES_PER_MS + weights / self.WEIGHT_BYTES_PER_MS
                + len(nodes) * self.NODE_MS)


class CallableTimer:
    """A timer from any function `(model, feeds) -> ms` (tests: fixed timings)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0  # models timed

    def __call__(self, models, feeds, threads):
        self.calls += len(models)
        return [float(self.fn(m, feeds)) for m in models]


@dataclass
class OrtTimer:
    """Interleaved onnxruntime timing. Every model is warmed up; then in each round every
    model in turn runs once untimed (its thread pool wakes, its buffers come back into
    cache; left out when a run takes switch_ms or more) and `inner` times timed, the same
    `inner` for all models so that none is favoured by amortising the switch. The first
    model is the reference (the dense layer, the original model): it gets its median run
    time, in ms, and every other model the median over rounds of its ratio to the reference
    in the same round, times that. On a shared machine the load shifts between rounds;
    within a round all models see the same."""

    warmup: int = 3
    min_rounds: int = 7
    max_rounds: int = 25
    round_ms: float = 2.0  # timed runs per model and round: about this long for the fastest model
    budget_s: float = 1.5  # stop adding rounds (beyond min_rounds) after this long
    warmup_s: float = 0.2  # stop warming up a model (after one run) after this long
    switch_ms: float = 20.0  # runs at least this long are timed without an untimed run before
    clock: object = time.perf_counter
    reuses_sessions = True  # takes `sessions` (a runtime.Sessions) to open them through
    cache_name = "OrtTimer 2"  # 2: pools spin within a run (1: they never spun)

    def __call__(self, models, feeds, threads, sessions: runtime.Sessions | None = None):
        # every session has its own intra-op thread pool. Its threads spin between the nodes
        # of a run, as deployed: a pool that sleeps between nodes costs each node a wake-up
        # (about 10 us at 2 threads here), which doubled a stage of factorised convs. They
        # stop spinning when the run returns: spinning on, they would steal the cores from
        # the next model's run. Each run then pays one wake-up, dense and factorised alike
        sessions = [session_for(m, threads, sessions, "timing model") for m in models]
        single = []
        for sess in sessions:
            started = self.clock()
            for _ in range(self.warmup):  # a slow model (a whole one at a large batch) warms in one run
                sess.run(None, feeds)
                if self.clock() - started > self.warmup_s:
                    break
            single.append(self._run(sess, feeds))
        inner = max(1, min(20, int(self.round_ms / max(min(single), 1e-3))))
        # the untimed switch run matters where a run is short enough for a cold thread pool
        # and cache to show; at hundreds of ms it would only double the timing's cost
        switch = min(single) < self.switch_ms
        rounds = []  # per round, each model's median run time
        start = self.clock()
        for round_ in range(self.max_rounds):
            row = []
            for sess in sessions:
                if switch:
                    sess.run(None, feeds)  # untimed: the switch from the previous model
                row.append(float(np.median([self._run(sess, feeds) for _ in range(inner)])))
            rounds.append(row)
            if round_ + 1 >= self.min_rounds and self.clock() - start > self.budget_s:
                break
        times = np.asarray(rounds)
        reference = float(np.median(times[:, 0]))
        ratios = np.median(times / np.maximum(times[:, :1], 1e-9), axis=0)
        return [reference] + [reference * float(r) for r in ratios[1:]]

    def _run(self, sess, feeds) -> float:
        t0 = self.clock()
        sess.run(None, feeds)
        return (self.clock() - t0) * 1e3


DEFAULT_TIMER = OrtTimer()


def timer_name(timer) -> str:
    """The timer's part of a cache key: a timer whose method changes names its version
    (`cache_name`), so that the cache never mixes timings taken the old way with new ones."""
    return getattr(timer, "cache_name", type(timer).__name__)


def session_for(model: onnx.ModelProto, threads: int | None, sessions: runtime.Sessions | None = None,
                what: str = "model"):
    """The session whole models are timed on (threads as deployed, pools that stop spinning
    when a run returns): from `sessions` when given, so that the validation after the timing
    runs on it too."""
    if sessions is None:
        return runtime.session(model, threads=threads, spin_after_run=False, what=what)
    return sessions.get(model, threads=threads, spin_after_run=False, what=what)


def default_timer():
    """The timer the pipeline uses unless one is passed (tests replace DEFAULT_TIMER)."""
    return DEFAULT_TIMER


# ------------------------------------------------------------------ cache


def cache_dir() -> Path:
    """$TNONNX_CACHE_DIR, else $XDG_CACHE_HOME/tnonnx, else ~/.cache/tnonnx."""
    if os.environ.get("TNONNX_CACHE_DIR"):
        return Path(os.environ["TNONNX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tnonnx"


def machine_key() -> str:
    """What timings depend on besides the model: onnxruntime's version and the CPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"onnxruntime {ort.__version__}; {cpu}; {os.cpu_count()} cpus"


# timings kept in the cache file: the most recently used (an entry is under 100 bytes of JSON)
MAX_CACHE_ENTRIES = 50_000


class TimingCache:
    """Milliseconds by key, in one JSON file (timings.json in cache_dir()), written
    atomically; when not `enabled`, only kept for the run. Keys hash the model's structure
    without weight values (ops, attributes, tensor shapes: so op, shapes, format, ranks and
    emission), the feed shapes, the threads and machine_key(); whole models timed together
    are keyed as their group (group_keys). The file keeps the MAX_CACHE_ENTRIES most
    recently used."""

    def __init__(self, path: Path | None = None, enabled: bool = True):
        self.path = Path(path) if path is not None else cache_dir() / "timings.json"
        self.enabled = enabled
        self.entries: dict[str, float] = {}
        self.hits = self.misses = 0
        if enabled and self.path.exists():
            try:
                self.entries = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self.entries = {}  # a damaged cache is re-measured, not an error
        self.stored = set(self.entries)  # the keys read from the file (taken by earlier runs)

    def key(self, model: onnx.ModelProto, feeds: dict, threads: int | None, timer_name: str) -> str:
        return structure_key(model, feeds, threads, machine_key(), timer_name).hex()

    def group_keys(self, models: list[onnx.ModelProto], feeds: dict, threads: int | None,
                   timer_name: str) -> list[str]:
        """One key per model of a group timed together, each naming the whole group."""
        group = hashlib.sha256(b"".join(structure_key(m, feeds, threads, machine_key(), timer_name)
                                        for m in models)).hexdigest()
        return [f"{group}:{i}" for i in range(len(models))]

    def get(self, key: str) -> float | None:
        value = self.entries.get(key)  # disabled: still reused within the run, never read or written
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
            self.entries[key] = self.entries.pop(key)  # the newest used are kept (save)
        return value

    def get_group(self, keys: list[str]) -> list[float] | None:
        """The times of a group (group_keys) when all are known, else None."""
        if not all(k in self.entries for k in keys):
            self.misses += len(keys)
            return None
        return [self.get(k) for k in keys]

    def put(self, key: str, ms: float) -> None:
        self.entries[key] = ms

    def save(self) -> None:
        if not self.enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".timings-")
            with os.fdopen(fd, "w") as f:
                json.dump(dict(list(self.entries.items())[-MAX_CACHE_ENTRIES:]), f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # an unwritable cache costs time next run, nothing else


def structure_key(model: onnx.ModelProto, feeds: dict, *context) -> bytes:
    """A digest of the model's structure, the feeds' shapes and dtypes, and `context`."""
    h = hashlib.sha256(structure(model))
    h.update(json.dumps([sorted((k, list(np.shape(v)), str(np.asarray(v).dtype)) for k, v in feeds.items()),
                         *context]).encode())
    return h.digest()


def structure(model: onnx.ModelProto) -> bytes:
    """The model without weight values: what a timing depends on. Built from the graph's
    parts, not from a copy of the model, so a whole model's weights are never copied."""
    graph = onnx.GraphProto(name=model.graph.name)
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, part).extend(getattr(model.graph, part))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT64:  # shapes: they change the computation
            graph.initializer.append(t)
        else:
            graph.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type)
    m = onnx.ModelProto(ir_version=model.ir_version, graph=graph)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    return m.SerializeToString(deterministic=True)


# ------------------------------------------------------------------ measuring


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot, all cores (Linux /proc/stat:
    user, nice, system, irq, softirq, steal); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process has used (all its threads)."""
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """How busy the rest of the machine was while tnonnx timed: CPU time used by everything
    but this process over the timing windows, in cores (0.0: idle; 1.0: one core's worth of
    other work). A figure to read timings by, not a correction. None where the machine's busy
    time cannot be read."""

    def __init__(self):
        self.other = 0.0  # CPU seconds
        self.wall = 0.0
        self.known = True

    @staticmethod
    def sample() -> tuple[float | None, float]:
        return machine_busy_seconds(), own_cpu_seconds()

    def add(self, start: tuple[float | None, float], end: tuple[float | None, float], wall: float) -> None:
        if start[0] is None or end[0] is None:
            self.known = False
            return
        self.other += max(0.0, (end[0] - start[0]) - (end[1] - start[1]))
        self.wall += wall

    @property
    def cores(self) -> float | None:
        if not self.known or self.wall <= 0:
            return None
        return self.other / self.wall

    @contextmanager
    def window(self):
        """Counts what the rest of the machine does while the block runs."""
        start, started = self.sample(), time.perf_counter()
        yield
        self.add(start, self.sample(), time.perf_counter() - started)


class Clock:
    """Times lists of models through a timer and a cache; counts what was measured."""

    def __init__(self, timer=None, cache: TimingCache | None = None, threads: int | None = None):
        self.timer = timer if timer is not None else default_timer()
        self.cache = cache if cache is not None else TimingCache(enabled=False)
        self.threads = threads
        self.sessions = runtime.Sessions()  # whole models' sessions, kept for the validation
        self.seconds = 0.0  # spent timing
        self.timed = 0
        self.last_cached = False  # whether the last whole-model times came from the cache file
        self.other_load = OtherLoad()  # the rest of the machine's CPU use while timing

    @property
    def measures(self) -> bool:
        return not isinstance(self.timer, CostModelTimer)

    def time(self, models: list[onnx.ModelProto], feeds: dict, *, cache: bool = True,
             keep: bool = False) -> list[float]:
        """ms per model: cached ones looked up, the rest timed together (interleaved); with
        `keep`, their sessions stay open in `self.sessions` (when the timer opens any)."""
        name = timer_name(self.timer)
        keys = [self.cache.key(m, feeds, self.threads, name) if cache else None for m in models]
        out = [self.cache.get(k) if k else None for k in keys]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            started = time.perf_counter()
            extra = {"sessions": self.sessions} if keep and getattr(self.timer, "reuses_sessions", False) else {}
            with self.other_load.window() if self.measures else nullcontext():
                measured = self.timer([models[i] for i in todo], feeds, self.threads, **extra)
            self.seconds += time.perf_counter() - started
            self.timed += len(todo)
            for i, ms in zip(todo, measured):
                out[i] = ms
                if keys[i]:
                    self.cache.put(keys[i], ms)
        return out


    def models(self, models: list[onnx.ModelProto], feeds: dict | None, *, keep: bool = False) -> list[float | None]:
        """Whole models, timed against each other and cached as a group: a second rewrite
        that ends at the same plan re-times nothing, and a group's times always come from one
        interleaved run (the cache never pairs a ratio measured in one run with a time from
        another). None each when they cannot be timed (no feeds, or onnxruntime fails on
        them), so that a model timing cannot run stops nothing else. `keep`: their sessions
        stay open for later runs (see `session`)."""
        if feeds is None:
            return [None] * len(models)
        name = timer_name(self.timer)
        group = self.cache.group_keys(models, feeds, self.threads, name)
        self.last_cached = all(k in self.cache.stored for k in group)
        cached = self.cache.get_group(group)
        if cached is not None:
            return cached
        try:
            out = self.time(models, feeds, cache=False, keep=keep)
        except Exception:  # noqa: BLE001 - reported as "not measured"
            return [None] * len(models)
        for k, ms in zip(group, out):
            self.cache.put(k, ms)
        return out

    def session(self, model: onnx.ModelProto, what: str = "model"):
        """A session of `model` as the whole-model timing runs it: the one kept by a
        `models(..., keep=True)` call when there was one, else opened and kept now."""
        return session_for(model, self.threads, self.sessions, what)


def deployment_feeds(model: onnx.ModelProto, deployment: Deployment) -> dict | None:
    """Random feeds at the deployment shape, or None when none can be made."""
    try:
        return calibrate.random_feeds(model, deployment.batch, deployment.shape_map, seed=0)
    except Exception:  # noqa: BLE001
        return None


_PREDICTED: dict[bytes, float] = {}
_PREDICTED_KEPT = 4096


def predict(model: onnx.ModelProto, feeds: dict, threads: int | None) -> float:
    """CostModelTimer's prediction, remembered by structure (the cost model reads no weight
    values): a transformer's layers repeat a few shapes, each predicted once (shape inference
    and MAC counting cost milliseconds per model, and the planner asks thousands of times)."""
    key = structure_key(model, feeds, threads)
    if key not in _PREDICTED:
        if len(_PREDICTED) >= _PREDICTED_KEPT:
            _PREDICTED.pop(next(iter(_PREDICTED)))
        _PREDICTED[key] = CostModelTimer().predict(model, feeds, threads)
    return _PREDICTED[key]


# ------------------------------------------------------------------ one-layer models


def _inferred(model, shapes):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[vi.name]:
                dims.add().dim_value = int(d)
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001
        return m


def _read(weight, users, sizes) -> int:
    """Elements of an initializer a run reads (`users`: the nodes reading it): all of them,
    but only the gathered rows of a table that Gathers alone read (an embedding reads a few
    rows of a large table)."""
    total = int(np.prod(weight.dims))
    if not users or len(weight.dims) < 2 or any(n.op_type != "Gather" or n.input[0] != weight.name
                                                or _attr(n, "axis", 0) != 0 for n in users):
        return total
    rows = sum(sizes.get(n.input[1]) or weight.dims[0] for n in users)
    return min(total, rows * total // weight.dims[0])


def _elements(vi) -> int | None:
    dims = vi.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") for d in dims):
        return None
    return int(np.prod([d.dim_value for d in dims]))
