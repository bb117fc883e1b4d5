"""Nonlinear tensor train/ring (ntt, ntr) against their linear formats (tt, tr) at equal
parameters (the nonlinear formats use the linear format's modes and rank rule, so every
pair below has the same parameter count).

    .venv/bin/python bench/ntt.py                          # both parts, writes docs/bench_ntt.md
    .venv/bin/python bench/ntt.py --part lenet --ranks 2 4 8
    .venv/bin/python bench/ntt.py --part minilm --minilm "include=intermediate,rank=8"

(a) LeNet-5 trained on Fashion-MNIST (models/lenet5_fashion.onnx): calibrated on the first
    1000 images of models/fashion_test.npz, top-1 accuracy on the other 1000, every layer
    rewritten at --rank r (layers that would not get smaller stay dense), --fit aware
    (every layer fitted to the original model's activations) and --fit sequential (each
    layer fed the outputs of the already rewritten layers before it).
(b) all-MiniLM-L6-v2 (bench/minilm_tasks.py: compare_configs, LeeCalibrationReader): for
    each --minilm setting (include regex, rank, optional order), the matching MatMuls
    rewritten with --fit aware; mean cosine of the sentence embeddings to the original's
    and the task metrics. TT at ratio 2 on every MatMul is out of reach here: on a
    384x1536 MatMul it has ranks (16, 152, 48) and 67x the dense layer's MACs, and the
    data-aware fit of one such layer at ratio 8 already takes about four minutes on one
    core; so (b) rewrites the six FFN input MatMuls at rank 8 (0.7% of their parameters),
    and one of them at order 2, rank 32 (9%).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

import tnonnx  # noqa: E402

LENET, FASHION = ROOT / "models" / "lenet5_fashion.onnx", ROOT / "models" / "fashion_test.npz"
OUT = ROOT / "docs" / "bench_ntt.md"
NOTES = "## Notes"

# (label, format, format_options): each nonlinear one compared with its linear format
LENET_VARIANTS = (
    ("tt", "tt", {}),
    ("ntt relu", "ntt", {"act": "relu"}),
    ("ntt tanh", "ntt", {"act": "tanh"}),
    ("ntt gelu", "ntt", {"act": "gelu"}),
    ("tr", "tr", {}),
    ("ntr tanh", "ntr", {"act": "tanh"}),
)
MINILM_VARIANTS = (
    ("tt", "tt", {}),
    ("ntt tanh", "ntt", {"act": "tanh"}),
    ("ntt gelu", "ntt", {"act": "gelu"}),
    ("ntt relu", "ntt", {"act": "relu"}),
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lenet(ranks, fits, variants) -> str:
    data = np.load(FASHION)
    calib = {"input": data["input"][:1000]}
    held_out = {"input": data["input"][1000:], "labels": data["labels"][1000:]}
    lines = ["| rank | fit | format | params (dense 61.7k) | top-1 held out | cosine | mean layer output error | "
             "rewrite s |", "|---|---|---|---|---|---|---|---|"]
    reference = None
    for rank in ranks:
        for fit in fits:
            for label, fmt, options in variants:
                started = time.perf_counter()
                _, report = tnonnx.rewrite(LENET, format=fmt, rank=rank, fit=fit, calib=calib, inputs=held_out,
                                           format_options=options)
                seconds = time.perf_counter() - started
                v = report.validation
                reference = v.accuracy_ref
                errors = [r.output_error for r in report.rewritten if r.output_error is not None]
                row = (f"| {rank} | {fit} | {label} | {report.totals.params_after} | {v.accuracy_test:.3f} | "
                       f"{v.outputs[0].cosine:.4f} | {np.mean(errors):.3f} | {seconds:.1f} |")
                lines.append(row)
                log(row)
    lines += ["", f"Original model: top-1 {reference:.3f} on the same 1000 held-out images.", "",
              "The layer output errors are the report's (relative, on the calibration data). For the linear "
              "formats they are measured through the Gram basis; with --fit sequential that leaves out the part "
              "of the targets (the original layer's outputs) that no linear map of the layer's rewritten inputs "
              "reaches, so they read lower than the errors of the nonlinear formats, which are measured on the "
              "sampled inputs themselves. Compare accuracy and cosine across formats."]
    return "\n".join(lines)


MINILM_SETTINGS = ("include=intermediate,rank=8", r"include=layer\.5/intermediate,rank=32,order=2")


def parse_setting(text: str) -> dict:
    """"include=REGEX,rank=R[,order=D]" -> keyword arguments of tnonnx.rewrite."""
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip() if key.strip() == "include" else int(value)
    return out


def minilm(setting: dict, variants, n_calib: int) -> str:
    from minilm_tasks import compare_configs, format_table

    configs = [(f"{label}", dict(setting, format=fmt, fit="aware", format_options=options))
               for label, fmt, options in variants]
    rows = compare_configs(configs, n_calib=n_calib, log=log)
    return format_table(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("lenet", "minilm", "all"), default="all")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--fits", nargs="+", default=["aware", "sequential"])
    parser.add_argument("--minilm", nargs="+", default=list(MINILM_SETTINGS),
                        help="MiniLM settings 'include=REGEX,rank=R[,order=D]' (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=512, help="MiniLM calibration sentences")
    parser.add_argument("--out", default=str(OUT), help="markdown file to write ('-': none)")
    args = parser.parse_args(argv)
    command = "    .venv/bin/python bench/ntt.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    sections = ["# NTT and NTR against TT and TR at equal parameters", "", "Produced by", "", command.rstrip(), ""]
    if args.part in ("lenet", "all"):
        sections += ["## LeNet-5 on Fashion-MNIST", "", lenet(args.ranks, args.fits, LENET_VARIANTS), ""]
        print(sections[-2], flush=True)
    if args.part in ("minilm", "all"):
        for text in args.minilm:
            setting = parse_setting(text)
            title = ", ".join(f"{k} {v}" for k, v in setting.items() if k != "include")
            sections += [f"## all-MiniLM-L6-v2: MatMuls matching `{setting['include']}`, {title}, fit aware", "",
                         minilm(setting, MINILM_VARIANTS, args.calib), ""]
            print(sections[-2], flush=True)
    if args.out != "-":
        out = Path(args.out)
        # a hand-written "## Notes" section at the end of an existing file is kept
        previous = out.read_text() if out.exists() else ""
        notes = previous[previous.index(NOTES):] if NOTES in previous else ""
        out.write_text("\n".join(sections) + ("\n" + notes if notes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
