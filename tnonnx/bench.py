"""Latency measurement: warm-up, repeats, percentiles."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np
import onnx

from . import calibrate, runtime
from . import model as _model


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
    sess = runtime.session(model, threads=threads, what=what)
    feeds = dict(feeds)
    for _ in range(warmup):
        runtime.infer(sess, feeds, what=what)
    times = []
    start = time.perf_counter()
    while len(times) < max(repeats, 1) or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        runtime.infer(sess, feeds, what=what)
        times.append(time.perf_counter() - t0)
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
    """Latency of both models on the same random feeds; speedup = reference p50 / candidate p50."""
    ref = _model.load(reference, what="reference")
    cand = _model.load(candidate, what="candidate")
    runtime.check_same_inputs(ref, cand)
    feeds = calibrate.random_feeds(ref, batch, shapes, seed=0)
    kw = dict(warmup=warmup, repeats=repeats, threads=threads, min_time_s=min_time_s)
    ref_lat = latency(ref, feeds, what="reference", **kw)
    cand_lat = latency(cand, feeds, what="candidate", **kw)
    return {
        "batch": batch,
        "threads": threads,
        "shapes": {k: list(v) for k, v in calibrate.concrete_shapes(ref, batch, shapes).items()},
        "reference": ref_lat,
        "candidate": cand_lat,
        "speedup": ref_lat["p50_ms"] / cand_lat["p50_ms"] if cand_lat["p50_ms"] > 0 else float("inf"),
    }
