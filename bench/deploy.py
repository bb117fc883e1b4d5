"""--target and --quantize on real models: sizes, agreement and the quantize-alone baseline.

    .venv/bin/python bench/deploy.py lenet [--budget 5]      # LeNet-5: factorised + int8 against int8 alone
    .venv/bin/python bench/deploy.py minilm [--ratio 2]      # MiniLM: --fit aware svd + int8 against int8 alone
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
    print("| budget | quantize | final size (x smaller) | quantized alone (x smaller) | accuracy original / final / "
          "quantized alone | cosine final / quantized alone |")
    print("|---|---|---|---|---|---|")
    for budget, mode in ((b, m) for m in args.quantize for b in args.budget):
        _, report = tnonnx.rewrite(ROOT / "models" / "lenet5_fashion.onnx", format="svd", budget=budget,
                                   calib=str(ROOT / "models" / "fashion_calib.npz"), fit="aware", finetune=10,
                                   finetune_hidden=0, inputs=str(ROOT / "models" / "fashion_test.npz"), batch=32,
                                   threads=2, quantize=mode)
        d, s = report.deploy, report.deploy.sizes
        final, base = d.comparisons["original → final"], d.comparisons["original → baseline"]
        print(f"| {budget:g}x | {d.quantization.method} | {_kib(s['final'])} ({s['original'] / s['final']:.2f}x) | "
              f"{_kib(s['baseline'])} "
              f"({s['original'] / s['baseline']:.2f}x) | {final.accuracy_ref:.4f} / {final.accuracy_test:.4f} / "
              f"{base.accuracy_test:.4f} | {_cos(final):.4f} / {_cos(base):.4f} |", flush=True)


def minilm(args) -> None:
    from models.export import export_minilm, load_minilm

    tokenizer, _ = load_minilm()
    sentences = lee_sentences(args.calib + args.eval)

    def feeds(texts):
        enc = tokenizer(texts, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calib, held_out = feeds(sentences[:args.calib]), feeds(sentences[args.calib:])
    print("| ratio | quantize | final size (x smaller) | quantized alone (x smaller) | mean sentence cosine final / "
          "quantized alone / factorised | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_minilm(Path(tmp) / "minilm.onnx", dynamo=False, verify=False)
        from tnonnx.validate import run

        reference = run(path, [held_out])["sentence_embedding"]
        for mode in args.quantize:
            t0 = time.perf_counter()
            final, report = tnonnx.rewrite(path, format="svd", ratio=args.ratio, fit="aware", calib=calib,
                                           quantize=mode, inputs=held_out, timing=False, min_cosine=0)
            seconds = time.perf_counter() - t0
            d, s = report.deploy, report.deploy.sizes

            def mean_cos(model):
                emb = run(model, [held_out])["sentence_embedding"]
                return float(np.mean(np.sum(emb * reference, 1) / np.linalg.norm(emb, axis=1)
                                     / np.linalg.norm(reference, axis=1)))

            # per-sentence cosines (the report's are over all outputs at once); the baseline again,
            # quantized as the rewrite quantized it (static: calibration data was given)
            base_model = quantize(load(path), Quantization(mode, static=True),
                                  feed_batches(calib, load(path), what="--calib")[0])[0]
            print(f"| {args.ratio:g}x | {d.quantization.method} | {_mib(s['final'])} "
                  f"({s['original'] / s['final']:.2f}x) | {_mib(s['baseline'])} ({s['original'] / s['baseline']:.2f}x)"
                  f" | {mean_cos(final):.4f} / {mean_cos(base_model):.4f} / "
                  f"{_cos(d.comparisons['original → factorised']):.4f} | {seconds:.0f} |", flush=True)


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
    parser.add_argument("--budget", type=float, nargs="+", default=[5.0])
    parser.add_argument("--ratio", type=float, default=2.0)
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
