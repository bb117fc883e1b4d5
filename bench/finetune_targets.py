"""Fine-tuning MiniLM with the original's hidden tensors stored against recomputed per step:
seconds per stage of `tnonnx.finetune.finetune` (2 epochs, bf16) on all 2,682 lee_background
sentences, after a `--budget 2x --ops MatMul --fit aware` svd rewrite.

    .venv/bin/python bench/finetune_targets.py recompute fp16 fp32

Variants (run in this order in one process, each on a fresh copy of the rewrite):
``recompute`` one onnxruntime run of the original per step for the hidden targets (the
memory share set to 0); ``fp16`` the targets stored in float16 (the default); ``fp32`` stored
as float32. The relative output errors before and after are printed too: the variants must
train alike.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minilm_tasks as mt  # noqa: E402

import tnonnx  # noqa: E402
from tnonnx import finetune as ft  # noqa: E402
from tnonnx.graph import find_layers  # noqa: E402


def main(variants) -> None:
    original = onnx.load("build/minilm.onnx")
    reader = mt.LeeCalibrationReader(n=None, seq=128, batch=32)
    batches = []
    while (feeds := reader.get_next()) is not None:
        batches.append(feeds)
    new, _ = tnonnx.rewrite(original, format="svd", budget=2, ops="MatMul", fit="aware", timing=False,
                            validate=False, calib=mt.LeeCalibrationReader(n=None, seq=128, batch=32))
    trainable = {t.name for t in new.graph.initializer} - {t.name for t in original.graph.initializer}
    hidden = list(dict.fromkeys(layer.x for layer in find_layers(original) if layer.kind == "dense"))
    compact, teacher, share = ft._compact, ft._teacher, ft.HIDDEN_MEMORY_SHARE
    for label in variants:
        ft.HIDDEN_MEMORY_SHARE = 0.0 if label == "recompute" else share
        ft._compact = (lambda t: (t, t.square().sum())) if label == "fp32" else compact
        model = onnx.ModelProto()
        model.CopyFrom(new)
        stamps = [time.perf_counter()]

        def stamped(*args):
            out = teacher(*args)
            stamps.append(time.perf_counter())
            return out

        ft._teacher = stamped
        errors = ft.finetune(model, original, batches, trainable, epochs=2, hidden=hidden, precision="bf16",
                             log=lambda _: stamps.append(time.perf_counter()))
        end = time.perf_counter()
        d = [b - a for a, b in zip(stamps, stamps[1:])]
        print(f"{label}: teacher {d[0]:.1f} s, epoch 1 (with the error before) {d[1]:.1f} s, epoch 2 {d[2]:.1f} s, "
              f"error after {end - stamps[-1]:.1f} s, total {end - stamps[0]:.1f} s; errors {errors[0]:.4f} -> "
              f"{errors[1]:.4f}", flush=True)
    ft._compact, ft._teacher, ft.HIDDEN_MEMORY_SHARE = compact, teacher, share


if __name__ == "__main__":
    main(sys.argv[1:] or ["recompute", "fp16"])
