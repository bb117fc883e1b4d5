"""Rewrite benchmark: data-free svd/tt rewrites of the reference models, MiniLM and
synthetic single layers -- rewrite time, parameters, MACs, ONNX Runtime latency and
output agreement -- plus the issue's two targets as PASS/FAIL lines.

    .venv/bin/python bench/rewrite_bench.py                 # full run (several minutes)
    .venv/bin/python bench/rewrite_bench.py --quick         # smoke check (< 1 min)
    .venv/bin/python bench/rewrite_bench.py --out docs/bench_rewrite.json --markdown build/bench_rewrite.md

What is measured (all on CPU, ONNX Runtime CPUExecutionProvider):

* rewrite time: ``tnonnx.rewrite(path, ..., validate=False)`` end to end (load, fit,
  emit, check, MAC count) with time.perf_counter, once per batch size (``batch=1`` and
  ``batch=32``: the batch size is what the contraction order is chosen for; the JSON
  says whether the two graphs came out identical); for MiniLM tt rank 8 the API call
  and the ``tnonnx rewrite`` command as a subprocess (with its default validation, and
  with ``--no-validate``) are timed --repeat-minilm times and the median is judged.
* parameters / MACs before and after, as tnonnx's report counts them (MACs at the
  rewrite's batch size).
* latency: p50 of ``tnonnx.bench.latency`` (intra-op threads = --threads, default 2),
  repeats chosen so that each measurement runs about --budget seconds (at least 7 runs).
* agreement: cosine of the outputs of original and rewritten model on the same random
  feeds (``tnonnx.validate``); for lenet5_fashion also the top-1 accuracy on
  models/fashion_test.npz, for MiniLM also the cosine of sentence embeddings of real
  sentences.

The machine may be shared: the 1-minute load average is recorded before each model so
that noisy latencies can be recognised.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx import bench as tbench  # noqa: E402
from tnonnx import calibrate  # noqa: E402

REFERENCE = ["mlp", "lenet5", "small_resnet", "conv_zoo", "transformer_block"]
SEQ = 128  # MiniLM sequence length
MINILM_TIME_TARGET_S = 10.0
SPEEDUP_TARGET = 5.0


# ------------------------------------------------------------------------ helpers

def load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return float("nan")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_latency(model, feeds, *, threads: int, budget_s: float, min_runs: int = 7) -> dict:
    """p50 etc. of one run; repeats sized from a probe so the measurement takes ~budget_s."""
    probe = tbench.latency(model, feeds, warmup=1, repeats=1, threads=threads)
    per_run = max(probe["min_ms"] / 1e3, 1e-6)
    repeats = int(min(max(budget_s / per_run, min_runs), 5000))
    warmup = int(min(max(0.2 * budget_s / per_run, 2), 50))
    return tbench.latency(model, feeds, warmup=warmup, repeats=repeats, threads=threads)


def cosine_min(result) -> float:
    return float(min(o.cosine for o in result.outputs))


def graph_digest(model: onnx.ModelProto) -> bytes:
    return model.graph.SerializeToString(deterministic=True)


def fmt_n(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(int(v))


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def speedup(dense_ms, new_ms) -> float | None:
    if dense_ms is None or new_ms is None or new_ms <= 0:
        return None
    return dense_ms / new_ms


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def git_revision() -> dict:
    """HEAD and whether tnonnx/ differs from it (read-only git calls)."""
    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": run("rev-parse", "--short", "HEAD"),
            "tnonnx_dirty": bool(run("status", "--porcelain", "--untracked-files=no", "--", "tnonnx"))}


# ------------------------------------------------------------------------ models

def export_models(tmp: Path, names: list[str], with_minilm: bool) -> dict[str, dict]:
    """name -> {"path", "shapes" (a function of batch), "extra"}."""
    from models.export import export, export_minilm

    models = {}
    for name in names:
        path = tmp / f"{name}.onnx"
        t0 = time.perf_counter()
        export(name, path, dynamo=False)
        log(f"exported {name} ({time.perf_counter() - t0:.1f} s)")
        models[name] = {"path": path, "shapes": lambda b: None}
    fashion = ROOT / "models" / "lenet5_fashion.onnx"
    models["lenet5_fashion"] = {"path": fashion, "shapes": lambda b: None,
                                "npz": ROOT / "models" / "fashion_test.npz"}
    if with_minilm:
        path = tmp / "minilm.onnx"
        t0 = time.perf_counter()
        export_minilm(path, dynamo=False, verify=False)
        log(f"exported all-MiniLM-L6-v2 ({time.perf_counter() - t0:.1f} s)")
        models["minilm"] = {"path": path,
                            "shapes": lambda b: {"input_ids": (b, SEQ), "attention_mask": (b, SEQ)}}
    return models


def minilm_sentence_feeds():
    """Tokenised real sentences padded to SEQ tokens (a check on real data, not random ids)."""
    from models.export import MINILM_SENTENCES, load_minilm

    tokenizer, _ = load_minilm()
    sentences = MINILM_SENTENCES + [
        "Compression of language models trades accuracy for speed.",
        "The weather in the mountains changed quickly that afternoon.",
    ]
    enc = tokenizer(sentences, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def bench_model(name: str, spec: dict, configs, batches, args, extra_feeds=None) -> list[dict]:
    path = spec["path"]
    original = onnx.load(str(path))
    log(f"[{name}] load avg {load1():.2f}")
    dense_lat = {}
    feeds_by_batch = {}
    for b in batches:
        feeds_by_batch[b] = calibrate.random_feeds(original, b, spec["shapes"](b), seed=0)
        dense_lat[b] = measure_latency(original, feeds_by_batch[b], threads=args.threads, budget_s=args.budget)
        log(f"[{name}] dense batch {b}: p50 {dense_lat[b]['p50_ms']:.3f} ms ({dense_lat[b]['runs']} runs)")
    rows = []
    for fmt, rank in configs:
        row = {"model": name, "format": fmt, "rank": rank, "batches": {}, "load_avg_1min": load1()}
        digests = {}
        for b in batches:
            shapes = spec["shapes"](b)
            t0 = time.perf_counter()
            new, report = tnonnx.rewrite(str(path), format=fmt, rank=rank, batch=b, shapes=shapes, validate=False)
            wall = time.perf_counter() - t0
            digests[b] = graph_digest(new)
            lat = measure_latency(new, feeds_by_batch[b], threads=args.threads, budget_s=args.budget)
            val = tnonnx.validate(original, new, batch=b, shapes=shapes, seed=0)
            t = report.totals
            entry = {
                "rewrite_s": wall,
                "report_seconds": report.seconds,
                "layers_rewritten": len(report.rewritten),
                "layers": len(report.rows),
                "params_before": t.params_before, "params_after": t.params_after,
                "bytes_before": t.bytes_before, "bytes_after": t.bytes_after,
                "macs_before": t.macs_before, "macs_after": t.macs_after,
                "latency_dense": dense_lat[b], "latency_rewritten": lat,
                "speedup_p50": speedup(dense_lat[b]["p50_ms"], lat["p50_ms"]),
                "cosine_random": cosine_min(val),
                "validation_random": val.to_dict(),
            }
            if b == batches[0] and "npz" in spec:
                acc = tnonnx.validate(original, new, inputs=str(spec["npz"]))
                entry["accuracy_ref"], entry["accuracy_rewritten"] = acc.accuracy_ref, acc.accuracy_test
                entry["cosine_data"] = cosine_min(acc)
            if b == batches[0] and extra_feeds is not None:
                real = tnonnx.validate(original, new, inputs=extra_feeds)
                emb_ref, emb_new = real.outputs[0]._ref, real.outputs[0]._test
                cos = (emb_ref * emb_new).sum(1) / (np.linalg.norm(emb_ref, axis=1) * np.linalg.norm(emb_new, axis=1))
                entry["cosine_data"] = float(cos.min())
                entry["cosine_data_per_sentence"] = [float(c) for c in cos]
            row["batches"][b] = entry
            log(f"[{name}] {fmt} r{rank} batch {b}: rewrite {wall:.2f} s, params {fmt_n(t.params_before)}->"
                f"{fmt_n(t.params_after)}, MACs {fmt_n(t.macs_before)}->{fmt_n(t.macs_after)}, p50 "
                f"{dense_lat[b]['p50_ms']:.3f}->{lat['p50_ms']:.3f} ms, cosine {entry['cosine_random']:.4f}")
            del new
        row["same_graph_all_batches"] = len(set(digests.values())) == 1
        rows.append(row)
    return rows


# ------------------------------------------------------------------------ CLI timing

def time_cli(model_path: Path, out: Path, extra: list[str], env_extra: dict | None = None) -> dict:
    """Wall time of the `tnonnx rewrite` command (MiniLM, tt rank 8) as a subprocess."""
    exe = Path(sys.executable).parent / "tnonnx"
    cmd = [str(exe), "rewrite", str(model_path), "--format", "tt", "--rank", "8",
           "--shape", f"input_ids:1x{SEQ}", "--shape", f"attention_mask:1x{SEQ}", "-o", str(out), *extra]
    env = dict(os.environ)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    shown = ["tnonnx" if i == 0 else ("minilm.onnx" if a == str(model_path) else
                                      ("minilm.tt.onnx" if a == str(out) else a)) for i, a in enumerate(cmd)]
    last = [l for l in proc.stdout.splitlines() if "rewritten in" in l]

    def hide_paths(text: str) -> str:  # the temporary paths, as in the command shown
        return text.replace(str(out), "minilm.tt.onnx").replace(str(model_path), "minilm.onnx")

    return {"command": " ".join(shown), "env": env_extra or {}, "seconds": wall, "exit_code": proc.returncode,
            "summary": last[-1].strip() if last else None, "stderr_tail": hide_paths(proc.stderr[-1000:]),
            "stdout_tail": hide_paths(proc.stdout[-1000:]) if proc.returncode else ""}



# ------------------------------------------------------------------------ synthetic layers

def single_matmul(n: int, m: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")], f"matmul_{n}x{m}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", m])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def bench_synthetic(n: int, configs, batches, args, tmp: Path) -> list[dict]:
    """configs: (rank, emit) pairs; tt format."""
    model = single_matmul(n, n)
    path = tmp / f"matmul_{n}.onnx"
    onnx.save(model, str(path))
    log(f"[matmul {n}x{n}] load avg {load1():.2f}")
    feeds = {b: {"x": np.random.default_rng(1).standard_normal((b, n)).astype(np.float32)} for b in batches}
    dense = {b: measure_latency(model, feeds[b], threads=args.threads, budget_s=args.budget) for b in batches}
    rows = []
    for rank, emit in configs:
        row = {"layer": f"{n}x{n}", "format": "tt", "rank": rank, "emit": emit, "batches": {}}
        for b in batches:
            t0 = time.perf_counter()
            new, report = tnonnx.rewrite(str(path), format="tt", rank=rank, emit=emit, batch=b, validate=False)
            wall = time.perf_counter() - t0
            lat = measure_latency(new, feeds[b], threads=args.threads, budget_s=args.budget)
            val = tnonnx.validate(model, new, batch=b, seed=0)
            r = report.rewritten[0]
            row["batches"][b] = {
                "rewrite_s": wall, "ranks": r.ranks, "params_before": r.params_before, "params_after": r.params_after,
                "macs_before": report.totals.macs_before, "macs_after": report.totals.macs_after,
                "weight_error": r.weight_error, "cosine_random": cosine_min(val),
                "nodes": [n_.op_type for n_ in new.graph.node],
                "latency_dense": dense[b], "latency_rewritten": lat,
                "speedup_p50": speedup(dense[b]["p50_ms"], lat["p50_ms"]),
            }
            log(f"[matmul {n}] tt r{rank} {emit} batch {b}: dense {dense[b]['p50_ms']:.3f} ms, tt "
                f"{lat['p50_ms']:.3f} ms ({row['batches'][b]['speedup_p50']:.2f}x), MACs "
                f"{fmt_n(report.totals.macs_before)}->{fmt_n(report.totals.macs_after)}, rewrite {wall:.2f} s")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------ tables

def model_table(rows, batches) -> str:
    b1, bN = batches[0], batches[-1]
    head = ["model", "format", "rewrite s" + (f" (b{b1} / b{bN})" if bN != b1 else ""), "layers", "params",
            f"MACs b{b1}", f"p50 ms b{b1} dense → new", f"speed-up b{b1}"]
    if bN != b1:
        head += [f"p50 ms b{bN} dense → new", f"speed-up b{bN}"]
    head += [f"cosine (random, b{bN})", "data check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e1, eN = r["batches"][b1], r["batches"][bN]
        rw = f"{e1['rewrite_s']:.2f}" + (f" / {eN['rewrite_s']:.2f}" if bN != b1 else "")
        data = "-"
        if "accuracy_rewritten" in e1:
            data = f"top-1 {e1['accuracy_ref']:.3f} → {e1['accuracy_rewritten']:.3f}"
        elif "cosine_data" in e1:
            data = f"sentence cos ≥ {e1['cosine_data']:.3f}"
        cells = [r["model"], f"{r['format']} r{r['rank']}", rw, f"{e1['layers_rewritten']}/{e1['layers']}",
                 f"{fmt_n(e1['params_before'])} → {fmt_n(e1['params_after'])}",
                 f"{fmt_n(e1['macs_before'])} → {fmt_n(e1['macs_after'])}",
                 f"{fmt_ms(e1['latency_dense']['p50_ms'])} → {fmt_ms(e1['latency_rewritten']['p50_ms'])}",
                 fmt_x(e1["speedup_p50"])]
        if bN != b1:
            cells += [f"{fmt_ms(eN['latency_dense']['p50_ms'])} → {fmt_ms(eN['latency_rewritten']['p50_ms'])}",
                      fmt_x(eN["speedup_p50"])]
        cells += [f"{eN['cosine_random']:.4f}", data]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def synthetic_table(rows) -> str:
    head = ["layer", "tt rank", "emit", "batch", "ranks", "params", "MACs", "dense p50 ms", "tt p50 ms",
            "speed-up", "rewrite s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for b, e in r["batches"].items():
            lines.append("| " + " | ".join([
                r["layer"], str(r["rank"]), r["emit"], str(b), ",".join(map(str, e["ranks"])),
                f"{fmt_n(e['params_before'])} → {fmt_n(e['params_after'])}",
                f"{fmt_n(e['macs_before'])} → {fmt_n(e['macs_after'])}",
                fmt_ms(e["latency_dense"]["p50_ms"]), fmt_ms(e["latency_rewritten"]["p50_ms"]),
                fmt_x(e["speedup_p50"]), f"{e['rewrite_s']:.2f}"]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="a subset for a smoke check (< 1 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_rewrite.json", help="JSON results")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the Markdown tables here")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds per latency measurement (default 2, --quick 0.3)")
    ap.add_argument("--no-minilm", action="store_true", help="skip all-MiniLM-L6-v2")
    ap.add_argument("--models", default=None,
                    help="comma-separated subset of: " + ", ".join(REFERENCE + ["lenet5_fashion", "minilm"]))
    ap.add_argument("--no-synthetic", action="store_true", help="skip the single-layer benchmarks")
    ap.add_argument("--repeat-minilm", type=int, default=3,
                    help="timings of the MiniLM tt rank 8 rewrite (API and each CLI form); the median is judged")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 0.3 if args.quick else 2.0

    started = time.perf_counter()
    batches = [1] if args.quick else [1, 32]
    names = ["mlp"] if args.quick else REFERENCE
    with_minilm = not (args.quick or args.no_minilm)
    wanted = None
    if args.models:
        wanted = {m.strip() for m in args.models.split(",") if m.strip()}
        unknown = wanted - set(REFERENCE + ["lenet5_fashion", "minilm"])
        if unknown:
            ap.error(f"--models: unknown {', '.join(sorted(unknown))}")
        names = [n for n in REFERENCE if n in wanted]
        with_minilm = "minilm" in wanted and not args.no_minilm
    results = {
        "command": "bench/rewrite_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                    "numpy": np.__version__, "ort_threads": args.threads,
                    "load_avg_start": load1()},
        "batches": batches,
        "git": git_revision(),
    }
    lines_out = []

    with tempfile.TemporaryDirectory(prefix="tnonnx-bench-") as tmpdir:
        tmp = Path(tmpdir)
        models = export_models(tmp, names, with_minilm)
        configs = [("tt", 8), ("svd", 8)]
        rows = []
        for name, spec in models.items():
            if name == "minilm" or (wanted is not None and name not in wanted):
                continue
            rows += bench_model(name, spec, configs, batches, args)
        minilm_rows, cli = [], []
        if with_minilm:
            sentences = minilm_sentence_feeds()
            minilm_rows = bench_model("minilm", models["minilm"], [("tt", 8), ("svd", 8), ("tt", 4)], batches,
                                      args, extra_feeds=sentences)
            out = tmp / "minilm.tt.onnx"
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "tnonnx"), "--version"], capture_output=True)
            results["cli_startup_s"] = time.perf_counter() - t0
            # the machine may be shared: time the target command several times, judge on the median
            api_times = [minilm_rows[0]["batches"][1]["rewrite_s"]]
            for _ in range(args.repeat_minilm - 1):
                t0 = time.perf_counter()
                tnonnx.rewrite(str(models["minilm"]["path"]), format="tt", rank=8, batch=1,
                               shapes=models["minilm"]["shapes"](1), validate=False)
                api_times.append(time.perf_counter() - t0)
            results["minilm_api_seconds"] = api_times
            log(f"[minilm] API tt r8 rewrite: {', '.join(f'{t:.2f}' for t in api_times)} s")
            for extra in ([], ["--no-validate"]):
                runs = [time_cli(models["minilm"]["path"], out, extra) for _ in range(args.repeat_minilm)]
                c = dict(runs[0], seconds=float(np.median([r["seconds"] for r in runs])),
                         runs=[r["seconds"] for r in runs], exit_code=max(r["exit_code"] for r in runs))
                log(f"[minilm] CLI {' '.join(extra)}: {', '.join(f'{t:.2f}' for t in c['runs'])} s (exit {c['exit_code']})")
                if c["exit_code"] != 0:
                    log(f"[minilm] CLI failed: {[r['stderr_tail'] for r in runs if r['exit_code']]}")
                cli.append(c)
        results["models"] = rows + minilm_rows
        results["minilm_cli"] = cli

        syn = []
        if not args.no_synthetic:
            syn = bench_synthetic(4096, [(8, "matmul")], [1] if args.quick else [1, 32], args, tmp)
            syn_small_batches = [1] if args.quick else [1, 64]
            syn_small_cfg = [(4, "matmul"), (16, "matmul")] if args.quick else \
                [(4, "matmul"), (4, "einsum"), (16, "matmul"), (16, "einsum")]
            syn += bench_synthetic(1024, syn_small_cfg, syn_small_batches, args, tmp)
        results["synthetic"] = syn

    # ---- targets
    targets = []
    big = next((r["batches"][1] for r in syn if r["layer"] == "4096x4096"), None)
    if big is None:
        targets.append({"target": f"4096x4096 TT rank 8 at batch 1 >= {SPEEDUP_TARGET:g}x faster than dense",
                        "value": None, "pass": None, "detail": "not run (--no-synthetic)"})
    else:
        targets.append({"target": f"4096x4096 TT rank 8 at batch 1 >= {SPEEDUP_TARGET:g}x faster than dense",
                        "value": big["speedup_p50"], "pass": big["speedup_p50"] >= SPEEDUP_TARGET,
                        "detail": f"{big['speedup_p50']:.1f}x: dense {big['latency_dense']['p50_ms']:.3f} ms, "
                                  f"tt {big['latency_rewritten']['p50_ms']:.3f} ms"})
    if not with_minilm:
        targets.append({"target": f"MiniLM --format tt --rank 8 rewrite <= {MINILM_TIME_TARGET_S:g} s",
                        "value": None, "pass": None, "detail": "not run (--quick, --no-minilm or --models)"})
    else:
        api = results["minilm_api_seconds"]
        api_s = float(np.median(api))
        targets.append({"target": f"MiniLM --format tt --rank 8 rewrite <= {MINILM_TIME_TARGET_S:g} s (API, validate=False)",
                        "value": api_s, "pass": api_s <= MINILM_TIME_TARGET_S,
                        "detail": f"median {api_s:.2f} s of {len(api)} ({', '.join(f'{t:.2f}' for t in api)})"})
        for c in cli:
            label = "CLI" + (" --no-validate" if "--no-validate" in c["command"] else ", validating")
            targets.append({"target": f"MiniLM --format tt --rank 8 rewrite <= {MINILM_TIME_TARGET_S:g} s ({label})",
                            "value": c["seconds"], "pass": c["exit_code"] == 0 and c["seconds"] <= MINILM_TIME_TARGET_S,
                            "detail": f"median {c['seconds']:.2f} s of {len(c['runs'])} "
                                      f"({', '.join(f'{t:.2f}' for t in c['runs'])}), exit {c['exit_code']}: {c['command']}"})
    results["targets"] = targets
    results["machine"]["load_avg_end"] = load1()
    results["git_end"] = git_revision()  # tnonnx is an editable install: a change mid-run shows here
    results["total_seconds"] = time.perf_counter() - started

    # ---- print
    git = results["git"]
    if results["git_end"] != git:
        lines_out.append(f"WARNING: the checkout changed during the run ({git} -> {results['git_end']})")
    lines_out.append(f"tnonnx at {git['head']}{' (tracked files in tnonnx/ modified)' if git['tnonnx_dirty'] else ''}, "
                     f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs\n")
    lines_out.append("## Models (data-free rewrite)\n")
    lines_out.append(model_table(results["models"], batches))
    if cli:
        lines_out.append("\n## MiniLM tt rank 8 through the CLI\n")
        lines_out.append("| how | median s | runs (s) | exit |\n|---|---|---|---|")
        api = results["minilm_api_seconds"]
        lines_out.append(f"| `tnonnx.rewrite(path, format='tt', rank=8, shapes=..., validate=False)` | "
                         f"{np.median(api):.2f} | {', '.join(f'{t:.2f}' for t in api)} | - |")
        for c in cli:
            lines_out.append(f"| `{c['command']}` | {c['seconds']:.2f} | {', '.join(f'{t:.2f}' for t in c['runs'])} "
                             f"| {c['exit_code']} |")
        if "cli_startup_s" in results:
            lines_out.append(f"\n`tnonnx --version` alone: {results['cli_startup_s']:.2f} s")
    lines_out.append("\n## Single MatMul layers (tt)\n")
    lines_out.append(synthetic_table(syn))
    lines_out.append("\n## Targets\n")
    for t in targets:
        verdict = "SKIP" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        lines_out.append(f"{verdict}  {t['target']}: {t['detail']}")
    lines_out.append(f"\ntotal runtime {results['total_seconds']:.0f} s; load average {results['machine']['load_avg_start']:.2f}"
                     f" at start, {results['machine']['load_avg_end']:.2f} at end")
    text = "\n".join(lines_out)
    print(text)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
