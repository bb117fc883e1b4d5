"""Latency of the fused custom op (ai.tnonnx::ContractionChain, `--emit custom`) against
the same chain in standard ops (`--emit matmul`: Transpose/Reshape/MatMul) and the dense
layer it replaces, one layer at a time, in ONNX Runtime.

    .venv/bin/python bench/custom_ops.py             # the full grid (a few minutes)
    .venv/bin/python bench/custom_ops.py --quick     # fewer repeats, for a smoke run

Layers: tensor trains (TT) of 1024x1024 and 4096x4096 weights at ranks 8 and 16 and of
MiniLM's feed-forward shapes (384x1536 at ranks 2, 4 and 8, 1536x384 at rank 8); nonlinear trains (NTT: tanh
or gelu after every core but the last). Batch 1 and 32, one and two intra-op threads.
Each configuration times the three sessions in interleaved rounds (so a busy machine
slows all three alike) after a warm-up and reports medians, in ms, of
`InferenceSession.run` as Python calls it (its fixed overhead included). Before timing,
the custom op's output is checked against the standard-op chain's.

Prints a Markdown table and writes it, with the command line, to docs/bench_custom_ops.md
(--out to change). Builds the custom-op library first if needed (`tnonnx build-ops`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from tnonnx import custom_ops, runtime  # noqa: E402
from tnonnx.emit import Builder, Chain, emit_chain  # noqa: E402
from tnonnx.formats import tt  # noqa: E402
from tnonnx.formats.base import RankSpec  # noqa: E402

# (label, N, M, rank, activation)
LAYERS = [
    ("1024x1024", 1024, 1024, 8, None),
    ("1024x1024", 1024, 1024, 16, None),
    ("4096x4096", 4096, 4096, 8, None),
    ("4096x4096", 4096, 4096, 16, None),
    ("384x1536 (MiniLM FFN in)", 384, 1536, 2, None),
    ("384x1536 (MiniLM FFN in)", 384, 1536, 4, None),
    ("384x1536 (MiniLM FFN in)", 384, 1536, 8, None),
    ("1536x384 (MiniLM FFN out)", 1536, 384, 8, None),
    ("1024x1024", 1024, 1024, 16, "tanh"),
    ("384x1536 (MiniLM FFN in)", 384, 1536, 8, "tanh"),
    ("384x1536 (MiniLM FFN in)", 384, 1536, 8, "gelu"),
]
BATCHES = (1, 32)
THREADS = (1, 2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def layer_model(n: int, m: int, build) -> onnx.ModelProto:
    """x[batch, n] -> y[batch, m] from `build(builder, x) -> output name`."""
    b = Builder("layer", np.dtype(np.float32), np.dtype(np.float32))
    build(b, "x")
    b.rename_output("y")
    graph = helper.make_graph(b.nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", m])], b.initializers)
    domains = {node.domain for node in b.nodes} - {""}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                              + [helper.make_opsetid(d, 1) for d in sorted(domains)])
    model.ir_version = 8
    return model


def models(n: int, m: int, rank: int, activation: str | None, rng: np.random.Generator) -> dict:
    """{'custom', 'standard', 'dense'} ModelProtos of one layer."""
    fact = tt.fit_dense(rng.standard_normal((n, m)) / np.sqrt(n), RankSpec(rank=rank))
    chain = Chain(fact.chain.in_labels, fact.chain.out_labels, fact.chain.sizes, fact.chain.steps, activation)
    w = (rng.standard_normal((n, m)) / np.sqrt(n)).astype(np.float32)
    return {
        "custom": layer_model(n, m, lambda b, x: custom_ops.emit_chain_custom(b, x, chain, fact.cores, 1)),
        "standard": layer_model(n, m, lambda b, x: emit_chain(b, x, chain, fact.cores, 1)),
        "dense": layer_model(n, m, lambda b, x: b.op("MatMul", [x, b.constant(w, "w")], "matmul")),
    }


def interleaved_medians(sessions: dict, feeds: dict, warmup: int, budget_s: float, min_runs: int,
                        max_runs: int) -> dict:
    """Median ms per session, timed in rounds that run every session once."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    times = {k: [] for k in sessions}
    start = time.perf_counter()
    while True:
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[key].append(time.perf_counter() - t0)
        runs = len(times["custom"])
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() - start > budget_s):
            break
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()} | {"runs": runs}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores; onnxruntime {ort.__version__}, Python {platform.python_version()}"


def load_average() -> str:
    return "%.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run; noisier figures)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_custom_ops.md"), help="Markdown file to write")
    args = parser.parse_args(argv)
    warmup, budget, min_runs, max_runs = (3, 0.3, 5, 50) if args.quick else (10, 2.0, 30, 400)

    log(f"library: {custom_ops.build(log=log)}")
    load_before = load_average()
    rng = np.random.default_rng(0)
    rows = []
    for label, n, m, rank, activation in LAYERS:
        fmt = f"NTT ({activation})" if activation else "TT"
        log(f"{label} {fmt} rank {rank}")
        protos = models(n, m, rank, activation, rng)
        for batch in BATCHES:
            x = rng.standard_normal((batch, n)).astype(np.float32)
            for threads in THREADS:
                sessions = {k: runtime.session(p, threads=threads) for k, p in protos.items()}
                got, want = (sessions[k].run(None, {"x": x})[0] for k in ("custom", "standard"))
                err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                if err > 1e-5:
                    raise SystemExit(f"{label} {fmt}: custom op differs from the standard ops ({err:.2e})")
                ms = interleaved_medians(sessions, {"x": x}, warmup, budget, min_runs, max_runs)
                rows.append((label, fmt, rank, batch, threads, ms))
                log(f"  batch {batch:2d} threads {threads}: custom {ms['custom']:.3f} ms, standard "
                    f"{ms['standard']:.3f} ms, dense {ms['dense']:.3f} ms ({ms['runs']} runs)")

    table = ["| layer | format | rank | batch | threads | custom op ms | standard ops ms | dense ms "
             "| custom vs standard | custom vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, fmt, rank, batch, threads, ms in rows:
        speedups = f"{ms['standard'] / ms['custom']:.2f}x | {ms['dense'] / ms['custom']:.2f}x"
        table.append(f"| {label} | {fmt} | {rank} | {batch} | {threads} | {ms['custom']:.3f} | {ms['standard']:.3f} "
                     f"| {ms['dense']:.3f} | {speedups} |")
    text = "\n".join(table)
    print(text)
    command = "python bench/custom_ops.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    header = [
        "# Custom op latency: fused ContractionChain vs the standard-op chain vs dense",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}.",
        "",
        f"Machine: {machine()}; load average {load_before} at the start, {load_average()} at the end.",
        "",
        "Medians of interleaved runs of `InferenceSession.run` from Python (its fixed overhead, about",
        "10 us, included), after a warm-up. \"x\" columns: how many times faster the custom op is",
        "(> 1: faster). The dense column is the unfactorised layer (for NTT rows, a linear layer of",
        "the same shape, for scale). When the load average exceeds the number of cores, other work",
        "competes for them: the two-thread figures then measure contention more than the kernels.",
        "",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(header) + text + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
