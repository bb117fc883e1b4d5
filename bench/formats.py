"""Every format against parameter reduction: relative output error of the rewritten
model at 2x, 5x, 10x and 20x reduction of the rewritten layers (per-layer --ratio), with
ONNX Runtime latency at batch 1, on real models; plus the two source-paper claims.

    .venv/bin/python bench/formats.py                       # all models (tens of minutes)
    .venv/bin/python bench/formats.py --quick               # LeNet-5 and the MLP only
    .venv/bin/python bench/formats.py --models minilm --formats tt,ht

Writes docs/bench_formats.json, a Markdown table (--markdown) and a PNG plot of output
error against compression per format (--plot). Models: the trained Fashion-MNIST LeNet-5
(relative error of the logits and test accuracy on models/fashion_test.npz), the
reference MLP / small ResNet / transformer block (random weights: an upper bound on what
structure-free weights lose), all-MiniLM-L6-v2 (its first encoder block rewritten; sentence embeddings of 64
sentences of gensim's lee_background.cor) and the PP-OCR recogniser (random 1x3x48x320 images).
Data-free fitting throughout; `tnonnx rewrite --fit` (data-aware) is a separate benchmark.
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

import numpy as np  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx import bench as tbench  # noqa: E402
from tnonnx import calibrate  # noqa: E402
from tnonnx.formats import FORMATS  # noqa: E402

RATIOS = (2, 5, 10, 20)
SEQ = 64


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lee_sentences(n: int) -> list[str]:
    import gensim

    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    lines = [l.strip() for l in path.read_text(encoding="latin-1").splitlines() if len(l.split()) > 5]
    return lines[:n]


def models(tmp: Path, names: list[str]) -> dict:
    """name -> (path, inputs for validation, shapes)."""
    from models.export import export, export_minilm, load_minilm
    from models.ppocr import ppocr_model_path

    out = {}
    for name in names:
        if name == "lenet5_fashion":
            out[name] = (ROOT / "models" / "lenet5_fashion.onnx", str(ROOT / "models" / "fashion_test.npz"), None)
        elif name == "minilm":
            path = export_minilm(tmp / "minilm.onnx", dynamo=False, verify=False)
            tokenizer, _ = load_minilm()
            enc = tokenizer(lee_sentences(64), padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
            feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
            out[name] = (path, feeds, {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)})
        elif name == "ppocr_rec":
            path = ppocr_model_path("rec")
            rng = np.random.default_rng(0)
            out[name] = (path, {"x": rng.standard_normal((8, 3, 48, 320)).astype(np.float32)}, {"x": (1, 3, 48, 320)})
        else:
            out[name] = (export(name, tmp / f"{name}.onnx"), None, None)
    return out


# MiniLM: the first encoder block only (4 attention projections, 2 FFN matrices), so
# that the slow-to-fit formats (TR-ALS) finish; the other models are rewritten whole
INCLUDE = {"minilm": r"encoder/layer\.0/"}


def run_one(path, feeds, shapes, fmt: str, ratio: float, threads: int, include=None) -> dict:
    t0 = time.perf_counter()
    new, report = tnonnx.rewrite(path, format=fmt, ratio=ratio, inputs=feeds, shapes=shapes, include=include)
    seconds = time.perf_counter() - t0
    rows = report.rewritten
    before = sum(r.params_before for r in rows)
    after = sum(r.params_after for r in rows)
    out = report.validation.outputs[0]
    lat_feeds = calibrate.random_feeds(new, batch=1, shapes=shapes)
    latency = tbench.latency(new, lat_feeds, threads=threads, warmup=3, repeats=20)["p50_ms"]
    return {
        "format": fmt, "ratio": ratio, "rewritten": len(rows), "layers": len(report.rows),
        "reduction": before / after if after else None, "rel_error": out.rel_l2, "cosine": out.cosine,
        "accuracy": report.validation.accuracy_test, "accuracy_ref": report.validation.accuracy_ref,
        "latency_ms": latency, "seconds": seconds,
        "layer_errors": [(r.op, r.weight_shape, r.params_before, r.params_after, r.weight_error) for r in rows],
    }


def dense_latency(path, shapes, threads) -> float:
    import onnx

    m = onnx.load(str(path))
    return tbench.latency(m, calibrate.random_feeds(m, batch=1, shapes=shapes), threads=threads, warmup=3,
                          repeats=20)["p50_ms"]


def table(results: list[dict], dense: dict) -> str:
    lines = ["| model | format | target | reduction | rewritten | rel. output error | cosine | accuracy | batch-1 p50 ms (dense) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['format']} | {r['ratio']}x | - | - | n/a: {r['error']} | | | |")
            continue
        acc = f"{r['accuracy']:.3f} ({r['accuracy_ref']:.3f})" if r["accuracy"] is not None else "-"
        red = f"{r['reduction']:.1f}x" if r["reduction"] else "-"
        lines.append(f"| {r['model']} | {r['format']} | {r['ratio']}x | {red} | {r['rewritten']}/{r['layers']} | "
                     f"{r['rel_error']:.3f} | {r['cosine']:.4f} | {acc} | {r['latency_ms']:.3f} ({dense[r['model']]:.3f}) |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = sorted({r["model"] for r in results})
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for i, fmt in enumerate(FORMATS):  # one colour per format across the panels
            pts = sorted((r["reduction"], r["rel_error"]) for r in results
                         if r["model"] == name and r["format"] == fmt and "error" not in r and r["reduction"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=fmt, color=plt.cm.tab10(i % 10))
        ax.set_xscale("log")
        ax.set_xticks(RATIOS, [f"{r}x" for r in RATIOS])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(name)
        ax.set_xlabel("parameter reduction of rewritten layers")
        ax.set_ylabel("relative output error")
        ax.grid(True, alpha=0.3)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    axes.flat[0].legend(handles.values(), handles.keys(), fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def claims(results: list[dict]) -> dict:
    """Mean relative weight error per format at each target, split by dense and conv layers."""
    out: dict = {}
    for r in results:
        if "error" in r:
            continue
        for op, _, _, _, err in r["layer_errors"]:
            kind = "conv" if op == "Conv" else "dense"
            out.setdefault(kind, {}).setdefault(r["format"], {}).setdefault(r["ratio"], []).append(err)
    return {kind: {fmt: {ratio: float(np.mean(v)) for ratio, v in by.items()} for fmt, by in fmts.items()}
            for kind, fmts in out.items()}


def claims_table(summary: dict) -> str:
    """Mean relative weight error of the rewritten layers, per kind of layer and format."""
    lines = ["| layers | format | 2x | 5x | 10x | 20x |", "|---|---|---|---|---|---|"]
    for kind in ("dense", "conv"):
        for fmt, by in summary.get(kind, {}).items():
            values = [by.get(r, by.get(str(r))) for r in RATIOS]  # int keys, or str keys after JSON
            cells = [f"{v:.3f}" if v is not None else "-" for v in values]
            lines.append(f"| {kind} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_table(results: list[dict]) -> str:
    """Per model and target, the format with the lowest output error (and its error)."""
    lines = ["| model | " + " | ".join(f"{r}x" for r in RATIOS) + " |", "|---|" + "---|" * len(RATIOS)]
    for name in dict.fromkeys(r["model"] for r in results):
        cells = []
        for ratio in RATIOS:
            ok = [r for r in results if r["model"] == name and r["ratio"] == ratio and "error" not in r]
            best = min(ok, key=lambda r: r["rel_error"]) if ok else None
            cells.append(f"{best['format']} {best['rel_error']:.3f} ({best['reduction']:.0f}x)" if best else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="lenet5_fashion,mlp,small_resnet,transformer_block,minilm,ppocr_rec")
    parser.add_argument("--formats", default=",".join(f for f in FORMATS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_formats.json"))
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "formats_error_vs_compression.png"))
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="Combine the results of earlier runs (e.g. formats run in parallel) into one table and plot.")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args)
    names = ["lenet5_fashion", "mlp"] if args.quick else args.models.split(",")
    formats = args.formats.split(",")
    results, dense = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, feeds, shapes) in models(Path(tmp), names).items():
            dense[name] = dense_latency(path, shapes, args.threads)
            for fmt in formats:
                for ratio in RATIOS:
                    try:
                        r = run_one(path, feeds, shapes, fmt, ratio, args.threads, INCLUDE.get(name))
                    except Exception as exc:  # a benchmark records failures and goes on
                        kind = "" if isinstance(exc, tnonnx.TnonnxError) else f"{type(exc).__name__}: "
                        r = {"format": fmt, "ratio": ratio, "error": kind + str(exc).splitlines()[0][:80]}
                    r["model"] = name
                    results.append(r)
                    log(f"{name:18s} {fmt:7s} {ratio:3d}x " + (f"n/a {r['error']}" if "error" in r else
                        f"reduction {r['reduction'] or 0:6.1f}x err {r['rel_error']:.3f} ({r['seconds']:.1f} s)"))
                    Path(args.out).write_text(json.dumps({"results": results, "dense_latency_ms": dense}, default=str))
    text = table(results, dense)
    print(text)
    summary = claims(results)
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps({"results": results, "dense_latency_ms": dense, "claims": summary},
                                         indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    plot(results, Path(args.plot))
    return 0


def merge(args) -> int:
    results, dense = [], {}
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        results += data["results"]
        dense.update(data["dense_latency_ms"])
    # a (model, format, ratio) measured by several runs keeps the first run's result
    first: dict = {}
    for r in results:
        first.setdefault((r["model"], r["format"], r["ratio"]), r)
    results = list(first.values())
    order = {f: i for i, f in enumerate(FORMATS)}
    models_seen = list(dict.fromkeys(r["model"] for r in results))
    results.sort(key=lambda r: (models_seen.index(r["model"]), order.get(r["format"], 99), r["ratio"]))
    summary = claims(results)
    text = "\n\n".join([table(results, dense), claims_table(summary), best_table(results)])
    print(text)
    Path(args.out).write_text(json.dumps({"results": results, "dense_latency_ms": dense, "claims": summary},
                                         indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
