"""`tnonnx rewrite --finetune N` with and without `--admm` on LeNet-5 (Fashion-MNIST):
test accuracy and output error on the 2,000 test images at equal parameters.

    python bench/admm_rewrite.py --format tt --ratio 4 --epochs 10 --rho 1,10

Calibration: models/fashion_calib.npz (2,000 training images). One torch thread for the
small model (tnonnx's own rule). Prints one line per run and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tnonnx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "lenet5_fashion.onnx"))
    ap.add_argument("--calib", default=str(ROOT / "models" / "fashion_calib.npz"))
    ap.add_argument("--inputs", default=str(ROOT / "models" / "fashion_test.npz"))
    ap.add_argument("--format", default="tt")
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rho", default="1", help="comma list of --admm-rho values")
    args = ap.parse_args(argv)
    calib = {"input": np.load(args.calib)["input"]}
    rows = []
    for rho in [None] + [float(r) for r in args.rho.split(",")]:
        started = time.perf_counter()
        extra = {} if rho is None else {"admm": True, "admm_rho": rho}
        _, report = tnonnx.rewrite(args.model, format=args.format, ratio=args.ratio, calib=calib,
                                   finetune=args.epochs, inputs=args.inputs, timing=False, **extra)
        v = report.validation
        row = {"admm_rho": rho, "params_before": report.totals.params_before,
               "params_after": report.totals.params_after, "accuracy_ref": v.accuracy_ref,
               "accuracy": v.accuracy_test, "rel_l2": round(float(v.outputs[0].rel_l2), 4),
               "notes": [n for n in report.notes if n.startswith(("admm", "finetune"))],
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(row, flush=True)
    print(json.dumps({"args": vars(args), "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
