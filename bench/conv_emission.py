"""Latency of factorised convolutions (channel SVD, Tucker-2, CP) against the dense Conv
they replace, in ONNX Runtime (CPU), at ranks that are multiples of the SIMD width:

    .venv/bin/python bench/conv_emission.py                 # 2 threads, one layer, batch 1
    .venv/bin/python bench/conv_emission.py --threads 1 --rounds 9
    .venv/bin/python bench/conv_emission.py --depth 4 --batch 8
    .venv/bin/python bench/conv_emission.py --depth 4 --processes 3   # each row timed in 3 new processes

Each model is `--depth` convs of one shape in a row, each followed by a Relu, as in a
ResNet stage (input batch x C x H x W), every conv emitted exactly as `tnonnx rewrite`
emits it, timed with tnonnx.latency.OrtTimer (the planner's timer: interleaved with the
dense convs, sessions that do not spin, medians). With depth 1 the session's fixed costs
(the run call, onnxruntime's NCHWc layout reorders at the model's edges) count against a
single small layer; in a stage they are shared, as in a network. The table gives ms, the
speed-up over dense, the MAC ratio (dense MACs / factorised MACs) and the fraction of the
MAC-ratio speed-up reached. Outputs are checked against the factorisations' own dense kernels.

With `--processes N` each row is timed in N new processes (tnonnx.bench.in_new_process)
and the table gives the median speed-up over them, with the range: on a machine
whose two-thread speed depends on the process (docs/RESULTS.md, "Two-thread timings depend
on the process"), one process's timings can be all fast or all slow.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from tnonnx import bench, runtime  # noqa: E402
from tnonnx.emit import Builder, conv_node  # noqa: E402
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec  # noqa: E402
from tnonnx.latency import OrtTimer  # noqa: E402

# (channels in = out, spatial size, kernel): ResNet-style 3x3 stages at batch 1
LAYERS = [(64, 56, 3), (128, 28, 3), (256, 14, 3)]
FORMATS_RANKS = [("svd", (16, 32, 64)), ("tucker", (16, 32)), ("cp", (32, 64))]


def conv_model(builds, channels: int, size: int, batch: int = 1):
    """`builds[i](builder, input, output)` emits conv i; a Relu follows each."""
    b = Builder("stage", np.float32, np.float32)
    x = "x"
    for i, build in enumerate(builds):
        build(b, x, f"conv{i}")
        b.nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]))
        x = f"relu{i}"
    graph = helper.make_graph(b.nodes, "stage",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, channels, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def same_padding(k: int, size: int):
    """Conv attributes and geometry of a k x k conv that keeps a size x size image."""
    attrs = {"pads": [k // 2] * 4}
    return attrs, ConvGeometry((k, k), attrs, (size, size), (size, size))


def dense_stage(kernels, size: int, batch: int = 1):
    """The dense convs of `kernels` (each C x C x k x k) in a row, each followed by a Relu."""
    k = kernels[0].shape[-1]
    attrs, _ = same_padding(k, size)
    return conv_model([lambda b, x, y, w=w: conv_node(b, x, w, y, attrs=dict(attrs, kernel_shape=[k, k]), output=y)
                       for w in kernels], kernels[0].shape[1], size, batch)


def factorised_stage(facts, channels: int, k: int, size: int, batch: int = 1):
    """The same stage with each conv emitted as tnonnx rewrite emits its factorisation."""
    _, geometry = same_padding(k, size)
    return conv_model([lambda b, x, y, f=f: f.emit(b, x, geometry, None, y) for f in facts], channels, size, batch)


def time_in_processes(models, feeds, threads: int, rounds: int, processes: int) -> list[list[float]]:
    """OrtTimer's times of `models` in each of `processes` new Python processes."""
    return [bench.in_new_process(_time_models, models, feeds, threads, rounds) for _ in range(processes)]


def _time_models(models, feeds, threads: int, rounds: int) -> list[float]:
    return OrtTimer(min_rounds=rounds, max_rounds=rounds)(models, feeds, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--depth", type=int, default=1, help="convs of one shape in a row (a network stage)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--processes", type=int, default=0,
                    help="time each row in this many new processes (median speed-up over them)")
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; batch {args.batch}, {args.depth} conv(s) per model; "
          f"medians of {args.rounds} interleaved rounds"
          + (f", each row in {args.processes} new processes" if args.processes else "") + "\n")
    print("| layer | format | ranks | MAC ratio | dense ms | factorised ms | speed-up (of MAC ratio) |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for c, size, k in LAYERS:
        kernels = [rng.standard_normal((c, c, k, k)).astype(np.float32) / np.sqrt(c * k * k)
                   for _ in range(args.depth)]
        _, geometry = same_padding(k, size)
        dense = dense_stage(kernels, size, args.batch)
        feeds = {"x": rng.standard_normal((args.batch, c, size, size)).astype(np.float32)}
        dense_macs = args.depth * c * c * k * k * size * size
        for fmt, ranks in FORMATS_RANKS:
            for rank in ranks:
                facts = [FORMATS[fmt].fit_conv(w.astype(np.float64), RankSpec(rank=rank)) for w in kernels]
                model = factorised_stage(facts, c, k, size, args.batch)
                want = runtime.session(dense_stage([f.to_dense().astype(np.float32) for f in facts], size,
                                                   args.batch)).run(None, feeds)[0]
                got = runtime.session(model).run(None, feeds)[0]
                np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
                ratio = dense_macs / sum(f.macs(geometry) for f in facts)
                if args.processes:
                    runs = time_in_processes([dense, model], feeds, args.threads, args.rounds, args.processes)
                    speeds = sorted(d / f for d, f in runs)
                    t_dense, t_fact = (float(np.median([r[i] for r in runs])) for i in (0, 1))
                    speed = float(np.median(speeds))
                    spread = f" [{speeds[0] / ratio:.2f}-{speeds[-1] / ratio:.2f}]"
                else:
                    t_dense, t_fact = OrtTimer(min_rounds=args.rounds, max_rounds=args.rounds)([dense, model], feeds,
                                                                                                args.threads)
                    speed, spread = t_dense / t_fact, ""
                print(f"| {c}x{c}x{k}x{k} @ {size}x{size} | {fmt} | {','.join(map(str, facts[0].ranks))} | "
                      f"{ratio:.2f} | {t_dense:.3f} | {t_fact:.3f} | {speed:.2f}x ({speed / ratio:.2f}){spread} |",
                      flush=True)


if __name__ == "__main__":
    main()
