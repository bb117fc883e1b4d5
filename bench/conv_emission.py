"""Latency of factorised convolutions (channel SVD, Tucker-2, CP) against the dense Conv
they replace, in ONNX Runtime (CPU), at ranks that are multiples of the SIMD width:

    .venv/bin/python bench/conv_emission.py                 # 2 threads
    .venv/bin/python bench/conv_emission.py --threads 1 --rounds 9

Each layer is a one-layer model (input 1 x C x H x W), emitted exactly as `tnonnx rewrite`
emits it, timed with tnonnx.latency.OrtTimer (the planner's timer: interleaved with the
dense Conv, sessions that do not spin, medians). The table gives ms, the speed-up over
dense, the MAC ratio (dense MACs / factorised MACs) and the fraction of the MAC-ratio
speed-up reached. Outputs are checked against the factorisation's own dense kernel.
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

from tnonnx import runtime  # noqa: E402
from tnonnx.emit import Builder, conv_node  # noqa: E402
from tnonnx.formats import FORMATS, ConvGeometry, RankSpec  # noqa: E402
from tnonnx.latency import OrtTimer  # noqa: E402

# (channels in = out, spatial size, kernel): ResNet-style 3x3 stages at batch 1
LAYERS = [(64, 56, 3), (128, 28, 3), (256, 14, 3)]
FORMATS_RANKS = [("svd", (16, 32, 64)), ("tucker", (16, 32)), ("cp", (32, 64))]


def conv_model(build, channels: int, size: int):
    b = Builder("layer", np.float32, np.float32)
    build(b, "x")
    b.rename_output("y")
    graph = helper.make_graph(b.nodes, "layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} intra-op threads, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; medians of {args.rounds} interleaved rounds\n")
    print("| layer | format | ranks | MAC ratio | dense ms | factorised ms | speed-up (of MAC ratio) |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for c, size, k in LAYERS:
        kernel = rng.standard_normal((c, c, k, k)).astype(np.float32) / np.sqrt(c * k * k)
        attrs = {"pads": [k // 2] * 4}
        geometry = ConvGeometry((k, k), attrs, (size, size), (size, size))
        dense = conv_model(lambda b, x: conv_node(b, x, kernel, "conv", attrs=dict(attrs, kernel_shape=[k, k]),
                                                  output="y"), c, size)
        feeds = {"x": rng.standard_normal((1, c, size, size)).astype(np.float32)}
        dense_macs = c * c * k * k * size * size
        for fmt, ranks in FORMATS_RANKS:
            for rank in ranks:
                fact = FORMATS[fmt].fit_conv(kernel.astype(np.float64), RankSpec(rank=rank))
                model = conv_model(lambda b, x: fact.emit(b, x, geometry, None, "y"), c, size)
                want = runtime.session(conv_model(
                    lambda b, x: conv_node(b, x, fact.to_dense().astype(np.float32), "conv",
                                           attrs=dict(attrs, kernel_shape=[k, k]), output="y"), c, size)).run(None, feeds)[0]
                got = runtime.session(model).run(None, feeds)[0]
                np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
                t_dense, t_fact = OrtTimer(min_rounds=args.rounds, max_rounds=args.rounds)([dense, model], feeds,
                                                                                            args.threads)
                ratio = dense_macs / fact.macs(geometry)
                speed = t_dense / t_fact
                print(f"| {c}x{c}x{k}x{k} @ {size}x{size} | {fmt} | {','.join(map(str, fact.ranks))} | {ratio:.2f} | "
                      f"{t_dense:.3f} | {t_fact:.3f} | {speed:.2f}x ({speed / ratio:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
