"""Vocabulary and image-level labels from captions, including images whose captions have no vocabulary word."""
import numpy as np
import pytest

from glied.errors import InputError
from glied.extractors.mil.vocab import STOPWORDS, build_labels, build_vocab, image_label

CAPS = [
    [["a", "red", "circle"], ["a", "circle", "that", "is", "red"]],
    [["a", "blue", "square", "on", "a", "background"]],
    [["two", "red", "squares"]],
]


def test_vocab_most_frequent_first_with_function_words_and_ties_alphabetical():
    v = build_vocab(CAPS, 4)
    # counts: a 4, red 3, circle 2, then 1-count words tie -> alphabetical: background, blue, ...
    assert v == ["a", "red", "circle", "background"]
    assert build_vocab(CAPS, 1000)[:3] == ["a", "red", "circle"]
    assert len(build_vocab(CAPS, 1000)) == len({w for c in CAPS for s in c for w in s})


def test_vocab_stopword_switch_and_min_count():
    v = build_vocab(CAPS, 1000, stopwords=True)
    assert "a" not in v and "on" not in v and "is" not in v and "red" in v
    assert not set(v) & STOPWORDS
    assert build_vocab(CAPS, 1000, min_count=2) == ["a", "red", "circle"]
    with pytest.raises(InputError):
        build_vocab([[], [[]]], 10)


def test_label_is_union_over_all_captions():
    vocab = ["a", "red", "circle", "square", "is"]
    wtoi = {w: i for i, w in enumerate(vocab)}
    assert image_label(CAPS[0], wtoi) == [0, 1, 2, 4]  # "is" only in the second caption
    ls = build_labels(CAPS, vocab)
    assert ls.keep == [0, 1, 2]
    np.testing.assert_array_equal(ls.labels, [[1, 1, 1, 0, 1], [1, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    assert ls.labels.dtype == np.uint8


def test_images_without_vocabulary_words_or_captions_are_handled_explicitly():
    caps = [[["a", "red", "circle"]], [["zebra", "crossing"]], [], [[]], [["red"]]]
    vocab = ["a", "red", "circle"]
    kept = build_labels(caps, vocab, empty_policy="keep")
    assert kept.no_vocab_word == [1] and kept.no_captions == [2, 3]
    assert kept.keep == [0, 1, 4]
    np.testing.assert_array_equal(kept.labels[1], [0, 0, 0])  # all-negative example
    dropped = build_labels(caps, vocab, empty_policy="drop")
    assert dropped.keep == [0, 4] and dropped.no_vocab_word == [1] and dropped.no_captions == [2, 3]
    assert dropped.labels.shape == (2, 3)
    with pytest.raises(ValueError):
        build_labels(caps, vocab, empty_policy="ignore")


def test_word_metrics_ap_and_top_k():
    from glied.extractors.mil.evaluate import word_metrics

    vocab = ["a", "b", "c"]
    labels = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0]])
    probs = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.1], [0.7, 0.2, 0.3]])
    m = word_metrics(probs, labels, vocab, top_ks=(1, 2, 10), subsets={"s": ["b", "c"]})
    assert m["ap"] == {"a": 1.0, "b": 1.0} and m["words_without_positives"] == ["c"]
    assert m["mAP"] == 1.0 and m["subsets"]["s"] == {"mAP": 1.0, "n_words": 1, "missing": ["c"]}
    assert m["at_k"]["1"] == {"precision": 1.0, "recall": pytest.approx((1 + 0.5 + 1) / 3)}
    assert m["at_k"]["2"]["precision"] == pytest.approx((1 + 2 + 1) / 6)
    assert set(m["at_k"]) == {"1", "2", "3"}  # k capped at the vocabulary size
