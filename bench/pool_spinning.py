"""How onnxruntime's intra-op thread pool waits decides what a factorised model's timing
says: a stage of dense 3x3 convs against the same stage in Tucker-2 form (and, with
--model, any ONNX model on random inputs), each timed alone in its own session under
three pool settings:

    .venv/bin/python bench/pool_spinning.py --threads 2
    .venv/bin/python bench/pool_spinning.py --threads 2 --model build/minilm.onnx --shape input_ids:1x128 \
        --shape attention_mask:1x128

- ``sleep``: session.intra_op.allow_spinning=0, idle pool threads sleep, so every node
  that runs on the pool wakes them (tnonnx's timing before 2026-12-07).
- ``spin``: onnxruntime's default; idle threads spin, between runs too. What one model
  deployed alone and called back to back gets.
- ``spin in run``: spin, plus session.force_spinning_stop=1: the threads stop spinning
  when a run returns and the next run wakes them once. What tnonnx times with now, since
  sessions timed in turn must not steal each other's cores.

Each figure is the median of --runs runs after a warm-up; the sessions run one after
another, never two at a time. The speed-up column is the dense stage's time over the
factorised one's under the same setting.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from conv_emission import dense_stage, factorised_stage  # noqa: E402
from tnonnx import calibrate  # noqa: E402
from tnonnx.formats import FORMATS, RankSpec  # noqa: E402

SETTINGS = {
    "sleep": {"session.intra_op.allow_spinning": "0"},
    "spin": {},
    "spin in run": {"session.force_spinning_stop": "1"},
}


def median_ms(model: onnx.ModelProto, feeds: dict, threads: int, entries: dict, runs: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    for key, value in entries.items():
        opts.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for _ in range(max(5, runs // 20)):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def stage_pair(channels: int, size: int, rank: int, depth: int):
    """`depth` dense 3x3 convs (each followed by a Relu) and their Tucker-2 form at `rank`."""
    rng = np.random.default_rng(0)
    kernels = [rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) / np.sqrt(channels * 9)
               for _ in range(depth)]
    facts = [FORMATS["tucker"].fit_conv(w.astype(np.float64), RankSpec(rank=rank)) for w in kernels]
    dense, tucker = dense_stage(kernels, size), factorised_stage(facts, channels, 3, size)
    feeds = {"x": rng.standard_normal((1, channels, size, size)).astype(np.float32)}
    return dense, tucker, feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--model", help="also time this ONNX model (random inputs)")
    ap.add_argument("--shape", action="append", default=[], help="name:dims for --model's free dimensions")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; medians of {args.runs} runs, each session alone\n")
    print("| model | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for channels, size, rank in [(256, 14, 16), (128, 28, 16)]:
        dense, tucker, feeds = stage_pair(channels, size, rank, depth=4)
        times = {name: [median_ms(m, feeds, args.threads, entries, args.runs) for m in (dense, tucker)]
                 for name, entries in SETTINGS.items()}
        label = f"4 convs {channels}x{channels}x3x3 @ {size}x{size}"
        print(f"| {label}, dense | " + " | ".join(f"{t[0]:.3f} ms" for t in times.values()) + " |")
        print(f"| {label}, Tucker-2 {rank},{rank} | "
              + " | ".join(f"{t[1]:.3f} ms ({t[0] / t[1]:.1f}x)" for t in times.values()) + " |", flush=True)
    if args.model:
        model = onnx.load(args.model)
        shapes = {name: tuple(int(d) for d in dims.split("x"))
                  for name, dims in (s.split(":") for s in args.shape)}
        feeds = calibrate.random_feeds(model, 1, shapes or None, seed=0)
        runs = max(50, args.runs // 20)
        print(f"| {Path(args.model).name} | " + " | ".join(
            f"{median_ms(model, feeds, args.threads, entries, runs):.3f} ms" for entries in SETTINGS.values()) + " |")


if __name__ == "__main__":
    main()
