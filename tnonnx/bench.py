"""Latency measurement: warm-up, repeats, percentiles; two models interleaved."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx

from . import calibrate, runtime
from . import model as _model
from .latency import OtherLoad


def latency(
    model: onnx.ModelProto | str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    min_time_s: float = 0.0,
    what: str = "model",
) -> dict:
    """Wall-clock latency of one run, in ms: at least ``repeats`` runs and ``min_time_s`` seconds."""
    return interleaved([model], feeds, warmup=warmup, repeats=repeats, threads=threads, min_time_s=min_time_s,
                       what=(what,))[0]


def interleaved(models, feeds: Mapping[str, np.ndarray], *, warmup: int = 5, repeats: int = 30,
                threads: int | None = None, min_time_s: float = 0.0, spin_after_run: bool = True,
                what=("model",)) -> list[dict]:
    """Latency percentiles of several models timed in turn, run by run (each run of one model
    follows one untimed run, which absorbs the switch), so that a change in machine load
    reaches all alike; at least ``repeats`` timed runs each and ``min_time_s`` seconds."""
    names = list(what) + [f"model {i}" for i in range(len(what), len(models))]
    sessions = [runtime.session(m, threads=threads, spin_after_run=spin_after_run, what=n)
                for m, n in zip(models, names)]
    feeds = dict(feeds)
    for sess, name in zip(sessions, names):
        for _ in range(warmup):
            runtime.infer(sess, feeds, what=name)
    times = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < max(repeats, 1) or time.perf_counter() - start < min_time_s:
        for sess, name, out in zip(sessions, names, times):
            if len(sessions) > 1:
                runtime.infer(sess, feeds, what=name)
            t0 = time.perf_counter()
            runtime.infer(sess, feeds, what=name)
            out.append(time.perf_counter() - t0)
    return [_summary(t) for t in times]


def _summary(times) -> dict:
    ms = np.array(times) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "min_ms": float(ms.min()),
        "runs": len(times),
    }


def compare(
    reference: onnx.ModelProto | str | os.PathLike,
    candidate: onnx.ModelProto | str | os.PathLike,
    *,
    batch: int = 1,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    min_time_s: float = 0.0,
) -> dict:
    """Latency of both models on the same random feeds, timed interleaved; speedup = reference p50 /
    candidate p50."""
    ref = _model.load(reference, what="reference")
    cand = _model.load(candidate, what="candidate")
    runtime.check_same_inputs(ref, cand)
    feeds = calibrate.random_feeds(ref, batch, shapes, seed=0)
    # interleaved, with pools that stop spinning when a run returns (a session's spinning pool
    # would steal the cores from the other's runs), as the planner times (latency.OrtTimer)
    load = OtherLoad()
    with load.window():
        ref_lat, cand_lat = interleaved([ref, cand], feeds, warmup=warmup, repeats=repeats, threads=threads,
                                        min_time_s=min_time_s, spin_after_run=False, what=("reference", "candidate"))
    return {
        "batch": batch,
        "threads": threads,
        "shapes": {k: list(v) for k, v in calibrate.concrete_shapes(ref, batch, shapes).items()},
        "reference": ref_lat,
        "candidate": cand_lat,
        "speedup": ref_lat["p50_ms"] / cand_lat["p50_ms"] if cand_lat["p50_ms"] > 0 else float("inf"),
        "other_load": load.cores,  # cores the rest of the machine kept busy meanwhile (None: unknown)
    }


def compare_in_processes(reference: str | os.PathLike, candidate: str | os.PathLike, processes: int, *,
                         run=None, **options) -> dict:
    """compare() in `processes` new Python processes, one after another: on some machines
    two-thread speed drops for a whole process or for minutes (docs/RESULTS.md, "Two-thread
    timings depend on the process"), so one process can time both models all slow. The
    result is the median process's (by speed-up; the lower of the middle two for an even
    count), with `processes` and every process's speed-up in run order (`speedups`).
    `run(reference, candidate, options)` stands in for one process (tests)."""
    run = run or _compare_in_new_process
    results = [run(str(reference), str(candidate), options) for _ in range(processes)]
    median = sorted(results, key=lambda r: r["speedup"])[(processes - 1) // 2]
    return dict(median, processes=processes, speedups=[r["speedup"] for r in results])


def in_new_process(fn, *args):
    """fn(*args) in a new Python process, spawned: a fresh interpreter, not a fork of this one
    (whose threads and state it would share). `fn` and `args` must pickle."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _compare_in_new_process(reference: str, candidate: str, options: dict) -> dict:
    return in_new_process(_compare_paths, reference, candidate, options)


def _compare_paths(reference: str, candidate: str, options: dict) -> dict:
    return compare(reference, candidate, **options)
