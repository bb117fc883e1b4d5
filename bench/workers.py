"""--workers: the fitting time of models with many independent layers, 1 worker against N.

    nice .venv/bin/python bench/workers.py                         # 12 x 1024x1024 MLP and MiniLM
    nice .venv/bin/python bench/workers.py --models mlp --layers 4 --width 512   # a short run
    nice .venv/bin/python bench/workers.py --configs "--format svd --budget 2x"

For each model and rewrite configuration, `tnonnx rewrite` runs once per worker count, each
in a fresh process as a user would run it, and its --report JSON gives the stage times: the
fitting time is allocate + fit (the stages that fit layers, tnonnx/progress.py); the run's
whole wall time is beside it. Runs use --no-timing (the planner's cost model instead of
onnxruntime timings, which run in the parent process one after another) and --no-validate.
Prints a Markdown table with the CPU seconds of each run's main process (its workers are
not counted: they are not its reaped children) and the machine load before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("--format tt --rank 16 --fit aware --calib-random 64", "--format auto --budget 2x")
SHAPES = {"mlp": [], "minilm": ["--shape", "input_ids:1x128", "--shape", "attention_mask:1x128"]}


def mlp(path: Path, layers: int, width: int, seed: int = 0) -> Path:
    """`layers` MatMul + Relu layers of width x width, Gaussian weights scaled 1/sqrt(width)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}")]
        x = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def minilm(folder: Path) -> Path:
    path = folder / "minilm.onnx"
    if not path.exists():
        from models.export import export_minilm

        export_minilm(path, dynamo=False, verify=False)
    return path


def run(model: Path, config: str, workers: int, shapes: list[str], out: Path) -> dict:
    report = out / "report.json"
    command = [str(ROOT / ".venv" / "bin" / "tnonnx"), "rewrite", str(model), *shlex.split(config), *shapes,
               "--workers", str(workers), "--no-timing", "--no-validate", "--quiet", "-o", str(out / "out.onnx"),
               "--report", str(report)]
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before  # the main process only: its workers are not its reaped children
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    data = json.loads(report.read_text())
    stages = data["stages"]
    return {"workers": workers, "fit_s": stages.get("allocate", 0.0) + stages.get("fit", 0.0), "wall_s": wall,
            "cpu_s": cpu,
            "stages": stages, "params_after": data["totals"]["params_after"],
            "load": (load_before, os.getloadavg()[0]), "notes": [n for n in data["notes"] if n.startswith("workers")]}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,minilm")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--workers", default="1,2", help="worker counts to compare, the first is the baseline")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--folder", type=Path, default=ROOT / "build" / "bench_workers")
    args = ap.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cpus, "
          f"{len(os.sched_getaffinity(0))} available; load before {os.getloadavg()[0]:.1f}\n")
    print("| model | configuration | workers | fitting s (allocate + fit) | speed-up | whole run s | main process CPU s | "
          "load (before, after) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = (mlp(args.folder / f"mlp{args.layers}x{args.width}.onnx", args.layers, args.width)
                 if name == "mlp" else minilm(args.folder))
        label = f"mlp {args.layers} x {args.width}x{args.width}" if name == "mlp" else "MiniLM"
        for config in args.configs:
            base = None
            for workers in counts:
                with tempfile.TemporaryDirectory(dir=args.folder) as out:
                    r = run(model, config, workers, SHAPES[name], Path(out))
                base = base or r
                print(f"| {label} | `{config}` | {workers} | {r['fit_s']:.1f} | {base['fit_s'] / r['fit_s']:.2f}x "
                      f"| {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load'][0]:.1f}, {r['load'][1]:.1f} |", flush=True)
                if r["params_after"] != base["params_after"]:
                    print(f"  (parameters differ from the baseline: {r['params_after']} against {base['params_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
