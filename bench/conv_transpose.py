"""ConvTranspose layers on a real model: the PP-OCRv4 text detector (rapidocr-onnxruntime's
ch_PP-OCRv4_det_infer.onnx, 62 Conv and 2 ConvTranspose layers).

1. Full rank, ConvTranspose layers only, per format: the relative error of the rewritten
   layer's output and of the detector's probability map.
2. ConvTranspose layers only at --ratio, fitted data-free and with --fit aware on the
   calibration images (--aware-formats): the layer's and the map's relative error.
3. The whole detector at a fixed per-layer ratio, with and without its ConvTranspose
   layers (--ops): parameters, latency at the deployment shape, and agreement of the
   probability maps (cosine, and the IoU of the text masks at DB's 0.3 threshold).

Inputs: no scanned text ships here, so the images are text lines rendered with PIL's
default font on plain and noisy backgrounds, and scikit-learn's two sample photos, all
resized to --size x --size and normalised as PP-OCR does (ImageNet mean/std).

    python bench/conv_transpose.py --size 320 --threads 2 --ratio 2 --format tucker
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tnonnx  # noqa: E402
from models.ppocr import ppocr_model_path  # noqa: E402
from tnonnx.runtime import with_outputs  # noqa: E402

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
LINES = ["Tensor networks compress exported models", "PP-OCR detects text lines 2026",
         "invoice no. 4711  total 12.50 EUR", "the quick brown fox jumps over the lazy dog"]
CALIB_LINES = ["calibration text is never evaluated", "order 0815 shipped on 3 May",
               "Pack my box with five dozen liquor jugs", "ONNX Runtime 1.31 on two cores"]


def images(size: int, calib: bool = False) -> np.ndarray:
    """Evaluation images, or (calib) others: other text, other offsets, mirrored photos."""
    from PIL import Image, ImageDraw, ImageFont
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(1 if calib else 0)
    font = ImageFont.load_default(size=max(10, size // (14 if calib else 16)))
    out = []
    for k in range(4):
        shade = 255 if k % 2 == 0 else 200
        img = Image.new("RGB", (size, size), (shade, shade, shade))
        draw = ImageDraw.Draw(img)
        for i, line in enumerate(CALIB_LINES if calib else LINES):
            draw.text((8 + (7 if calib else 4) * k, 12 + i * size // 5 + 3 * k), line, fill=(0, 0, 0), font=font)
        arr = np.asarray(img, np.float64)
        if k >= 2:
            arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255)
        out.append(arr)
    for name in ("china.jpg", "flower.jpg"):
        photo = np.asarray(Image.fromarray(load_sample_image(name)).resize((size, size)), np.float64)
        out.append(photo[:, ::-1] if calib else photo)
    batch = (np.stack(out) / 255.0 - MEAN) / STD
    return batch.transpose(0, 3, 1, 2).astype(np.float32)


def probability_maps(model, x: np.ndarray, extra: list[str] = ()) -> list[np.ndarray]:
    m = with_outputs(model, list(extra))[0] if extra else model
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = [sess.run(None, {"x": x[i:i + 1]}) for i in range(len(x))]
    return [np.concatenate([o[j] for o in outs]) for j in range(len(names))]


def rel(a, b) -> float:
    return float(np.linalg.norm(b.astype(np.float64) - a) / max(np.linalg.norm(a.astype(np.float64)), 1e-30))


def iou(a, b, threshold: float = 0.3) -> float:
    ma, mb = a > threshold, b > threshold
    union = np.logical_or(ma, mb).sum()
    return float(np.logical_and(ma, mb).sum() / union) if union else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--format", default="tucker")
    ap.add_argument("--formats", default="svd,tucker,tt,cp,ht", help="formats of the full-rank check")
    ap.add_argument("--budget", type=float, default=None,
                    help="also a --budget run with --fit aware, calibrated on other images")
    ap.add_argument("--skip-full", action="store_true", help="leave out the full-rank table")
    ap.add_argument("--aware-formats", default="",
                    help="formats of the data-free against --fit aware table (ConvTranspose layers only, --ratio)")
    ap.add_argument("--skip-whole", action="store_true", help="leave out the whole-detector table")
    args = ap.parse_args()
    path = ppocr_model_path("det")
    original = onnx.load(path)
    x = images(args.size)
    shapes = {"x": (1, 3, args.size, args.size)}
    layer = "p2o.ConvTranspose.0"
    layer_out = next(n.output[0] for n in original.graph.node if n.name == layer)
    ref_map, ref_layer = probability_maps(original, x, [layer_out])
    print(f"inputs: {len(x)} images {args.size}x{args.size}; text pixels (>0.3) in the original's maps: "
          f"{(ref_map > 0.3).mean():.3%}\n")

    print("| format (full rank, --ops ConvTranspose) | layers rewritten | layer output rel. error | "
          "probability map rel. error | max abs |")
    print("|---|---|---|---|---|")
    for fmt in [] if args.skip_full else args.formats.split(","):
        new, report = tnonnx.rewrite(str(path), format=fmt, ops="ConvTranspose", rank=100000, force=True,
                                     shapes=shapes, validate=False, timing=False)
        got_map, got_layer = probability_maps(new, x, [layer_out])
        print(f"| {fmt} | {', '.join(r.name for r in report.rewritten)} | {rel(ref_layer, got_layer):.2e} | "
              f"{rel(ref_map, got_map):.2e} | {np.abs(got_map - ref_map).max():.2e} |")

    calib = {"x": images(args.size, calib=True)}
    if args.aware_formats:
        print(f"\n| --ops ConvTranspose --ratio {args.ratio:g} | fit | ConvTranspose.0 ranks | layer output rel. error | "
              "probability map rel. error | map cosine | text-mask IoU |")
        print("|---|---|---|---|---|---|---|")
    for fmt in [f for f in args.aware_formats.split(",") if f]:
        for fit in ("data-free", "aware"):
            extra = dict(fit=fit, calib=calib) if fit == "aware" else {}
            new, report = tnonnx.rewrite(str(path), format=fmt, ops="ConvTranspose", ratio=args.ratio, shapes=shapes,
                                         validate=False, timing=False, **extra)
            got_map, got_layer = probability_maps(new, x, [layer_out])
            row = next(r for r in report.rows if r.name == layer)
            cos = float(np.dot(ref_map.ravel(), got_map.ravel()) / (np.linalg.norm(ref_map) * np.linalg.norm(got_map)))
            print(f"| {fmt} | {fit} | {','.join(map(str, row.ranks)) if row.ranks else 'dense'} | "
                  f"{rel(ref_layer, got_layer):.4f} | {rel(ref_map, got_map):.4f} | {cos:.4f} | "
                  f"{iou(ref_map, got_map):.3f} |", flush=True)
    if args.skip_whole:
        return
    runs = [(f"--ratio {args.ratio:g} --ops ConvTranspose", dict(ratio=args.ratio, ops="ConvTranspose")),
            (f"--ratio {args.ratio:g}", dict(ratio=args.ratio)),
            (f"--ratio {args.ratio:g} --ops MatMul,Gemm,Conv", dict(ratio=args.ratio, ops="MatMul,Gemm,Conv"))]
    if args.budget:
        runs.append((f"--budget {args.budget:g}x --fit aware", dict(budget=args.budget, fit="aware", calib=calib)))
    print(f"\n| --format {args.format} ... | ConvTranspose.0 ranks | params | "
          "latency (p50) | map cosine | text-mask IoU | rewrite s |")
    print("|---|---|---|---|---|---|---|")
    for label, options in runs:
        started = time.perf_counter()
        new, report = tnonnx.rewrite(str(path), format=args.format, shapes=shapes, threads=args.threads,
                                     validate=False, **options)
        seconds = time.perf_counter() - started
        got = probability_maps(new, x)[0]
        cos = float(np.dot(ref_map.ravel(), got.ravel()) / (np.linalg.norm(ref_map) * np.linalg.norm(got)))
        row = next(r for r in report.rows if r.name == layer)
        t = report.totals
        print(f"| {label} | {','.join(map(str, row.ranks)) if row.ranks else 'dense'} | "
              f"{t.params_before / 1e6:.3f}M -> {t.params_after / 1e6:.3f}M ({t.params_before / t.params_after:.2f}x) | "
              f"{t.ms_before:.1f} -> {t.ms_after:.1f} ms ({t.ms_before / t.ms_after:.2f}x) | {cos:.4f} | "
              f"{iou(ref_map, got):.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
