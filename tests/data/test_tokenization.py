"""Tokenizers fitted on the training split: words and WordPiece ids (0 pad, 1 out of
vocabulary), padding to the batch's longest document, truncation counted."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tensorflow as tf

from lmt_tf.data.splits import Split, Splits
from lmt_tf.data.text import documents
from lmt_tf.data.tokenization import (
    OOV,
    PAD,
    RESERVED,
    Tokenizer,
    tokenize_layer,
    trimmed,
)
from lmt_tf.errors import ConfigError

# Four topics, each with its own words, and words every topic shares. No document holds
# the letters j, q, x or z, nor any punctuation.
TOPICS = (("shares", "stock", "dividend", "profit"), ("oil", "crude", "barrel", "opec"),
          ("wheat", "grain", "corn", "harvest"), ("bank", "interest", "rates", "money"))
SHARED = ("the", "said", "company", "market", "year", "pct", "reuters")
SEQUENCE = 32  # tokens the tests' tokenizers keep


def corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` documents of 3 to 60 words, half of them their topic's, and their topics."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(TOPICS), n)
    docs = []
    for label in labels:
        length = int(rng.integers(3, 61))
        own = rng.random(length) < 0.5
        words = [TOPICS[label][rng.integers(4)] if mine else SHARED[rng.integers(len(SHARED))]
                 for mine in own]
        docs.append(" ".join(words))
    return documents(docs), labels.astype(np.int64)


def text_splits(n: int = 320, seed: int = 0) -> Splits:
    """A train/validation/test split (80/10/10) of ``corpus(n)``."""
    x, y = corpus(n, seed)
    a, b = int(0.8 * n), int(0.9 * n)
    return Splits("topics", Split(x[:a], y[:a]), Split(x[a:b], y[a:b]), Split(x[b:], y[b:]),
                  len(TOPICS), class_names=tuple(t[0] for t in TOPICS)).validate()


def fitted(kind: str, docs: np.ndarray | None = None, **settings) -> dict:
    """The fitted step of a ``kind`` tokenizer on ``docs`` (the corpus' training split)."""
    if docs is None and not settings:
        return _fitted_on_corpus(kind)
    train = text_splits().train.x if docs is None else docs
    settings = {"vocabulary_size": 200, "sequence_length": SEQUENCE, **settings}
    return Tokenizer(kind=kind, **settings).fit(train, {"train": train})


@functools.cache
def _fitted_on_corpus(kind: str) -> dict:  # (read only)
    return fitted(kind, text_splits().train.x)


def ids(step: dict, docs: list[str]) -> np.ndarray:
    return tokenize_layer(step)(tf.constant(docs)).numpy()


def pieces(step: dict, row: np.ndarray) -> list[str]:
    vocabulary = [*RESERVED, *step["vocabulary"]]
    return [vocabulary[i] for i in row if i != PAD]


def test_wordpiece_round_trip_on_known_words() -> None:
    step = fitted("wordpiece")
    words = ["the", "crude", "oil", "market", "said", "profit"]
    (row,) = ids(step, [" ".join(words)])
    assert (row >= 2).all()  # neither padding nor [UNK]
    assert pieces(step, row) == words  # each frequent word is one piece
    # The vocabulary: [PAD], [UNK], every character (first and ##) and then the pieces.
    assert len(step["vocabulary"]) + 2 <= 200
    assert {"s", "##s", "crude", "market"} <= set(step["vocabulary"])


def test_an_unseen_word_splits_into_known_pieces_not_unk() -> None:
    step = fitted("wordpiece")
    assert "oilbarrelmoney" not in step["vocabulary"]
    (row,) = ids(step, ["oilbarrelmoney"])
    split = pieces(step, row)
    assert len(split) > 1 and OOV not in row
    assert split[0] + "".join(p.removeprefix("##") for p in split[1:]) == "oilbarrelmoney"
    assert all(p.startswith("##") for p in split[1:])
    # A character the training split never held cannot be pieced: the word is [UNK].
    assert ids(step, ["oil jazz"]).tolist() == [[ids(step, ["oil"])[0, 0], OOV]]
    # Words: no pieces; the unseen word is out of vocabulary.
    assert ids(fitted("words"), ["oilbarrelmoney"]).tolist() == [[OOV]]


@pytest.mark.parametrize("kind", ["words", "wordpiece"])
def test_the_vocabulary_comes_from_the_training_split_only(kind: str) -> None:
    train = documents(["stock market said"] * 12)
    step = Tokenizer(kind=kind, vocabulary_size=100).fit(
        train, {"train": train, "test": documents(["harvest"])})
    assert "harvest" not in step["vocabulary"] and "stock" in step["vocabulary"]
    assert OOV in ids(step, ["harvest"])[0]  # words: the word; wordpiece: h, v are unseen


@pytest.mark.parametrize("kind", ["words", "wordpiece"])
def test_ids_pad_to_the_longest_document_and_truncation_is_counted(kind: str) -> None:
    splits = text_splits()
    step = fitted(kind)
    out = ids(step, ["oil crude", "the " * 5 + "bank", "wheat " * 50])
    assert out.shape == (3, SEQUENCE)  # the longest, truncated to the sequence length
    assert (out[0, 2:] == PAD).all() and (out[0, :2] > OOV).all()
    assert (out[1, :6] > OOV).all() and (out[1, 6:] == PAD).all()
    assert (out[2] == out[2, 0]).all()  # wheat, 32 times
    assert ids(step, ["oil crude", "bank"]).shape == (2, 2)  # no longer than needed
    words = np.array([len(d.split()) for d in splits.train.x])
    assert 0 < step["truncated"]["train"] == int(np.sum(words > SEQUENCE))  # a word a piece
    assert step["documents"] == {"train": len(splits.train)}


def test_wordpiece_standardization() -> None:
    docs = text_splits().train.x
    stripped = fitted("wordpiece", standardize="lower_and_strip_punctuation")
    assert ids(stripped, ["Crude, OIL!"]).tolist() == ids(stripped, ["crude oil"]).tolist()
    lowered = fitted("wordpiece", docs, standardize="lower")
    # Punctuation is kept as its own tokens ([UNK]: the training split has none).
    assert ids(lowered, ["Crude, OIL!"]).tolist() == [
        [*ids(lowered, ["crude"])[0], OOV, *ids(lowered, ["oil"])[0], OOV]]
    cased = fitted("wordpiece", documents([d.replace("oil", "Oil") for d in docs]),
                   standardize="none")
    assert "Oil" in cased["vocabulary"] and "oil" not in cased["vocabulary"]


def test_a_vocabulary_too_small_for_the_characters_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"Tokenizer.vocabulary_size 20 is too small for "
                                          r"wordpiece: the training words hold \d+ "
                                          r"characters, which need \d+ ids"):
        fitted("wordpiece", vocabulary_size=20)


def test_a_vocabulary_over_the_size_loses_its_rarest_pieces_not_characters() -> None:
    # As the learner orders them: characters, then pieces by count (a ## character it
    # had to add, unseen as a continuation, comes last with count 1).
    learned = ["a", "b", "##a", "banana", "an", "##na", "ab", "##b"]
    assert trimmed(learned, 6) == ["a", "b", "##a", "##b", "banana", "an"]
    assert trimmed(learned, 8) == learned


def test_the_layer_rebuilds_from_its_config() -> None:
    step = fitted("wordpiece")
    layer = tokenize_layer(step, name="preprocess_tokenize")
    copy = type(layer).from_config(layer.get_config())
    docs = tf.constant(["oilbarrel said", "the bank"])
    np.testing.assert_array_equal(layer(docs).numpy(), copy(docs).numpy())
    assert copy.get_config()["vocabulary"] == step["vocabulary"]


def test_tf_idf_equals_scikit_learns_sublinear_tf_idf() -> None:
    """The bag of words in the model weighs each word as scikit-learn's
    TfidfVectorizer(sublinear_tf=True) does, fitted on the training documents only."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from lmt_tf.data.text import documents
    from lmt_tf.data.tokenization import Tokenizer, tokenize_layer

    train = documents(["a b b c", "c d", "a a a e", "b e e"])
    step = Tokenizer(kind="tf_idf", vocabulary_size=10).fit(train, {"train": train})
    reference = TfidfVectorizer(sublinear_tf=True, vocabulary=step["vocabulary"],
                                token_pattern=r"\S+").fit(list(train))
    new = ["a b b c", "e e e d z"]  # z: not in the vocabulary
    ours = tokenize_layer(step)(np.array(new, dtype=object).astype(bytes)).numpy()
    assert ours[:, 0].tolist() == [0.0, 0.0]  # the out-of-vocabulary column weighs nothing
    np.testing.assert_allclose(ours[:, 1:], reference.transform(new).toarray(), atol=1e-6)
