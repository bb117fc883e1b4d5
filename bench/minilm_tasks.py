"""Task metrics for all-MiniLM-L6-v2 and its rewritten versions: sentiment accuracy,
word-similarity correlations and agreement with the original's embeddings.

    .venv/bin/python bench/minilm_tasks.py [MODEL.onnx ...]         # original + these models
    .venv/bin/python bench/minilm_tasks.py --configs                # original + the default rewrites
    .venv/bin/python bench/minilm_tasks.py --configs svd-2x-aware "format=svd,ratio=4,fit=aware"

The original is exported with the legacy exporter into a temporary folder (or read from
--original). Every model must take ``input_ids`` and ``attention_mask`` (int64, batch x
sequence) and return ``sentence_embedding`` (mean pooled), as models/export.py writes it.

All text ships inside the gensim 4.4.0 wheel (``gensim/test/test_data``, read as latin-1):

Evaluation protocol (``evaluate``)
  * Sentiment: the 200 sentences of ``pang_lee_polarity.cor`` (100 ``__label__neg`` then
    100 ``__label__pos``; the label token is stripped). Each sentence is embedded on its
    own (dynamic padding; the attention mask keeps padding out of the mean), the
    embeddings are L2-normalised and classified by scikit-learn's
    ``LogisticRegression(C=1.0, max_iter=1000)`` (lbfgs, no feature scaling) under
    ``StratifiedKFold(5)`` without shuffling, in file order (each fold: 20 negative and
    20 positive sentences): ``sentiment`` is the mean test accuracy of the five folds.
    Deterministic, no seed involved. With 200 sentences one sentence is 0.005 and the
    fold split alone moves the figure by about +-0.02, so ``sentiment_rep`` also gives
    the mean over ``RepeatedStratifiedKFold(5, 10, random_state=0)`` (50 fits).
  * Word similarity: the 353 pairs of ``wordsim353.tsv`` and the 999 pairs of
    ``simlex999.txt`` (tab separated ``word1 word2 score``, ``#`` lines are comments).
    Each distinct word (1,341 in all) is embedded alone, exactly as written (the tokenizer
    lowercases; [CLS] and [SEP] are part of the mean), and ``wordsim`` / ``simlex`` are
    the Spearman correlations between the cosine similarity of the two words' embeddings
    and the human score, over all pairs.
  * Agreement with a reference model (the original): the cosine between this model's and
    the reference's embedding of each evaluation text, as mean and min over the 200
    sentences (``cos_sentences_mean/min``), over the 1,341 words (``cos_words_*``) and over
    both (``cos_all_*``, 1,541 texts).

On the original legacy export this gives sentiment 0.730, WordSim-353 0.729 and
SimLex-999 0.446 (sentiment_rep 0.728).

Calibration (``calibration_feeds``, ``LeeCalibrationReader``): sentences of
``lee_background.cor`` only, never an evaluation text. The file holds 300 news documents,
one per line; each is split into sentences after ``.``, ``!`` or ``?`` (and an optional
closing quote) followed by whitespace and an upper-case letter, a digit or an opening
quote, and sentences of fewer than 3 words are dropped (2,682 sentences; the first *n*
in document order are used). ``LeeCalibrationReader`` sorts them by token count and pads
each batch only to its longest sentence (truncated at *seq* tokens), so that the
calibration statistics come from real tokens, with little padding; ``calibration_feeds``
returns one dict padded to exactly *seq* tokens.

Words (``lee_words``, ``--calib-words N``): most evaluation texts are single words, which
news sentences represent badly ([CLS] and [SEP] are two of a single word's three or four
tokens). The first *N* distinct words of lee_background.cor in order of first appearance
(``[A-Za-z]`` runs with inner ``'`` or ``-``, as written) can be added as texts of their
own; every word that is also a WordSim/SimLex word (case-insensitively) is skipped, so
calibration and evaluation texts stay disjoint (6,648 words remain).

``compare_configs`` rewrites the original with each (label, kwargs for tnonnx.rewrite)
pair, calibrated on a fresh reader, and tabulates the metrics with the share of MatMul
parameters kept and the rewrite time. Named configs live in ``CONFIGS``; ``--configs``
also takes ad-hoc ``key=value,...`` specs.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUTPUT = "sentence_embedding"
MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers; no evaluation text reaches it
ENCODING = "latin-1"

# name -> kwargs for tnonnx.rewrite (calib and validate=False are added by compare_configs)
CONFIGS: dict[str, dict] = {
    "svd-2x-data-free": dict(format="svd", ratio=2, fit="data-free"),
    "svd-2x-aware": dict(format="svd", ratio=2, fit="aware"),
}
DEFAULT_CONFIGS = ("svd-2x-data-free", "svd-2x-aware")


# --------------------------------------------------------------------------- data files

def gensim_data(name: str) -> Path:
    """Path of a file in gensim's test/test_data folder (gensim is a bench extra)."""
    try:
        from gensim.test.utils import datapath
    except ImportError as e:
        raise RuntimeError("the MiniLM task data ships inside gensim: pip install gensim==4.4.0") from e
    return Path(datapath(name))


def read_polarity(path=None) -> tuple[list[str], np.ndarray]:
    """(sentences, labels) of pang_lee_polarity.cor: label 1 for ``__label__pos``, 0 for
    ``__label__neg``; the label token is removed from the text."""
    path = Path(path) if path is not None else gensim_data("pang_lee_polarity.cor")
    texts, labels = [], []
    for line in path.read_text(encoding=ENCODING).splitlines():
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            raise ValueError(f"{path.name}: line without a __label__pos/neg prefix: {line[:60]!r}")
        texts.append(text.strip())
        labels.append(1 if label == "__label__pos" else 0)
    return texts, np.array(labels, dtype=np.int64)


def read_word_pairs(name_or_path) -> list[tuple[str, str, float]]:
    """(word1, word2, human score) of wordsim353.tsv / simlex999.txt: tab separated,
    ``#`` lines are comments. A bare file name is looked up in gensim's test data."""
    path = Path(name_or_path)
    if not path.is_file() and len(path.parts) == 1:
        path = gensim_data(str(name_or_path))
    pairs = []
    for line in path.read_text(encoding=ENCODING).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 3:
            raise ValueError(f"{path.name}: expected 3 tab-separated fields: {line!r}")
        pairs.append((fields[0].strip(), fields[1].strip(), float(fields[2])))
    return pairs


_SENTENCE_END = re.compile(r"[.!?][\"']?\s+(?=[\"']?[A-Z0-9])")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Split at ``.``/``!``/``?`` (plus an optional closing quote) followed by whitespace and
    an upper-case letter, digit or opening quote; drop pieces of fewer than *min_words* words."""
    pieces, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        pieces.append(text[start:m.end()])
        start = m.end()
    pieces.append(text[start:])
    return [" ".join(p.split()) for p in pieces if len(p.split()) >= min_words]


def lee_text(path=None) -> str:
    """The text of lee_background.cor (gensim's copy unless *path* is given)."""
    path = Path(path) if path is not None else gensim_data("lee_background.cor")
    return path.read_text(encoding=ENCODING)


_WORD = re.compile(r"[A-Za-z](?:[A-Za-z'-]*[A-Za-z])?")


def lee_words(n: int | None = None, path=None, exclude=()) -> list[str]:
    """The first *n* distinct words (all with None) of lee_background.cor in order of first
    appearance, as written (letters, inner ``'`` and ``-``); words equal to one in
    *exclude* up to case are skipped (calibration passes the evaluation words)."""
    seen = {w.lower() for w in exclude}
    out = []
    for word in _WORD.findall(lee_text(path)):
        if word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
            if n is not None and len(out) >= n:
                break
    return out


def lee_sentences(n: int | None = None, path=None, min_words: int = 3) -> list[str]:
    """The first *n* sentences (all with None) of lee_background.cor, in document order."""
    out = []
    for doc in lee_text(path).splitlines():
        out.extend(split_sentences(doc, min_words))
        if n is not None and len(out) >= n:
            break
    return out if n is None else out[:n]


# --------------------------------------------------------------------------- tokenising

@lru_cache(maxsize=1)
def default_tokenizer():
    from models.export import load_minilm

    return load_minilm()[0]


def tokenize(tokenizer, texts, max_length: int, padding="longest") -> dict[str, np.ndarray]:
    enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def calibration_feeds(tokenizer, n: int = 512, seq: int = 128) -> dict[str, np.ndarray]:
    """The first *n* lee_background sentences as one feed dict, padded (and truncated) to
    exactly *seq* tokens; tnonnx.rewrite splits it into chunks of 64."""
    return tokenize(tokenizer, lee_sentences(n), seq, padding="max_length")


class LeeCalibrationReader:
    """onnxruntime.quantization-style reader over the first *n* lee_background sentences
    (and the first *words* of its words, each a text of its own):
    ``get_next()`` returns a feed dict (``input_ids``, ``attention_mask``, int64) of up
    to *batch* texts, or None when they are exhausted. Texts are sorted by token
    count and each batch is padded to its longest one (truncated at *seq*), which keeps
    padding rows out of the calibration statistics as far as possible. ``rewind()``
    starts over."""

    def __init__(self, tokenizer=None, n: int | None = 512, seq: int = 128, batch: int = 32, sentences=None,
                 words: int = 0):
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
        self.sentences = list(sentences) if sentences is not None else lee_sentences(n)
        if words:
            self.sentences += lee_words(words, exclude=evaluation_data()["words"])
        self.seq, self.batch = seq, batch
        lengths = [len(ids) for ids in self.tokenizer(self.sentences, truncation=True, max_length=seq)["input_ids"]]
        self._order = np.argsort(lengths, kind="stable")
        self._pos = 0

    def __len__(self) -> int:
        return -(-len(self.sentences) // self.batch)

    def rewind(self) -> None:
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.sentences):
            return None
        idx = self._order[self._pos:self._pos + self.batch]
        self._pos += self.batch
        return tokenize(self.tokenizer, [self.sentences[i] for i in idx], self.seq)


# --------------------------------------------------------------------------- metrics

def spearman(x, y) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)).statistic)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(den, 1e-30)


def sentiment_accuracy(embeddings: np.ndarray, labels: np.ndarray, repeats: int = 0, seed: int = 0) -> float:
    """Mean test accuracy of logistic regression on L2-normalised embeddings:
    ``StratifiedKFold(5)`` in the given order (repeats=0), or the mean over
    ``RepeatedStratifiedKFold(5, repeats, random_state=seed)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold, cross_val_score

    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    cv = StratifiedKFold(5) if repeats == 0 else RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats,
                                                                          random_state=seed)
    return float(cross_val_score(LogisticRegression(C=1.0, max_iter=1000), x, labels, cv=cv).mean())


def pair_correlation(pairs, vectors: dict[str, np.ndarray]) -> float:
    """Spearman correlation between cosine(word1, word2) and the human scores."""
    a = np.stack([vectors[w1] for w1, _, _ in pairs])
    b = np.stack([vectors[w2] for _, w2, _ in pairs])
    return spearman(cosines(a, b), [s for _, _, s in pairs])


# --------------------------------------------------------------------------- evaluation

@lru_cache(maxsize=1)
def evaluation_data() -> dict:
    texts, labels = read_polarity()
    wordsim, simlex = read_word_pairs("wordsim353.tsv"), read_word_pairs("simlex999.txt")
    words = sorted({w for pairs in (wordsim, simlex) for w1, w2, _ in pairs for w in (w1, w2)})
    return {"sentences": texts, "labels": labels, "wordsim": wordsim, "simlex": simlex, "words": words}


def embed(model, texts, tokenizer=None, batch: int = 64, session=None) -> np.ndarray:
    """Sentence embeddings of *texts* (batches of similar length, dynamic padding), in
    the order given."""
    from tnonnx import runtime

    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    sess = session if session is not None else runtime.session(model)
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in range(0, len(texts), batch):
        idx = order[start:start + batch]
        (emb,) = sess.run([OUTPUT], tokenize(tokenizer, [texts[i] for i in idx], MAX_TOKENS))
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=emb.dtype)
        out[idx] = emb
    return out


def embed_all(model, tokenizer=None) -> dict[str, np.ndarray]:
    """{"sentences": 200 x d, "words": 1341 x d} for the evaluation texts."""
    from tnonnx import runtime

    data = evaluation_data()
    sess = runtime.session(model)
    return {"sentences": embed(model, data["sentences"], tokenizer, 32, sess),
            "words": embed(model, data["words"], tokenizer, 256, sess)}


def evaluate(model, reference_embeddings=None, tokenizer=None, repeats: int = 10) -> dict:
    """Task metrics of *model* (path or ModelProto); see the module docstring.

    *reference_embeddings*: ``embed_all(original)`` or a previous ``evaluate`` result
    (its ``"embeddings"``); with it, the cosine agreement metrics are filled in (else
    None). The returned dict holds floats, and the embeddings under ``"embeddings"``.
    """
    started = time.perf_counter()
    data = evaluation_data()
    emb = embed_all(model, tokenizer)
    vectors = dict(zip(data["words"], emb["words"]))
    result = {
        "sentiment": sentiment_accuracy(emb["sentences"], data["labels"]),
        "sentiment_rep": sentiment_accuracy(emb["sentences"], data["labels"], repeats=repeats) if repeats else None,
        "wordsim": pair_correlation(data["wordsim"], vectors),
        "simlex": pair_correlation(data["simlex"], vectors),
    }
    ref = reference_embeddings
    if ref is not None and "embeddings" in ref:
        ref = ref["embeddings"]
    for part in ("sentences", "words", "all"):
        cos = None
        if ref is not None:
            cos = (cosines(emb[part], ref[part]) if part != "all" else
                   cosines(np.concatenate([emb["sentences"], emb["words"]]),
                           np.concatenate([ref["sentences"], ref["words"]])))
        result[f"cos_{part}_mean"] = float(cos.mean()) if cos is not None else None
        result[f"cos_{part}_min"] = float(cos.min()) if cos is not None else None
    result["seconds"] = time.perf_counter() - started
    result["embeddings"] = emb
    return result


# --------------------------------------------------------------------------- model size

def model_params(model) -> tuple[int, int]:
    """(parameters, serialised bytes) of a model: float initializers and Constants."""
    import tnonnx

    totals = tnonnx.inspect(model).totals
    return totals.params_before, totals.bytes_before


def matmul_params(model) -> int:
    """Parameters of the MatMul/Gemm layers with a constant weight (tnonnx's candidates)."""
    import tnonnx

    return sum(r.params_before for r in tnonnx.inspect(model).rows if r.reason is None)


# --------------------------------------------------------------------------- comparisons

def parse_config(spec: str) -> tuple[str, dict]:
    """A CONFIGS name, or ``key=value,key=value`` (values as Python literals where they
    parse, else strings): (label, kwargs)."""
    if spec in CONFIGS:
        return spec, dict(CONFIGS[spec])
    if "=" not in spec:
        raise ValueError(f"unknown config {spec!r}: choose from {', '.join(CONFIGS)} or give key=value,...")
    kwargs = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "ops":  # ops=MatMul|Gemm|Gather: commas separate the items here
            value = repr(value.replace("|", ","))
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return spec, kwargs


def export_original(folder) -> Path:
    from models.export import export_minilm

    return export_minilm(Path(folder) / "minilm.onnx", dynamo=False, verify=False)


def _model_row(label: str, model, reference: dict, original_totals: tuple[int, int], original_matmul: int,
               tokenizer) -> dict:
    """A table row for a model given as a file or proto: MatMul parameters kept estimated as
    (its parameters - the original's non-MatMul parameters) / the original's MatMul ones."""
    metrics = evaluate(model, reference, tokenizer)
    params, size = model_params(model)
    kept = (params - (original_totals[0] - original_matmul)) / original_matmul
    return {"label": label, "kept": kept, "params": params, "bytes": size, "rewrite_s": None, **metrics}


def compare_configs(configs, *, original=None, models=(), n_calib: int | None = 512, n_words: int = 0, seq: int = 128,
                    batch: int = 32, tokenizer=None, log=None) -> list[dict]:
    """Rewrite the original MiniLM with each ``(label, kwargs)`` (or CONFIGS name, or
    key=value spec) and evaluate it; also evaluate the ONNX files in *models*. Returns the
    rows, the original's first (``format_table`` prints them).

    Each rewrite is ``tnonnx.rewrite(original, **kwargs, calib=LeeCalibrationReader(n_calib,
    seq, batch, words=n_words), validate=False)`` (kwargs may override calib/validate). "kept" is
    sum(params_after) / sum(params_before) over the rewritten layers; "rewrite_s" the time
    of the rewrite call. A config that fails gets a row with its error.
    """
    import tnonnx

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    with tempfile.TemporaryDirectory(prefix="minilm-tasks-") as tmp:
        path = Path(original) if original is not None else export_original(tmp)
        reference = evaluate(path, tokenizer=tokenizer)
        reference.update({f"cos_{p}_{s}": 1.0 for p in ("sentences", "words", "all") for s in ("mean", "min")})
        totals, mm = model_params(path), matmul_params(path)
        rows = [{"label": "original", "kept": 1.0, "params": totals[0], "bytes": totals[1], "rewrite_s": None,
                 **reference}]
        log(f"original: {_summary(rows[0])}")
        for model in models:
            rows.append(_model_row(str(model), model, reference, totals, mm, tokenizer))
            log(f"{model}: {_summary(rows[-1])}")
        for config in configs:
            label, kwargs = parse_config(config) if isinstance(config, str) else (config[0], dict(config[1]))
            kwargs.setdefault("calib", LeeCalibrationReader(tokenizer, n=n_calib, seq=seq, batch=batch,
                                                           words=n_words))
            kwargs.setdefault("validate", False)
            started = time.perf_counter()
            try:
                new, report = tnonnx.rewrite(path, **kwargs)
            except Exception as exc:  # a config not supported (yet) should not sink the table
                rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
                log(f"{label}: failed: {rows[-1]['error']}")
                continue
            seconds = time.perf_counter() - started
            done = report.rewritten
            kept = sum(r.params_after for r in done) / sum(r.params_before for r in done)
            metrics = evaluate(new, reference, tokenizer)
            rows.append({"label": label, "kept": kept, "params": report.totals.params_after,
                         "bytes": new.ByteSize(), "rewrite_s": seconds, "rewritten": len(done),
                         "stages": dict(report.stages), **metrics})
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.stages.items())
            log(f"{label}: {_summary(rows[-1])}; rewrite {seconds:.1f} s ({stages})")
    return rows


def _summary(row: dict) -> str:
    return (f"params {row['params']:,}, kept {row['kept']:.3f}, cos {row['cos_all_mean']:.4f}, sentiment {row['sentiment']:.3f}, "
            f"wordsim {row['wordsim']:.3f}, simlex {row['simlex']:.3f} ({row['seconds']:.1f} s to evaluate)")


def format_table(rows: list[dict]) -> str:
    """Markdown table of compare_configs rows."""
    head = ("| model | MatMul params kept | size MB | rewrite s | cos sentences mean / min | cos all mean / min | "
            "sentiment (5-fold) | sentiment (10x5) | WordSim-353 | SimLex-999 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | n/a: {r['error']} |" + " |" * 8)
            continue
        rewrite = f"{r['rewrite_s']:.1f}" if r.get("rewrite_s") is not None else "-"
        rep = f"{r['sentiment_rep']:.3f}" if r.get("sentiment_rep") is not None else "-"
        lines.append(
            f"| {r['label']} | {r['kept']:.3f} | {r['bytes'] / 1e6:.1f} | {rewrite} | "
            f"{r['cos_sentences_mean']:.4f} / {r['cos_sentences_min']:.4f} | "
            f"{r['cos_all_mean']:.4f} / {r['cos_all_min']:.4f} | {r['sentiment']:.3f} | {rep} | "
            f"{r['wordsim']:.3f} | {r['simlex']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="ONNX files to evaluate beside the original")
    parser.add_argument("--original", default=None, help="an existing legacy export of MiniLM (else exported)")
    parser.add_argument("--configs", nargs="*", default=None,
                        help=f"rewrite configs: names ({', '.join(CONFIGS)}) or key=value,... specs; "
                             f"no value: {' '.join(DEFAULT_CONFIGS)}")
    parser.add_argument("--calib", type=int, default=512,
                        help="calibration sentences of lee_background.cor (the first N; 0: all 2,682)")
    parser.add_argument("--calib-words", type=int, default=0,
                        help="also calibrate on the first N distinct words of lee_background.cor, each alone "
                             "(evaluation words excluded; 6,648 in all)")
    parser.add_argument("--seq", type=int, default=128, help="calibration truncation length (tokens)")
    args = parser.parse_args(argv)
    configs = [] if args.configs is None else (args.configs or list(DEFAULT_CONFIGS))
    rows = compare_configs(configs, original=args.original, models=args.models, n_calib=args.calib or None,
                           n_words=args.calib_words, seq=args.seq)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
