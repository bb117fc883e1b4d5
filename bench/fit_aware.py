"""Data-free against data-aware (whitened) SVD on all-MiniLM-L6-v2 keeping 50% of the
MatMul parameters (--ratio 2 on every rewritten layer): mean cosine of the sentence
embeddings to the original's on held-out sentences.

    .venv/bin/python bench/fit_aware.py [--calib 256] [--eval 128] [--seq 64]

Calibration: the first --calib sentences of gensim's lee_background.cor; evaluation: the
--eval sentences after them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

import tnonnx  # noqa: E402
from formats import lee_sentences  # noqa: E402
from tnonnx.validate import run  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)
    from models.export import export_minilm, load_minilm

    tokenizer, _ = load_minilm()
    sentences = lee_sentences(args.calib + args.eval)

    def feeds(texts):
        enc = tokenizer(texts, padding="max_length", max_length=args.seq, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

    calib, held_out = feeds(sentences[:args.calib]), feeds(sentences[args.calib:])
    with tempfile.TemporaryDirectory() as tmp:
        path = export_minilm(Path(tmp) / "minilm.onnx", dynamo=False, verify=False)
        reference = run(path, [held_out])["sentence_embedding"]
        print("| fit | MatMul params kept | mean cosine | min cosine |")
        print("|---|---|---|---|")
        for fit in ("data-free", "aware"):
            small, report = tnonnx.rewrite(path, format="svd", ratio=2, fit=fit, calib=calib, validate=False)
            emb = run(small, [held_out])["sentence_embedding"]
            cos = np.sum(emb * reference, 1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(reference, axis=1)
            kept = sum(r.params_after for r in report.rewritten) / sum(r.params_before for r in report.rewritten)
            print(f"| {fit} | {kept:.3f} | {cos.mean():.4f} | {cos.min():.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
