"""What keeping the features-first layout across a transformer FFN would gain: MiniLM's
pair (384 -> 1536, bias, GELU, 1536 -> 384, bias) at 1 x 128 tokens, both layers TT in the
features-first emission, timed in ONNX Runtime against the dense pair.

- dense           MatMul + bias, GELU, MatMul + bias (what the model has)
- matmul          both layers rows first (emit.emit_chain), bias and GELU between
- features-first  both layers features-first as emitted today: each ends with the
                  Transpose [M, R] -> [R, M] and the next begins with [R, N] -> [N, R]
- kept columns    the same pair through tnonnx.absorb (what `tnonnx rewrite` does): those two
                  Transposes left out, the first layer's columns [1536, R] go through the
                  bias (a column vector) and GELU to the second layer; only the pair's
                  ends change layout (the same function, checked before timing)

    .venv/bin/python bench/ffn_pair.py --threads 2 --ranks 4 8

Timed by tnonnx.latency.OrtTimer (interleaved rounds, medians of ratios to dense).
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

from bench.emission import model_of  # noqa: E402
from tnonnx import runtime  # noqa: E402
from tnonnx.absorb import absorb_layouts  # noqa: E402
from tnonnx.emit import OnnxOps, emit_chain, onnx_activation  # noqa: E402
from tnonnx.emit_layout import run_chain_features_first  # noqa: E402
from tnonnx.formats import FORMATS, RankSpec  # noqa: E402
from tnonnx.latency import OrtTimer  # noqa: E402

N, M = 384, 1536


def pair_model(kind, facts, weights, biases, shape):
    br = len(shape) - 1
    kind, absorbed = ("features-first", True) if kind == "kept columns" else (kind, False)
    (f1, f2), (w1, w2), (b1, b2) = facts, weights, biases

    def emit(b, x):
        def layer(t, w, fact):
            if kind == "dense":
                return b.op("MatMul", [t, b.weight(w, "w")], "matmul")
            if kind == "matmul":
                return emit_chain(b, t, fact.chain, fact.cores, br)
            return run_chain_features_first(OnnxOps(b, br), t, fact.chain, fact.cores)
        h = b.op("Add", [layer(x, w1, f1), b.weight(b1, "bias")], "bias")
        h = onnx_activation(b, h, "gelu")
        y = layer(h, w2, f2)
        return b.op("Add", [y, b.weight(b2, "bias")], "bias")
    model = model_of(emit, shape, N, N)
    if absorbed:  # the features-first pair through the rewrite's own pass
        if absorb_layouts(model, {n.name for n in model.graph.node}) != 1:
            raise RuntimeError("the features-first pair was not absorbed")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--rows", type=int, nargs="+", default=[128], help="tokens (1 x rows)")
    args = ap.parse_args()
    kinds = ["dense", "matmul", "features-first", "kept columns"]
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"medians of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at start\n")
    head = "| ranks | tokens | MAC ratio | " + " | ".join(f"{k} ms" for k in kinds) + " | kept / features-first |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((N, M)).astype(np.float32) / np.sqrt(N),
               rng.standard_normal((M, N)).astype(np.float32) / np.sqrt(M))
    biases = (rng.standard_normal(M).astype(np.float32) * 0.1, rng.standard_normal(N).astype(np.float32) * 0.1)
    for rank in args.ranks:
        facts = [FORMATS["tt"].fit_dense(w.astype(np.float64), RankSpec(rank=rank)) for w in weights]
        for rows in args.rows:
            shape = [1, rows, N]
            models = [pair_model(k, facts, weights, biases, shape) for k in kinds]
            feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
            outs = [runtime.session(mo, threads=args.threads).run(None, feeds)[0] for mo in models]
            for out in outs[2:]:
                np.testing.assert_allclose(out, outs[1], rtol=1e-4, atol=1e-4)
            t = OrtTimer(min_rounds=args.rounds, max_rounds=args.rounds)(models, feeds, args.threads)
            ratio = 2 * N * M / sum(f.chain.macs_per_row() for f in facts)
            ranks = "/".join("-".join(map(str, f.ranks)) for f in facts)
            print(f"| {ranks} | {rows} | {ratio:.2f} | " + " | ".join(f"{v:.3f}" for v in t)
                  + f" | {t[3] / t[2]:.3f} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
