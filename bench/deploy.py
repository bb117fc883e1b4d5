"""--target and --quantize on real models: sizes, agreement and the quantize-alone baseline.

    .venv/bin/python bench/deploy.py lenet [--budget 5] [--int8 static dynamic] [--finetune 10]
                                                             # LeNet-5: factorised + int8 against int8 alone
    .venv/bin/python bench/deploy.py minilm [--ratio 2 | --budget 2] [--ops MatMul,Gemm,Gather] [--int8 static dynamic]
                                                             # MiniLM: --fit aware svd + int8 against int8 alone
    .venv/bin/python bench/deploy.py edge [MODEL ...]        # --target edge: .ort loads and agrees
    .venv/bin/python bench/deploy.py gpu [MODEL ...]         # --target gpu: fp16 against fp32 (CPU provider)

Each prints a Markdown table for docs/RESULTS.md. Models for edge/gpu: the reference models,
lenet5_fashion, minilm, ppocr_rec, ppocr_det, ppocr_cls (default: all).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx.calibrate import feed_batches  # noqa: E402
from tnonnx.errors import TnonnxError  # noqa: E402
from tnonnx.latency import Clock, OrtTimer, TimingCache  # noqa: E402
from tnonnx.model import load  # noqa: E402
from tnonnx.quantize import Quantization, quantize  # noqa: E402
from formats import SEQ, lee_sentences  # noqa: E402
from formats import models as formats_models  # noqa: E402

PPOCR_SHAPES = {"ppocr_rec": (1, 3, 48, 320), "ppocr_det": (1, 3, 320, 320), "ppocr_cls": (1, 3, 48, 192)}


def _kib(n) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _cos(result) -> float:
    return min(o.cosine for o in result.outputs)


def lenet(args) -> None:
    print("| budget | quantize | final size (x smaller) [without --short-names] | quantized alone (x smaller) | "
          "accuracy original / "
          "factorised fp32 / final / quantized alone | cosine final / quantized alone | ms original / factorised / "
          "final |")
    print("|---|---|---|---|---|---|---|")
    for budget, mode, int8 in ((b, m, i) for m in args.quantize for i in args.int8 for b in args.budget or [5.0]):
        _, report = tnonnx.rewrite(ROOT / "models" / "lenet5_fashion.onnx", format="svd", budget=budget,
                                   calib=str(ROOT / "models" / "fashion_calib.npz"), fit="aware",
                                   finetune=args.finetune, finetune_hidden=0,
                                   inputs=str(ROOT / "models" / "fashion_test.npz"), batch=32, threads=2,
                                   quantize=mode, int8=int8, timing_cache=False, short_names=args.short_names)
        d, s, t = report.deploy, report.deploy.sizes, report.totals
        final, base = d.comparisons["original → final"], d.comparisons["original → baseline"]
        fact = d.comparisons["original → factorised"]
        saved = next((int(c["detail"].split()[0].replace(",", "")) for c in d.target.checks
                      if c["check"] == "short names"), 0)
        long = f" [{_kib(s['final'] + saved)}, {s['original'] / (s['final'] + saved):.2f}x]" if saved else ""
        print(f"| {budget:g}x | {d.quantization.method} | {_kib(s['final'])} ({s['original'] / s['final']:.2f}x){long} | "
              f"{_kib(s['baseline'])} ({s['original'] / s['baseline']:.2f}x) | {final.accuracy_ref:.4f} / "
              f"{fact.accuracy_test:.4f} / {final.accuracy_test:.4f} / {base.accuracy_test:.4f} | "
              f"{_cos(final):.4f} / {_cos(base):.4f} | {t.ms_before:.3f} / {t.ms_factorised:.3f} / {t.ms_after:.3f} |",
              flush=True)


def minilm(args) -> None:
    """One factorisation (fp32), then each int8 mode on it and on the original alone: the
    rewrite's own quantizer (tnonnx.quantize), applied as --quantize int8 [--int8 MODE] would."""
    from models.export import export_minilm, load_minilm
    from tnonnx.validate import run

    tokenizer, _ = load_minilm()
    sentences = lee_sentences(args.calib + args.eval)

    def feeds(texts):
        enc = tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calib, held_out = feeds(sentences[:args.calib]), feeds(sentences[args.calib:])
    print("| factorisation | int8 | final size (x smaller) | quantized alone (x smaller) | mean sentence cosine: "
          "final / quantized alone / factorised fp32 | ms at 1x64, 2 threads: original / final / quantized alone |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_minilm(Path(tmp) / "minilm.onnx", dynamo=False, verify=False)
        original = load(path)
        reference = run(original, [held_out])["sentence_embedding"]

        def mean_cos(model):
            emb = run(model, [held_out])["sentence_embedding"]
            return float(np.mean(np.sum(emb * reference, 1) / np.linalg.norm(emb, axis=1)
                                 / np.linalg.norm(reference, axis=1)))

        rule = dict(budget=args.budget[0]) if args.budget else dict(ratio=args.ratio)
        t0 = time.perf_counter()
        factorised, report = tnonnx.rewrite(path, format="svd", fit="aware", calib=calib, ops=args.ops,
                                            allow_slower=True, inputs=held_out, timing=False, min_cosine=0, **rule)
        what = f"svd {'budget' if args.budget else 'ratio'} {(args.budget or [args.ratio])[0]:g}x, --ops {args.ops}, " \
               f"{report.totals.params_before / report.totals.params_after:.2f}x fewer parameters, " \
               f"{time.perf_counter() - t0:.0f} s"
        batches = feed_batches(calib, original, what="--calib")[0]
        fact_cos = mean_cos(factorised)
        clock = Clock(OrtTimer(), TimingCache(enabled=False), 2)
        one = {k: v[:1] for k, v in held_out.items()}  # one sentence of 64 tokens
        for mode in args.int8:
            q = Quantization("int8", static=mode == "static")
            final, base = quantize(factorised, q, batches)[0], quantize(original, q, batches)[0]
            ms = clock.models([original, final, base], one)
            print(f"| {what} | {q.describe()} | {_mib(final.ByteSize())} ({original.ByteSize() / final.ByteSize():.2f}x)"
                  f" | {_mib(base.ByteSize())} ({original.ByteSize() / base.ByteSize():.2f}x) | {mean_cos(final):.4f} / "
                  f"{mean_cos(base):.4f} / {fact_cos:.4f} | {' / '.join(f'{m:.2f}' for m in ms)} |", flush=True)


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def _models(names, tmp):
    out = formats_models(tmp, [n for n in names if n not in PPOCR_SHAPES])
    from models.ppocr import ppocr_model_path

    for name in names:
        if name in PPOCR_SHAPES:
            out[name] = (ppocr_model_path(name.split("_")[1]), None, {"x": PPOCR_SHAPES[name]})
    return out


ALL = ["mlp", "lenet5", "small_resnet", "conv_zoo", "transformer_block", "lenet5_fashion", "minilm", "ppocr_rec",
       "ppocr_det", "ppocr_cls"]


def targets(args, target: str) -> None:
    print("| model | layers rewritten | checks | .ort size | .ort vs .onnx | cosine to original (factorised → final)"
          " | seconds |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, inputs, shapes) in _models(args.models or ALL, Path(tmp)).items():
            t0 = time.perf_counter()
            calib = inputs if inputs is not None and not isinstance(inputs, str) else (
                str(ROOT / "models" / "fashion_calib.npz") if name == "lenet5_fashion" else 16)
            try:
                _, report = tnonnx.rewrite(path, format="svd", ratio=2, target=target, shapes=shapes, timing=False,
                                           calib=calib if target == "gpu" else None, inputs=inputs, min_cosine=0)
            except TnonnxError as exc:
                print(f"| {name} | - | refused: {exc} | - | - | - | - |", flush=True)
                continue
            d = report.deploy
            ort = next((c["detail"] for c in d.target.checks if c["check"].startswith(".ort")), "-")
            checks = "all ok" if d.target.ok else "; ".join(c["check"] for c in d.target.checks if not c["ok"])
            print(f"| {name} | {len(report.rewritten)}/{len(report.rows)} | {checks} | "
                  f"{_kib(d.sizes['ort']) if 'ort' in d.sizes else '-'} | {ort.split(';')[0]} | "
                  f"{_cos(d.comparisons['original → final']):.6f} ({_cos(d.comparisons['factorised → final']):.6f})"
                  f" | {time.perf_counter() - t0:.0f} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("lenet", "minilm", "edge", "gpu"))
    parser.add_argument("models", nargs="*")
    parser.add_argument("--budget", type=float, nargs="+", default=None,
                        help="lenet: budgets (default 5); minilm: one budget over --ops, instead of --ratio")
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--ops", default="MatMul,Gemm", help="minilm: the layers factorised (Gather: the tables)")
    parser.add_argument("--int8", nargs="+", default=["static"], choices=("static", "dynamic"))
    parser.add_argument("--finetune", type=int, default=10, help="lenet: fine-tuning epochs before quantizing")
    parser.add_argument("--short-names", action="store_true", help="lenet: rewrite with --short-names")
    parser.add_argument("--quantize", nargs="+", default=["int8"])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=128)
    args = parser.parse_args(argv)
    if args.what == "lenet":
        lenet(args)
    elif args.what == "minilm":
        minilm(args)
    else:
        targets(args, args.what)
    return 0


if __name__ == "__main__":
    sys.exit(main())
