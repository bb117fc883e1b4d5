"""The trained LeNet-5 at --budget 5x: test accuracy by fitting mode.

    .venv/bin/python bench/lenet_budget.py [--budget 5] [--calib 4000] [--finetune 30] [--finetune-hidden W ...]

Calibration: --calib images drawn (seed 0) from the Fashion-MNIST *training* split;
evaluation: the full 10,000-image test split. Both come from Debian's
dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist, see
../shared/ENVIRONMENT.md); models/train_lenet.py reads it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx.finetune import HIDDEN_WEIGHT  # noqa: E402
from models.train_lenet import DEFAULT_DATA_DIR, load_split, normalise  # noqa: E402

MODEL = ROOT / "models" / "lenet5_fashion.onnx"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=5)
    parser.add_argument("--calib", type=int, default=4000)
    parser.add_argument("--finetune", type=int, default=30)
    parser.add_argument("--finetune-hidden", type=float, nargs="+", default=[HIDDEN_WEIGHT],
                        help="weights of the hidden tensors in the finetune loss (one row each)")
    parser.add_argument("--format", default="svd")
    parser.add_argument("--only-finetune", action="store_true", help="only the finetune rows")
    parser.add_argument("--data", default=DEFAULT_DATA_DIR)
    parser.add_argument("--allow-slower", action="store_true",
                        help="budgets may emit layers timed slower than dense (at batch 1 the never-slower rule "
                             "leaves LeNet-5 no 5x budget)")
    args = parser.parse_args(argv)
    x_train, _ = load_split(Path(args.data), "train")
    x_test, y_test = load_split(Path(args.data), "t10k")
    pick = np.random.default_rng(0).choice(len(x_train), args.calib, replace=False)
    calib = {"input": normalise(x_train[pick])}
    test = {"input": normalise(x_test), "labels": y_test}
    fits = [] if args.only_finetune else [("data-free", {}), ("aware", {"fit": "aware"}),
                                          ("sequential", {"fit": "sequential"})]
    configs = fits + [(f"sequential + finetune {args.finetune} (hidden {w:g})",
                       {"fit": "sequential", "finetune": args.finetune, "finetune_hidden": w})
                      for w in args.finetune_hidden]
    print(f"| fit ({args.format}, budget {args.budget:g}x) | params | test accuracy | original | difference | "
          "output cosine | ranks | rewrite s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, kwargs in configs:
        started = time.perf_counter()
        _, report = tnonnx.rewrite(MODEL, format=args.format, budget=args.budget, calib=calib, inputs=test,
                                   allow_slower=args.allow_slower, **kwargs)
        seconds = time.perf_counter() - started
        v = report.validation
        ranks = ", ".join(f"{r.name.split('/')[1]} {r.ranks}" for r in report.rewritten)
        print(f"| {label} | {report.totals.params_before} -> {report.totals.params_after} | {v.accuracy_test:.4f} | "
              f"{v.accuracy_ref:.4f} | {100 * (v.accuracy_test - v.accuracy_ref):+.2f} pt | {v.outputs[0].cosine:.4f} | "
              f"{ranks} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
