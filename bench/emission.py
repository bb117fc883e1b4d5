"""Latency of one factorised dense layer in each emission against the dense MatMul it
replaces, in ONNX Runtime (CPU):

- matmul          rows first: Transpose -> Reshape -> MatMul per core (emit.emit_chain)
- features-first  rows trailing, cores from the left (emit_layout.emit_chain_features_first)
- custom          the fused ai.tnonnx::ContractionChain op, only if its library is built
                  (`tnonnx build-ops`); not built here

    .venv/bin/python bench/emission.py                  # every layer below, 2 threads
    .venv/bin/python bench/emission.py --threads 1 --quick --only tt
    .venv/bin/python bench/emission.py --only "384x1536 order 2" --modes 16x24,24x64   # other modes

The models of one layer are timed by tnonnx.latency.OrtTimer, the planner's own timer
(interleaved rounds, sessions that do not spin, each emission's median ratio to dense in
the same round, times dense's median); the table gives ms per `InferenceSession.run`, the
speed-up over dense, the MAC ratio (dense MACs / chain MACs) and the fraction of the
MAC-ratio speed-up reached (speed-up / MAC ratio). Outputs are checked against the
rows-first chain before timing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from tnonnx.emit import Builder, emit_chain  # noqa: E402
from tnonnx.emit_layout import emit_chain_features_first  # noqa: E402
from tnonnx import runtime  # noqa: E402
from tnonnx.formats import FORMATS, RankSpec  # noqa: E402
from tnonnx.latency import OrtTimer  # noqa: E402
from tnonnx.tensorize import format_modes, parse_modes  # noqa: E402

# (format, N, M, rank, order or None for the default, input shape)
ROWS_128, ROWS_4096 = (1, 128), (32, 128)
LAYERS = [
    *[("tt", 384, 1536, r, None, rows) for rows in (ROWS_128, ROWS_4096) for r in (2, 4, 8)],
    *[("tt", 384, 1536, 4, d, rows) for rows in (ROWS_128, ROWS_4096) for d in (2, 3)],
    *[("tt", n, m, r, 2, ROWS_128) for n, m in ((384, 1536), (1536, 384)) for r in (6, 8)],
    *[("tt", 1536, 384, r, None, rows) for rows in (ROWS_128, ROWS_4096) for r in (2, 4, 8)],
    *[("tt", 384, 384, r, None, rows) for rows in (ROWS_128, ROWS_4096) for r in (2, 4)],
    ("tt", 4096, 4096, 8, None, (1,)),
    ("tt", 4096, 4096, 8, None, (256,)),
    ("svd", 384, 1536, 64, None, ROWS_128),
]


def model_of(emit, in_shape, n, m):
    b = Builder("layer", np.float32, np.float32)
    emit(b, "x")
    b.rename_output("y")
    graph = helper.make_graph(b.nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.tnonnx", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def custom_library() -> Path | None:
    try:
        from tnonnx import custom_ops

        return custom_ops.library_path()
    except Exception:  # noqa: BLE001 - the custom column is optional
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 rounds")
    ap.add_argument("--only", default="", help="run layers whose label contains this text")
    ap.add_argument("--modes", default=None, help="IN,OUT (as tnonnx rewrite --modes) for the layers whose shape "
                    "they fit; the others are skipped")
    args = ap.parse_args()
    modes = parse_modes(args.modes) if args.modes else None
    rounds = 5 if args.quick else args.rounds
    library = custom_library()
    names = ["dense", "matmul", "features-first"] + (["custom"] if library else [])
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"medians of {rounds} interleaved rounds; custom op: {library or 'not built (tnonnx build-ops)'}\n")
    head = "| layer | format | rank | rows | MAC ratio | " + " | ".join(f"{n} ms" for n in names)
    head += " | " + " | ".join(f"{n} speed-up (of MAC ratio)" for n in names[1:]) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rng = np.random.default_rng(0)
    for fmt, n, m, rank, order, rows in LAYERS:
        label = f"{n}x{m}" + (f" order {order}" if order else "")
        if args.only and args.only not in f"{fmt} {label}":
            continue
        if modes is not None and (np.prod(modes[0]) != n or np.prod(modes[1]) != m or fmt != "tt"):
            continue
        weight = rng.standard_normal((n, m)).astype(np.float32) / np.sqrt(n)
        fact = FORMATS[fmt].fit_dense(weight.astype(np.float64), RankSpec(rank=rank), order=order, modes=modes)
        shape, br = list(rows) + [n], len(rows)
        emitters = [lambda b, x: b.op("MatMul", [x, b.weight(weight, "w")], "matmul"),
                    lambda b, x: emit_chain(b, x, fact.chain, fact.cores, br),
                    lambda b, x: emit_chain_features_first(b, x, fact.chain, fact.cores, br)]
        if library:
            emitters.append(lambda b, x: fact.emit_custom(b, x, br))
        models = [model_of(e, shape, n, m) for e in emitters]
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        outs = [runtime.session(mo, threads=args.threads).run(None, feeds)[0] for mo in models]
        for out in outs[2:]:
            np.testing.assert_allclose(out, outs[1], rtol=1e-3, atol=1e-4)
        t = OrtTimer(min_rounds=rounds, max_rounds=rounds)(models, feeds, args.threads)  # ms, interleaved
        ratio = n * m / fact.chain.macs_per_row()
        cells = [f"{v:.3f}" for v in t] + [f"{t[0] / v:.2f}x ({t[0] / v / ratio:.2f})" for v in t[1:]]
        if modes is not None:
            label += " modes " + format_modes(modes)
        print(f"| {label} | {fmt} | {'-'.join(map(str, fact.ranks))} | {np.prod(rows)} | {ratio:.2f} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
