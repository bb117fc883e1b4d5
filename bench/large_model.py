"""Large-model benchmark: a generated model past protobuf's 2 GB limit, with external data,
through `tnonnx inspect` and `tnonnx rewrite`, each in a child process whose wall time and
peak resident memory (ru_maxrss from wait4) are measured; then the output's agreement with
the original in onnxruntime, in a child process of its own.

    nice .venv/bin/python bench/large_model.py                     # 2.4 GB: 12 x (4096 x 12288)
    nice .venv/bin/python bench/large_model.py --layers 30         # 6 GB
    nice .venv/bin/python bench/large_model.py --layers 4 --n 512 --m 1536   # smoke check

The model: x (batch, n) through `layers` MatMuls, n x m and m x n in turn, with Relu
between them. Each weight is a sum of --terms random rank-one terms with weights
exp(-k / --decay) (a decaying spectrum), scaled to a largest singular value near 1, written
straight to the data file (nothing ever holds the whole model). Everything is generated in
a temporary folder under build/ and deleted at the end (--keep keeps it).

Agreement: rel_l2 = ||y' - y|| / ||y|| and cosine over --batch rows of random normal
inputs, original and rewritten model run one after the other by onnxruntime from their files.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

ALIGN = 4096


def write_model(folder: Path, layers: int, n: int, m: int, terms: int, decay: float, seed: int = 0) -> Path:
    """The model file and its data file 'weights.bin' in `folder`, one weight at a time."""
    rng = np.random.default_rng(seed)
    scales = np.exp(-np.arange(terms) / decay)
    nodes, inits, x = [], [], "x"
    with open(folder / "weights.bin", "wb") as data:
        for i in range(layers):
            a, b = (n, m) if i % 2 == 0 else (m, n)
            left = rng.standard_normal((a, terms), dtype=np.float32) / np.float32(np.sqrt(a))
            right = rng.standard_normal((terms, b), dtype=np.float32) / np.float32(np.sqrt(b))
            w = (left * scales.astype(np.float32)) @ right
            offset = -(-data.tell() // ALIGN) * ALIGN
            data.seek(offset)
            data.write(w.tobytes())
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[a, b],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
            x = f"h{i}"
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
                x = f"r{i}"
            del w, left, right
    out = m if layers % 2 else n
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = folder / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def measured(cmd: list[str], log) -> dict:
    """Run `cmd` as a child; its wall time, peak RSS (MB), exit code and output tail."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    print(f"$ {' '.join(cmd)}\n{output[-3000:]}", file=log, flush=True)
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "rc": proc.returncode,
            "output": output[-3000:]}


def agree(original: str, rewritten: str, batch: int) -> dict:
    """(child) rel_l2 and cosine of the two models' outputs on random normal inputs."""
    import onnxruntime as ort

    n = onnx.load(original, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(1).standard_normal((batch, n)).astype(np.float32)
    outs = []
    for path in (original, rewritten):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"x": x})[0].astype(np.float64).ravel())
        del sess
    y, z = outs
    return {"rel_l2": float(np.linalg.norm(z - y) / np.linalg.norm(y)),
            "cosine": float(y @ z / (np.linalg.norm(y) * np.linalg.norm(z)))}


def folder_bytes(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--m", type=int, default=12288)
    p.add_argument("--terms", type=int, default=256, help="rank-one terms per weight")
    p.add_argument("--decay", type=float, default=16.0, help="term k is weighted exp(-k/decay)")
    p.add_argument("--runs", default="svd:64,tt:16", help="format:rank list")
    p.add_argument("--rewrite-args", default="--no-validate", help="extra `tnonnx rewrite` options")
    p.add_argument("--batch", type=int, default=8, help="rows of the agreement check")
    p.add_argument("--log", default=None, help="children's output (default: stderr)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-agree", action="store_true",
                   help="skip the agreement check (it holds the whole original in onnxruntime's memory)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--agree", nargs=2, metavar=("ORIGINAL", "REWRITTEN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.agree:
        print(json.dumps(agree(*args.agree, args.batch)))
        return
    log = open(args.log, "a") if args.log else sys.stderr
    (ROOT / "build").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="large-model-", dir=ROOT / "build"))
    tnonnx = [sys.executable, "-m", "tnonnx"]
    results = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "load_before": os.getloadavg(), "cpus": os.cpu_count(), "args": vars(args), "runs": []}
    try:
        start = time.perf_counter()
        model = write_model(folder, args.layers, args.n, args.m, args.terms, args.decay)
        results["generate_s"] = round(time.perf_counter() - start, 1)
        results["model_bytes"] = folder_bytes(folder, "")
        print(f"generated {results['model_bytes'] / 2**30:.2f} GB in {results['generate_s']} s", file=log, flush=True)
        results["inspect"] = measured(tnonnx + ["inspect", str(model)], log)
        for run in args.runs.split(","):
            fmt, rank = run.split(":")
            out = folder / f"out-{fmt}.onnx"
            row = {"format": fmt, "rank": int(rank), "load": os.getloadavg()[0]}
            row["rewrite"] = measured(tnonnx + ["rewrite", str(model), "-o", str(out), "--format", fmt, "--rank", rank]
                                      + args.rewrite_args.split(), log)
            if row["rewrite"]["rc"] == 0:
                row["output_bytes"] = folder_bytes(folder, out.name)
                row["output_files"] = sorted(p.name for p in folder.iterdir() if p.name.startswith(out.name))
            if row["rewrite"]["rc"] == 0 and not args.no_agree:
                check = measured([sys.executable, __file__, "--batch", str(args.batch), "--agree", str(model), str(out)],
                                 log)
                row["agreement"] = json.loads(check["output"].strip().splitlines()[-1]) if check["rc"] == 0 else None
                row["agreement_run"] = {k: check[k] for k in ("seconds", "peak_rss_mb", "rc")}
            for p in folder.iterdir():
                if p.name.startswith(out.name):
                    p.unlink()
            row["rewrite"].pop("output", None)
            results["runs"].append(row)
            print(json.dumps(row, default=str), file=log, flush=True)
    finally:
        results["load_after"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    results.get("inspect", {}).pop("output", None)
    text = json.dumps(results, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
