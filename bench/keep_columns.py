"""What keeping the columns layout between features-first layers (tnonnx/absorb.py) gains on
a whole model: MiniLM's twelve FFN MatMuls in TT, features-first, rewritten twice (with
and without `keep_columns`), and both timed interleaved with the original at each shape.

    .venv/bin/python bench/keep_columns.py --original build/minilm.onnx --threads 2

Timed by tnonnx.latency.OrtTimer (interleaved rounds; each model's median ratio to the
original in the same round).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx.latency import OrtTimer  # noqa: E402

FFN = r"layer\.[0-9]/(intermediate|output)/dense/MatMul"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", default="build/minilm.onnx", help="a legacy export of all-MiniLM-L6-v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=6)
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="sentences of 128 tokens")
    ap.add_argument("--runs", type=int, default=3, help="timings per shape")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    original = onnx.load(args.original)
    options = dict(format="tt", order=args.order, rank=args.rank, emit="features-first", include=FFN,
                   timing=False, validate=False)
    kept, report = tnonnx.rewrite(original, **options)
    plain, _ = tnonnx.rewrite(original, **options, keep_columns=False)
    print(next((n for n in report.notes if "columns layout" in n), "no pair kept its columns"))
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, TT order {args.order} rank {args.rank}; "
          f"load average {os.getloadavg()[0]:.2f} at start\n")
    print("| tokens | original ms | rows between ms | columns kept ms | kept / rows |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        feeds = {"input_ids": rng.integers(1000, 20000, (batch, 128)).astype(np.int64),
                 "attention_mask": np.ones((batch, 128), np.int64)}
        a, b = (ort.InferenceSession(m.SerializeToString()).run(None, feeds)[0] for m in (plain, kept))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
        rounds = 41 if batch == 1 else 9
        for _ in range(args.runs):
            t = OrtTimer(min_rounds=rounds, max_rounds=rounds)([original, plain, kept], feeds, args.threads)
            print(f"| {batch} x 128 | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {t[2] / t[1]:.3f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
