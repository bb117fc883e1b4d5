"""Whole-model --budget against a uniform per-layer --ratio at the same reduction: the
trained LeNet-5 (Fashion-MNIST accuracy) and all-MiniLM-L6-v2 (sentence-embedding
cosine to the original on 64 sentences of gensim's lee_background.cor).

    .venv/bin/python bench/budget.py [--formats svd,tt] [--reduction 2] [--out docs/bench_budget.json]
                                     [--allow-slower]

Budgets are planned at batch 1 with tnonnx's never-slower rule unless --allow-slower; a
budget that rule makes unreachable is a row with tnonnx's message.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tnonnx  # noqa: E402
from tnonnx.errors import TnonnxError  # noqa: E402
from formats import models  # noqa: E402  (bench/formats.py: the same models and feeds)


# the layers a uniform --ratio rewrites; the budget gets the same (its default also takes
# embedding tables and recurrent weights), so that the two spread one reduction over one set
OPS = "MatMul,Gemm,Conv,ConvTranspose"


def run(path, feeds, shapes, fmt, **rule) -> dict:
    t0 = time.perf_counter()
    _, report = tnonnx.rewrite(path, format=fmt, inputs=feeds, shapes=shapes, ops=OPS, **rule)
    v = report.validation
    per_sample = None
    return {
        "format": fmt, "rule": rule, "seconds": round(time.perf_counter() - t0, 1),
        "params_before": report.totals.params_before, "params_after": report.totals.params_after,
        "reduction": report.totals.params_before / report.totals.params_after,
        "cosine": v.outputs[0].cosine, "rel_error": v.outputs[0].rel_l2,
        "accuracy": v.accuracy_test, "accuracy_ref": v.accuracy_ref, "per_sample": per_sample,
        "layers": [(r.name, r.weight_shape, r.ranks, r.params_before, r.params_after, r.weight_error, r.reason)
                   for r in report.rows],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="svd,tt")
    parser.add_argument("--reduction", type=float, default=2.0)
    parser.add_argument("--models", default="lenet5_fashion,minilm")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_budget.json"))
    parser.add_argument("--allow-slower", action="store_true", help="budgets may emit layers timed slower than dense")
    args = parser.parse_args(argv)
    results = []
    print("| model | format | rule | model params | reduction | output cosine | accuracy (original) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, feeds, shapes) in models(Path(tmp), args.models.split(",")).items():
            for fmt in args.formats.split(","):
                budget = {"budget": args.reduction} | ({"allow_slower": True} if args.allow_slower else {})
                for rule in ({"ratio": args.reduction}, budget):
                    label = f"--ratio {rule['ratio']:g}" if "ratio" in rule else f"--budget {rule['budget']:g}x"
                    try:
                        r = run(path, feeds, shapes, fmt, **rule)
                    except TnonnxError as exc:
                        results.append({"model": name, "format": fmt, "rule": rule, "refused": str(exc)})
                        print(f"| {name} | {fmt} | {label} | refused: {exc} | | | |", flush=True)
                        continue
                    r["model"] = name
                    results.append(r)
                    acc = f"{r['accuracy']:.4f} ({r['accuracy_ref']:.4f})" if r["accuracy"] is not None else "-"
                    print(f"| {name} | {fmt} | {label} | {r['params_before']} → {r['params_after']} | "
                          f"{r['reduction']:.2f}x | {r['cosine']:.4f} | {acc} |", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
