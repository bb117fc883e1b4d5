"""Whole-model latency, original against rewritten, at --budget 2x and 4x, with and
without --speedup, beside each model's accuracy figure.

    .venv/bin/python bench/latency.py --quick --models lenet                # a minute or two
    .venv/bin/python bench/latency.py --threads 2 --out build/latency.md    # everything

Cases (--models): ``lenet`` the trained Fashion-MNIST LeNet-5 (batch 1; calibration
models/fashion_calib.npz, --fit aware; test accuracy on models/fashion_test.npz),
``minilm`` all-MiniLM-L6-v2 at 1 x 128 and 32 x 128 tokens (legacy export; --fit aware on
the first --minilm-calib lee_background sentences; mean cosine of the 200 polarity
sentences' embeddings to the original's, and their 5-fold sentiment accuracy; needs the
bench extra: gensim), ``ppocr-rec`` the PP-OCRv4 recogniser at 1 x 3 x 48 x 320 (no real
text images here: data-free fit, output cosine on 8 random images), ``layer4096`` one
4096 x 4096 MatMul with a decaying spectrum at 1 and 256 rows (data-free; relative output
error on 256 random rows), ``reference`` the random-weight networks of models/reference.py
(batch 1, data-free, output cosine on 64 random inputs).

Per case, format (--formats) and budget (--budgets): one rewrite without --speedup and
one with ``--speedup X``; a missed or unreachable target is a row with tnonnx's message.
"ms (rewrite)" is what tnonnx.rewrite reported (report.totals, interleaved p50 at the
deployment shape); "ms (re-timed)" times the two saved files again, interleaved, with a
longer OrtTimer, as a check. "load" is the 1-minute load average when the row finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx import calibrate  # noqa: E402
from tnonnx.errors import TnonnxError  # noqa: E402
from tnonnx.latency import OrtTimer, machine_key  # noqa: E402
from tnonnx.model import load  # noqa: E402

MODELS_DIR = ROOT / "models"
ALL = ("lenet", "minilm", "ppocr-rec", "layer4096", "reference")


@dataclass
class Case:
    name: str
    model: object  # path or ModelProto
    deployment: str
    batch: int = 1
    shapes: dict | None = None
    kwargs: Callable[[], dict] = dict  # fresh extra rewrite kwargs per call (calib readers get used up)
    metric: Callable = None  # (new model, report) -> accuracy text


def cosine_metric(note: str):
    return lambda new, report: f"output cosine {report.validation.outputs[0].cosine:.5f} ({note})"


def lenet_cases(args, tmp):
    def metric(new, report):
        v = report.validation
        return f"test accuracy {v.accuracy_ref:.4f} -> {v.accuracy_test:.4f}"
    kwargs = lambda: dict(calib=str(MODELS_DIR / "fashion_calib.npz"), fit="aware",  # noqa: E731
                          inputs=str(MODELS_DIR / "fashion_test.npz"))
    return [Case("LeNet-5 (Fashion-MNIST)", MODELS_DIR / "lenet5_fashion.onnx", "batch 1", kwargs=kwargs,
                 metric=metric)]


def minilm_cases(args, tmp):
    from bench import minilm_tasks as mt

    mt.gensim_data("lee_background.cor")  # fails early, with the install hint, without gensim
    path = mt.export_original(tmp)
    tok = mt.default_tokenizer()
    data = mt.evaluation_data()
    ref = mt.embed(path, data["sentences"], tok)
    ref_sentiment = mt.sentiment_accuracy(ref, data["labels"])

    def metric(new, report):
        emb = mt.embed(new, data["sentences"], tok)
        return (f"sentence cosine {mt.cosines(emb, ref).mean():.4f}, sentiment "
                f"{ref_sentiment:.3f} -> {mt.sentiment_accuracy(emb, data['labels']):.3f}")
    kwargs = lambda: dict(calib=mt.LeeCalibrationReader(tok, n=args.minilm_calib, seq=128, batch=32),  # noqa: E731
                          fit="aware", validate=False)
    rows = (1,) if args.quick else (1, 32)
    return [Case("MiniLM-L6", path, f"{b} x 128 tokens", batch=b,
                 shapes={"input_ids": (b, 128), "attention_mask": (b, 128)}, kwargs=kwargs, metric=metric)
            for b in rows]


def ppocr_cases(args, tmp):
    from models.ppocr import ppocr_model_path

    images = {"x": np.random.default_rng(0).standard_normal((8, 3, 48, 320)).astype(np.float32)}
    return [Case("PP-OCRv4 rec", ppocr_model_path("rec"), "1 x 3 x 48 x 320", shapes={"x": (1, 3, 48, 320)},
                 kwargs=lambda: dict(inputs=images), metric=cosine_metric("8 random images, no real text"))]


def layer_model(n: int = 4096, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W, W n x n: singular values about exp(-k / (n/8)) for k < n/4 (a random rank-n/4
    part), then a flat floor near 1e-3 of the largest (small full-rank noise)."""
    rng = np.random.default_rng(seed)
    r = n // 4
    a = rng.standard_normal((n, r)).astype(np.float32) * np.exp(-np.arange(r) / (n / 8)).astype(np.float32)
    w = (a @ rng.standard_normal((r, n)).astype(np.float32) + 0.01 * rng.standard_normal((n, n)).astype(np.float32))
    w /= np.sqrt(n)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], "layer4096",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", n])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def layer_cases(args, tmp):
    path = Path(tmp) / "layer4096.onnx"
    onnx.save(layer_model(), str(path))
    x = {"x": np.random.default_rng(1).standard_normal((256, 4096)).astype(np.float32)}

    def metric(new, report):
        return f"relative output error {report.validation.outputs[0].rel_l2:.4f} (256 random rows)"
    return [Case("MatMul 4096x4096", path, f"{rows} x 4096", batch=rows, shapes={"x": (rows, 4096)},
                 kwargs=lambda: dict(inputs=x), metric=metric) for rows in ((1,) if args.quick else (1, 256))]


def reference_cases(args, tmp):
    from models import export, reference

    names = ["mlp"] if args.quick else list(reference.MODELS)
    return [Case(f"reference {n}", export.export(n, Path(tmp) / f"{n}.onnx"), "batch 1",
                 kwargs=lambda: dict(inputs=64), metric=cosine_metric("64 random inputs")) for n in names]


BUILDERS = {"lenet": lenet_cases, "minilm": minilm_cases, "ppocr-rec": ppocr_cases, "layer4096": layer_cases,
            "reference": reference_cases}


def retime(original, new_path, case: Case, threads: int) -> tuple[float, float]:
    """Both saved models timed again, interleaved, with more rounds than the planner uses."""
    ref, new = load(original), onnx.load(str(new_path))
    feeds = calibrate.random_feeds(ref, case.batch, case.shapes, seed=1)
    before, after = OrtTimer(min_rounds=11, max_rounds=41, budget_s=4.0)([ref, new], feeds, threads)
    return before, after


def chosen(report) -> str:
    """Formats (and emissions) of the rewritten layers, with counts, e.g. "svd/matmul x2 (2 of 5 layers)"."""
    done = Counter(f"{r.format}/{r.emission}" if r.emission else r.format for r in report.rows if r.params_after)
    return ", ".join(f"{k} x{v}" for k, v in done.most_common()) + f" ({sum(done.values())} of {len(report.rows)} layers)"


def run_case(case: Case, fmt: str, budget: float, speedup: float | None, args, tmp) -> dict:
    row = {"model": case.name, "deployment": case.deployment, "format": fmt, "budget": f"{budget:g}x",
           "speedup": f"{speedup:g}" if speedup else "-"}
    started = time.perf_counter()
    try:
        new, report = tnonnx.rewrite(case.model, format=fmt, budget=budget, speedup=speedup, batch=case.batch,
                                     shapes=case.shapes, threads=args.threads,
                                     timing_cache=not args.no_timing_cache, ops=args.ops, **case.kwargs())
    except TnonnxError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken case should not sink the table
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = time.perf_counter() - started
    if "error" not in row:
        t = report.totals
        path = Path(tmp) / f"rewritten-{abs(hash((case.name, case.deployment, fmt, budget, speedup)))}.onnx"
        onnx.save(new, str(path))
        row.update(params=f"{t.params_before / t.params_after:.2f}x", ms=(t.ms_before, t.ms_after),
                   retimed=retime(case.model, path, case, args.threads), accuracy=case.metric(new, report),
                   timing=f"{report.latency.timing_seconds:.1f} s, {report.latency.timed} timed, "
                          f"{report.latency.cache_hits} cached",
                   formats=chosen(report))
        path.unlink()
    row["load"] = f"{os.getloadavg()[0]:.1f}"
    return row


HEAD = ("| model | deployment | --format | --budget | --speedup | params smaller | ms before -> after (speed), "
        "rewrite | ms before -> after (speed), re-timed | accuracy | formats chosen | rewrite s (timing) | load |")


def format_row(r: dict) -> str:
    lead = f"| {r['model']} | {r['deployment']} | {r['format']} | {r['budget']} | {r['speedup']} |"
    if "error" in r:
        msg = " ".join(r["error"].split()).replace("|", "/")
        return f"{lead} - | not written: {msg} | | | | {r['seconds']:.0f} | {r['load']} |"

    def ms(pair):
        return f"{pair[0]:.3f} -> {pair[1]:.3f} ({pair[0] / pair[1]:.2f}x)"
    return (f"{lead} {r['params']} | {ms(r['ms'])} | {ms(r['retimed'])} | {r['accuracy']} | {r['formats']} | "
            f"{r['seconds']:.0f} ({r['timing']}) | {r['load']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--formats", nargs="+", default=["auto", "svd"])
    parser.add_argument("--speedup", type=float, default=1.5, help="the target of the 'with --speedup' rows")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (deployment)")
    parser.add_argument("--minilm-calib", type=int, default=128, help="MiniLM calibration sentences")
    parser.add_argument("--no-timing-cache", action="store_true", help="time every layer afresh")
    parser.add_argument("--ops", help="tnonnx's --ops (default: every rewritable weight under --budget)")
    parser.add_argument("--quick", action="store_true",
                        help="first budget, first format, the smallest case of each model only")
    parser.add_argument("--out", help="also write the markdown (header and table) to this file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)}: choose from {', '.join(ALL)}")
    budgets, formats = (args.budgets[:1], args.formats[:1]) if args.quick else (args.budgets, args.formats)
    command = "bench/latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    header = [f"`{command}`", "",
              f"{args.threads} onnxruntime thread(s); {machine_key()}; load average at start "
              + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + f" (1, 5, 15 min) on {os.cpu_count()} cores", ""]
    print("\n".join(header + [HEAD, "|" + "---|" * (HEAD.count("|") - 1)]), flush=True)
    lines = []
    with tempfile.TemporaryDirectory(prefix="tnonnx-latency-") as tmp:
        for name in names:
            try:
                cases = BUILDERS[name](args, tmp)
            except Exception as exc:  # noqa: BLE001 - a missing extra (gensim, rapidocr) skips one model
                lines.append(f"| {name} | | | | | - | not run: {type(exc).__name__}: {exc} | | | | | |")
                print(lines[-1], flush=True)
                continue
            for case in cases:
                for fmt in formats:
                    for budget in budgets:
                        for speedup in (None, args.speedup):
                            lines.append(format_row(run_case(case, fmt, budget, speedup, args, tmp)))
                            print(lines[-1], flush=True)
    footer = f"\n{len(lines)} rows in {time.perf_counter() - started:.0f} s; load average at end " + \
        ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(footer)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(header + [HEAD, "|" + "---|" * (HEAD.count("|") - 1)] + lines)
                                  + "\n" + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
