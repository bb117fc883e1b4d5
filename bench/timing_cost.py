"""What the latency-aware planner's timing adds to a MiniLM rewrite, with a cold and then a
warm timing cache (issue target: at most 60 s cold, 5 s warm, on 2 cores).

    .venv/bin/python bench/timing_cost.py --batch 32 --speedup 1.8

Runs `tnonnx.rewrite(build/minilm.onnx, format="svd", budget=2, ops="MatMul")` (data-free, so
the fit takes seconds and the timing shows) twice against one fresh cache directory, at
`--batch` x 128 tokens and 2 onnxruntime threads, and prints per run the rewrite's wall time,
the seconds spent timing (report.latency.timing_seconds), the models timed and the cache
hits, and the whole-model latency the report carries.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="build/minilm.onnx")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--speedup", type=float, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["TNONNX_CACHE_DIR"] = tempfile.mkdtemp(prefix="tnonnx-timing-")
    import tnonnx  # after the cache directory is set

    b = args.batch
    for run in ("cold", "warm"):
        started = time.perf_counter()
        _, rep = tnonnx.rewrite(args.model, format="svd", budget=2, ops="MatMul", batch=b, speedup=args.speedup,
                                shapes={"input_ids": (b, 128), "attention_mask": (b, 128)}, threads=args.threads)
        lat, t = rep.latency, rep.totals
        print(f"{run}: rewrite {time.perf_counter() - started:.1f} s, timing {lat.timing_seconds:.1f} s, "
              f"{lat.timed} models timed, {lat.cache_hits} cache hits; {t.ms_before:.1f} -> {t.ms_after:.1f} ms "
              f"({t.ms_before / t.ms_after:.2f}x){' (whole models from the cache)' if lat.totals_cached else ''}",
              flush=True)


if __name__ == "__main__":
    main()
