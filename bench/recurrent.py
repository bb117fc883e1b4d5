"""The row-reading LSTM and GRU of models/ (Fashion-MNIST, 28 steps of 28 pixels): accuracy
before and after rewriting their recurrent layers, and the latency of the Scan form
(--recurrent scan) against the fused node at batch 1.

    .venv/bin/python bench/recurrent.py [--models lstm,gru] [--budget 3] [--finetune 0]
                                        [--repeats 300] [--threads 1] [--json OUT]

For each model:
  * latency, batch 1, onnxruntime with --threads intra-op threads: the original (fused
    LSTM/GRU node), the same weights in Scan form (tnonnx.recurrent_scan.to_scan), and the
    rewritten model; medians of --repeats runs taken in turn (interleaved);
  * rewrites of the recurrent layers only (`--include` the node's name), calibrated on
    models/fashion_calib.npz (training images), scored on the 2000 test images of
    models/fashion_test.npz:
      - fused: `--ops LSTM,GRU --format svd --budget B --fit aware` (W alone, R kept),
      - scan:  `--recurrent scan --format svd --budget B --fit aware` (W and R),
      - scan + `--finetune N` when N > 0;
    "recurrent params" counts W and R of the node (biases apart: they are never factorised).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tnonnx  # noqa: E402
from tnonnx.graph import find_layers  # noqa: E402
from tnonnx.recurrent_scan import to_scan  # noqa: E402


def session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def accuracy(model, data, threads: int = 2) -> float:
    sess = session(model, threads)
    logits = np.concatenate([sess.run(None, {"input": data["input"][i:i + 500]})[0]
                             for i in range(0, len(data["input"]), 500)])
    return float((logits.argmax(1) == data["labels"]).mean())


def latencies(models: dict, threads: int, repeats: int) -> dict:
    x = {"input": np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)}
    sessions = {k: session(m, threads) for k, m in models.items()}
    times = {k: [] for k in models}
    for _ in range(10):
        for s in sessions.values():
            s.run(None, x)
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def recurrent_params(model) -> int:
    """W and R of the recurrent nodes (find_layers gives each its own row)."""
    return sum(l.params for l in find_layers(model) if l.op_type in ("LSTM", "GRU", "RNN"))


def rewritten_params(report, names) -> int:
    return sum(r.params_after if r.format else r.params_before for r in report.rows if r.name in names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lstm,gru")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--finetune", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models", help="where <kind>_fashion.onnx are")
    args = ap.parse_args(argv)
    test = dict(np.load(ROOT / "models" / "fashion_test.npz"))
    calib = str(ROOT / "models" / "fashion_calib.npz")
    out = []
    for kind in args.models.split(","):
        original = onnx.load(args.model_dir / f"{kind}_fashion.onnx")
        node = next(n for n in original.graph.node if n.op_type in ("LSTM", "GRU", "RNN"))
        scan = onnx.ModelProto()
        scan.CopyFrom(original)
        to_scan(scan)  # the same weights, as MatMul + Scan
        before = recurrent_params(original)
        row = {"model": kind, "recurrent_params": before, "accuracy": accuracy(original, test)}
        print(f"{kind}: accuracy {row['accuracy']:.4f}, recurrent params (W+R) {before}", flush=True)
        common = dict(format="svd", budget=args.budget, fit="aware", calib=calib, include=f"^{node.name}",
                      validate=False, allow_slower=True)
        configs = {"fused (W only)": dict(ops=node.op_type), "scan (W and R)": dict(recurrent="scan")}
        if args.finetune:
            configs[f"scan (W and R) + finetune {args.finetune}"] = dict(recurrent="scan", finetune=args.finetune)
        models = {"fused": original, "scan form": scan}
        for label, extra in configs.items():
            t0 = time.perf_counter()
            new, report = tnonnx.rewrite(original, **common, **extra)
            names = {r.name for r in report.rows if r.name.startswith(node.name)}
            after = rewritten_params(report, names) + (0 if "scan" in label else before - sum(
                r.params_before for r in report.rows if r.name in names))
            acc = accuracy(new, test)
            row[label] = {"recurrent_params": after, "reduction": before / after, "accuracy": acc,
                          "drop_points": 100 * (row["accuracy"] - acc), "seconds": time.perf_counter() - t0,
                          "ranks": {r.name: r.ranks for r in report.rows if r.format}}
            models[label] = new
            print(f"  {label}: recurrent params {before} -> {after} ({before / after:.2f}x), accuracy {acc:.4f} "
                  f"({row[label]['drop_points']:+.2f} points drop), ranks {row[label]['ranks']}", flush=True)
        row["latency_ms_batch1"] = latencies(models, args.threads, args.repeats)
        print(f"  latency batch 1, {args.threads} thread(s): "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in row["latency_ms_batch1"].items()), flush=True)
        out.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
