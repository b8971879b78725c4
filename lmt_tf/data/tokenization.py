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

TOKENIZERS = ("words",)
STANDARDIZE = ("lower_and_strip_punctuation", "lower", "strip_punctuation", "none")
PAD, OOV = 0, 1  # the ids of padding and of a token outside the vocabulary


@dataclass
class Tokenizer:
    """How documents become token ids, fitted on the training split."""

    # words: whitespace-separated words after standardization (Keras TextVectorization)
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
        step = {"kind": "tokenize", "how": self.kind, "vocabulary": vocabulary,
                "sequence_length": self.sequence_length, "standardize": self.standardize}
        layer = Tokenize(vocabulary, self.sequence_length, self.standardize)
        step["truncated"] = {part: int(np.sum(layer.lengths(docs) > self.sequence_length))
                             for part, docs in splits.items()}
        step["documents"] = {part: len(docs) for part, docs in splits.items()}
        return step


def describe(step: dict[str, Any]) -> str:
    """One line: the tokenizer, its vocabulary and what the sequence length truncates."""
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
