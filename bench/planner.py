"""How long `--format auto --budget 2x --fit aware` takes, and what it keeps: the PP-OCRv4
recogniser (1 x 3 x 48 x 320) and the small reference ResNet (random weights, 3 x 32 x 32),
calibrated on --calib random inputs (given as arrays of that many samples, so that a fixed
deployment --shape of batch 1 does not shrink the calibration set to one sample), judged on
--eval other random inputs (output cosine to the original's, and top-1 agreement of the
last axis).

    .venv/bin/python bench/planner.py [--models ppocr-rec,small_resnet] [--calib 32] [--eval 32]
                                      [--budget 2] [--fit aware] [--format auto]

No real text images or ImageNet photos exist here: the inputs are random, which is what a
new user without data would give with --calib-random.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx import calibrate  # noqa: E402
from tnonnx.validate import run  # noqa: E402


def model_path(name: str, tmp: Path) -> tuple[Path, dict]:
    if name == "ppocr-rec":
        from models.ppocr import ppocr_model_path

        return ppocr_model_path("rec"), {"x": (1, 3, 48, 320)}
    from models.export import export

    return export(name, tmp / f"{name}.onnx"), {}


def agreement(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(mean cosine over samples, top-1 agreement over the last axis)."""
    r = reference.reshape(reference.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    cos = np.sum(r * g, 1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1), 1e-300)
    top = float(np.mean(np.argmax(reference, -1) == np.argmax(got, -1)))
    return float(cos.mean()), top


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ppocr-rec,small_resnet")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--budget", default="2")
    parser.add_argument("--fit", default="aware")
    parser.add_argument("--format", default="auto")
    args = parser.parse_args(argv)
    print("| model | format | budget | fit | calib | rewrite s | params smaller | held-out cosine | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path, shapes = model_path(name, Path(tmp))
            original = tnonnx.model.load(path)
            batch = 1 if shapes else 8
            held_out = calibrate.random_batches(original, args.eval, batch, shapes, seed=10_000)
            calib = None
            if args.fit != "data-free":
                drawn = calibrate.random_batches(original, args.calib, batch, shapes, seed=0)
                calib = {k: np.concatenate([b[k] for b in drawn])[:args.calib] for k in drawn[0]}
            t0 = time.perf_counter()
            new, report = tnonnx.rewrite(path, format=args.format, budget=args.budget, fit=args.fit,
                                         calib=calib, shapes=shapes, validate=False)
            seconds = time.perf_counter() - t0
            ref, got = (next(iter(run(m, held_out).values())) for m in (original, new))
            cos, top = agreement(ref, got)
            smaller = report.totals.params_before / report.totals.params_after
            print(f"| {name} | {args.format} | {args.budget}x | {args.fit} | {args.calib} | {seconds:.0f} | "
                  f"{smaller:.2f}x | {cos:.4f} | {top:.3f} |", flush=True)
            for note in report.notes:
                print("  note:", note, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
