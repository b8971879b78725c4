"""Tokenization inside the model: a vocabulary fitted on the training split only, and a
Keras layer that turns raw documents (strings) into token ids. So the SavedModel, the
MLflow model and ``mlflow models serve`` take raw text, and nothing is fitted twice.

Ids: 0 pads, 1 is the out-of-vocabulary token, the vocabulary follows. A batch is
padded to its longest document (at most ``sequence_length`` tokens; longer ones are
truncated, and counted when the tokenizer is fitted): batches of documents of similar
length (``InputConfig.bucket_by_length``) carry fewer padded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range, check_types
from lmt_tf.errors import ConfigError

TOKENIZERS = ("words", "tf_idf")
STANDARDIZE = ("lower_and_strip_punctuation", "lower", "strip_punctuation", "none")
PAD, OOV = 0, 1  # the ids of padding and of a token outside the vocabulary


@dataclass
class Tokenizer:
    """How documents become token ids, fitted on the training split."""

    # words: whitespace-separated words after standardization (Keras TextVectorization),
    # a sequence of ids; tf_idf: a bag of those words, one vector per document
    # (sublinear term frequency times inverse document frequency, L2-normalised)
    kind: Annotated[str, OneOf(*TOKENIZERS)] = "words"
    # ids in all, padding and out-of-vocabulary included (the embedding table's rows)
    vocabulary_size: Annotated[int, Range(ge=3)] = 20_000
    # tokens kept of each document; longer documents are truncated (and counted)
    sequence_length: Annotated[int, Range(ge=1)] = 256
    # what is done to the text before it is split
    standardize: Annotated[str, OneOf(*STANDARDIZE)] = "lower_and_strip_punctuation"

    def __post_init__(self) -> None:
        check_types(self)

    def fit(self, train: np.ndarray, splits: dict[str, np.ndarray]) -> dict[str, Any]:
        """The fitted step: the vocabulary learned from ``train`` (documents), and how
        many documents of each split in ``splits`` the sequence length truncates.

        Raises:
          ConfigError: if the training documents yield no token.
        """
        vectorizer = keras.layers.TextVectorization(
            max_tokens=self.vocabulary_size,
            standardize=None if self.standardize == "none" else self.standardize,
            output_mode="int")
        vectorizer.adapt(tf.data.Dataset.from_tensor_slices(train.astype(bytes)).batch(1024))
        # Ids 0 and 1 are padding and out-of-vocabulary; then words by frequency.
        vocabulary = [str(w) for w in vectorizer.get_vocabulary()[2:]]
        if not vocabulary:
            raise ConfigError(f"Tokenizer: the {len(train):,} training documents hold no "
                              f"word")
        if self.kind == "tf_idf":
            return {"kind": "tokenize", "how": self.kind, "vocabulary": vocabulary,
                    "standardize": self.standardize,
                    "idf": _inverse_document_frequency(vectorizer, train)}
        step = {"kind": "tokenize", "how": self.kind, "vocabulary": vocabulary,
                "sequence_length": self.sequence_length, "standardize": self.standardize}
        layer = Tokenize(vocabulary, self.sequence_length, self.standardize)
        step["truncated"] = {part: int(np.sum(layer.lengths(docs) > self.sequence_length))
                             for part, docs in splits.items()}
        step["documents"] = {part: len(docs) for part, docs in splits.items()}
        return step


def _inverse_document_frequency(vectorizer: keras.layers.TextVectorization,
                                train: np.ndarray, batch: int = 1024) -> list[float]:
    """Each vocabulary word's smoothed inverse document frequency in ``train``,
    ln((1 + n) / (1 + df)) + 1 (scikit-learn's ``TfidfVectorizer`` default)."""
    df = np.zeros(vectorizer.vocabulary_size(), np.int64)
    for start in range(0, len(train), batch):
        ids = vectorizer(tf.constant(train[start:start + batch].astype(bytes)))
        for row in ids.numpy():
            df[np.unique(row)] += 1
    idf = np.log((1 + len(train)) / (1 + df[2:])) + 1
    return [round(float(v), 6) for v in idf]


def layer_of(step: dict[str, Any], name: str) -> keras.layers.Layer:
    """The Keras layer that applies a fitted tokenizer ``step``."""
    if step["how"] == "tf_idf":
        return BagOfWords(step["vocabulary"], step["idf"], step["standardize"], name=name)
    return Tokenize(step["vocabulary"], step["sequence_length"], step["standardize"],
                    name=name)


def describe(step: dict[str, Any]) -> str:
    """One line: the tokenizer, its vocabulary and what the sequence length truncates."""
    if step["how"] == "tf_idf":
        return (f"tf_idf, a bag of {len(step['vocabulary']):,} words (sublinear term "
                f"frequency x inverse document frequency, L2-normalised)")
    truncated = step.get("truncated", {})
    documents = step.get("documents", {})
    cut = ", ".join(f"{part} {n:,} of {documents.get(part, 0):,}"
                    for part, n in truncated.items())
    return (f"{step['how']}, vocabulary {len(step['vocabulary']) + 2:,}, at most "
            f"{step['sequence_length']} tokens (truncated: {cut or 'none'})")


@keras.utils.register_keras_serializable(package="lmt_tf")
class Tokenize(keras.layers.Layer):
    """Documents (a batch of strings) to token ids, (batch, length) int64: the batch
    padded with 0 to its longest document, at most ``sequence_length`` tokens."""

    def __init__(self, vocabulary: list[str], sequence_length: int,
                 standardize: str = "lower_and_strip_punctuation", **kwargs: Any):
        kwargs.pop("dtype", None)
        super().__init__(dtype="int64", **kwargs)
        self.vocabulary = list(vocabulary)
        self.sequence_length = int(sequence_length)
        self.standardize = standardize
        self.vectorizer = keras.layers.TextVectorization(
            standardize=None if standardize == "none" else standardize,
            vocabulary=self.vocabulary, output_mode="int", ragged=True,
            name="vectorize")

    def call(self, documents: tf.Tensor) -> tf.Tensor:
        documents = tf.reshape(documents, [-1])
        ids = self.vectorizer(documents)[:, : self.sequence_length]
        dense = tf.cast(ids.to_tensor(default_value=PAD), tf.int64)
        # A batch of empty documents still has one (padding) position.
        return tf.pad(dense, [[0, 0], [0, tf.maximum(1 - tf.shape(dense)[1], 0)]])

    def lengths(self, documents: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Tokens in each document before truncation."""
        out = []
        for start in range(0, len(documents), batch):
            chunk = tf.constant(np.asarray(documents[start:start + batch]).astype(bytes))
            out.append(self.vectorizer(chunk).row_lengths().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def compute_output_shape(self, input_shape: Any) -> tf.TensorShape:
        return tf.TensorShape([input_shape[0], None])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary": self.vocabulary,
                "sequence_length": self.sequence_length, "standardize": self.standardize}


@keras.utils.register_keras_serializable(package="lmt_tf")
class BagOfWords(keras.layers.Layer):
    """Documents (a batch of strings) to TF-IDF vectors (batch, vocabulary) float32: each
    word's 1 + ln(count) times its inverse document frequency in the training split,
    the vector L2-normalised (as scikit-learn's ``TfidfVectorizer(sublinear_tf=True)``);
    words outside the vocabulary are left out."""

    def __init__(self, vocabulary: list[str], idf: list[float],
                 standardize: str = "lower_and_strip_punctuation", **kwargs: Any):
        kwargs.pop("dtype", None)
        super().__init__(dtype="float32", **kwargs)
        if len(idf) != len(vocabulary):
            raise ConfigError(f"BagOfWords: {len(idf)} weights for {len(vocabulary)} words")
        self.vocabulary = list(vocabulary)
        self.idf = [float(v) for v in idf]
        self.standardize = standardize
        self.vectorizer = keras.layers.TextVectorization(
            standardize=None if standardize == "none" else standardize,
            vocabulary=self.vocabulary, output_mode="count", name="vectorize")
        # Count columns: 0 is the out-of-vocabulary bucket, weighted 0.
        self.weights_ = tf.constant([0.0, *self.idf], tf.float32)

    def call(self, documents: tf.Tensor) -> tf.Tensor:
        counts = tf.cast(self.vectorizer(tf.reshape(documents, [-1])), tf.float32)
        tf_ = tf.where(counts > 0, 1 + tf.math.log(tf.maximum(counts, 1.0)), 0.0)
        return tf.math.l2_normalize(tf_ * self.weights_, axis=-1)

    def compute_output_shape(self, input_shape: Any) -> tf.TensorShape:
        return tf.TensorShape([input_shape[0], len(self.vocabulary) + 1])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary": self.vocabulary, "idf": self.idf,
                "standardize": self.standardize}
