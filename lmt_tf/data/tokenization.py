"""Tokenization inside the model: a vocabulary fitted on the training split only, and a
Keras layer that turns raw documents (strings) into token ids. So the SavedModel, the
MLflow model and ``mlflow models serve`` take raw text, and nothing is fitted twice.
Words (Keras ``TextVectorization``) or WordPiece subwords (TensorFlow Text: its
vocabulary learner, and ``FastBertTokenizer`` in the model; Wu et al. 2016, Devlin et
al. 2019): a word outside a WordPiece vocabulary splits into pieces that are in it.

Ids: 0 pads, 1 is the out-of-vocabulary token (WordPiece's ``[UNK]``), the vocabulary
follows. A batch is padded to its longest document (at most ``sequence_length`` tokens;
longer ones are truncated, and counted when the tokenizer is fitted): batches of
documents of similar length (``InputConfig.bucket_by_length``) carry fewer padded tokens.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range, check_types
from lmt_tf.data.pipeline import encoded
from lmt_tf.errors import ConfigError

TOKENIZERS = ("words", "wordpiece", "tf_idf")
STANDARDIZE = ("lower_and_strip_punctuation", "lower", "strip_punctuation", "none")
PAD, OOV = 0, 1  # the ids of padding and of a token outside the vocabulary
RESERVED = ["[PAD]", "[UNK]"]  # WordPiece's tokens of ids 0 and 1
# The punctuation Keras' TextVectorization strips (its DEFAULT_STRIP_REGEX), stripped the
# same way before WordPiece.
PUNCTUATION = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
TEXT_REQUIREMENT = "tensorflow-text>=2.21,<2.22"
# Characters: the longest piece the WordPiece learner makes, and the longest word it
# reads (its default, 50, makes a pass over 20 Newsgroups' words slower for pieces that
# occur too rarely to be kept).
MAX_PIECE = 20


@dataclass
class Tokenizer:
    """How documents become token ids, fitted on the training split."""

    # words: whitespace-separated words after standardization (Keras TextVectorization);
    # wordpiece: subwords of a vocabulary learned by TensorFlow Text's WordPiece learner;
    # both a sequence of ids. tf_idf: a bag of words, one vector per document (sublinear
    # term frequency times inverse document frequency, L2-normalised)
    kind: Annotated[str, OneOf(*TOKENIZERS)] = "words"
    # ids in all, padding and out-of-vocabulary included (the embedding table's rows)
    vocabulary_size: Annotated[int, Range(ge=3)] = 20_000
    # tokens kept of each document; longer documents are truncated (and counted)
    sequence_length: Annotated[int, Range(ge=1)] = 256
    # what is done to the text before it is split (wordpiece: lower is BERT's uncased
    # normalization, which also strips accents; kept punctuation becomes tokens)
    standardize: Annotated[str, OneOf(*STANDARDIZE)] = "lower_and_strip_punctuation"
    # wordpiece: the learner reads this many of the most frequent training words (its time
    # grows with them; rarer words are tokenized into the pieces learned from these)
    learner_words: Annotated[int, Range(ge=1)] = 10_000

    def __post_init__(self) -> None:
        check_types(self)

    def fit(self, train: np.ndarray, splits: dict[str, np.ndarray]) -> dict[str, Any]:
        """The fitted step: the vocabulary learned from ``train`` (documents), and how
        many documents of each split in ``splits`` the sequence length truncates.

        Raises:
          ConfigError: if the training documents yield no token, or WordPiece's
            characters alone need more ids than ``vocabulary_size``.
        """
        vocabulary = (self._learn_wordpiece(train) if self.kind == "wordpiece"
                      else self._learn_words(train))
        if not vocabulary:
            raise ConfigError(f"Tokenizer: the {len(train):,} training documents hold no "
                              f"word")
        if self.kind == "tf_idf":
            return {"kind": "tokenize", "how": self.kind, "vocabulary": vocabulary,
                    "standardize": self.standardize,
                    "idf": inverse_document_frequency(vocabulary, self.standardize, train)}
        step = {"kind": "tokenize", "how": self.kind, "vocabulary": vocabulary,
                "sequence_length": self.sequence_length, "standardize": self.standardize}
        if self.kind == "wordpiece":
            step["learner_words"] = self.learner_words
        layer = tokenize_layer(step)
        step["truncated"] = {part: int(np.sum(layer.lengths(docs) > self.sequence_length))
                             for part, docs in splits.items()}
        step["documents"] = {part: len(docs) for part, docs in splits.items()}
        return step

    def _learn_words(self, train: np.ndarray) -> list[str]:
        """The most frequent words, without the ids of padding and out-of-vocabulary."""
        vectorizer = keras.layers.TextVectorization(
            max_tokens=self.vocabulary_size,
            standardize=None if self.standardize == "none" else self.standardize,
            output_mode="int")
        vectorizer.adapt(tf.data.Dataset.from_tensor_slices(encoded(train)).batch(1024))
        # Ids 0 and 1 are padding and out-of-vocabulary; then words by frequency.
        return [str(w) for w in vectorizer.get_vocabulary()[2:]]

    def _learn_wordpiece(self, train: np.ndarray) -> list[str]:
        """A WordPiece vocabulary learned by TensorFlow Text's learner from the words of
        ``train`` (split as BERT splits them: at whitespace and punctuation), without
        ``[PAD]`` and ``[UNK]``. Every character of the words it reads is a piece (a
        first and a ``##`` continuing one), so a new word of those characters splits
        into known pieces; then pieces by frequency, down to ``vocabulary_size`` ids.

        Raises:
          ConfigError: if the characters alone need more ids than ``vocabulary_size``.
        """
        text_ops()
        from tensorflow_text.tools.wordpiece_vocab import (
            wordpiece_tokenizer_learner_lib as learner,
        )

        counts = word_counts(train, self.standardize).most_common(self.learner_words)
        if not counts:
            return []
        size = self.vocabulary_size
        characters = {c for word, _ in counts for c in word}
        needed = len(RESERVED) + 2 * len(characters)  # each character, first or ##
        if needed > size:
            raise ConfigError(f"Tokenizer.vocabulary_size {size:,} is too small for "
                              f"wordpiece: the training words hold {len(characters):,} "
                              f"characters, which need {needed:,} ids")
        # The learner bisects the count threshold a piece must reach, a pass over the
        # words each time. Each occurrence of a piece is some of the words' letters, so
        # at most letters/t pieces occur t times or more: the vocabulary fits at
        # t = letters / (size - characters), where the search starts instead of at the
        # top word's count (20 Newsgroups: 9 passes instead of 15).
        letters = sum(count * len(word) for word, count in counts)
        upper = max(letters // max(size - needed, 1), 11)  # above its lower bound, 10
        vocabulary = learner.learn(counts, size, list(RESERVED), upper_thresh=upper,
                                   max_token_length=MAX_PIECE)
        return trimmed(vocabulary[len(RESERVED):], size - len(RESERVED))


def trimmed(pieces: list[str], size: int) -> list[str]:
    """At most ``size`` of the learned ``pieces`` (characters first, then the others by
    count): should the learner's search end above the size, the rarest multi-character
    pieces go, never a character (first or ``##``), which any word of it needs."""
    if len(pieces) <= size:
        return list(pieces)
    characters = [p for p in pieces if len(p.removeprefix("##")) == 1]
    others = [p for p in pieces if len(p.removeprefix("##")) != 1]
    return characters + others[: size - len(characters)]



def text_ops() -> ModuleType:
    """TensorFlow Text (its ops registered with TensorFlow).

    Raises:
      ConfigError: if it is not installed.
    """
    try:
        import tensorflow_text
    except ImportError as e:
        raise ConfigError(f"Tokenizer.kind 'wordpiece' needs TensorFlow Text: pip install "
                          f"'{TEXT_REQUIREMENT}' ({e})") from e
    return tensorflow_text


def word_counts(documents: np.ndarray, standardize: str,
                batch: int = 512) -> collections.Counter:
    """How often each word occurs in ``documents``: after ``standardize``, split as BERT
    splits text (TensorFlow Text's ``BasicTokenizer``: at whitespace and punctuation),
    as the WordPiece layer does before it finds pieces."""
    from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer

    splitter = BasicTokenizer(lower_case=standardize.startswith("lower"))
    counts: collections.Counter = collections.Counter()
    for start in range(0, len(documents), batch):
        chunk = tf.constant(np.asarray(documents[start:start + batch]).astype(bytes))
        words = splitter.tokenize(_strip_punctuation(chunk, standardize))
        counts.update(words.flat_values.numpy())
    return collections.Counter({w.decode("utf-8"): n for w, n in counts.items()})


def _strip_punctuation(documents: tf.Tensor, standardize: str) -> tf.Tensor:
    if "strip_punctuation" in standardize:
        return tf.strings.regex_replace(documents, PUNCTUATION, "")
    return documents


def inverse_document_frequency(vocabulary: list[str], standardize: str,
                               train: np.ndarray, batch: int = 1024) -> list[float]:
    """Each vocabulary word's smoothed inverse document frequency in ``train``,
    ln((1 + n) / (1 + df)) + 1 (scikit-learn's ``TfidfVectorizer`` default)."""
    vectorizer = keras.layers.TextVectorization(
        standardize=None if standardize == "none" else standardize, vocabulary=vocabulary,
        output_mode="multi_hot")
    df = np.zeros(len(vocabulary) + 1, np.float64)
    for start in range(0, len(train), batch):
        df += vectorizer(tf.constant(train[start:start + batch].astype(bytes))).numpy().sum(0)
    idf = np.log((1 + len(train)) / (1 + df[1:])) + 1
    return [round(float(v), 6) for v in idf]


def tokenize_layer(step: dict[str, Any], **kwargs: Any) -> keras.layers.Layer:
    """The model's first layer for a fitted tokenizer ``step``."""
    if step["how"] == "tf_idf":
        return BagOfWords(step["vocabulary"], step["idf"], step["standardize"], **kwargs)
    layer = WordPieceTokenize if step["how"] == "wordpiece" else Tokenize
    return layer(step["vocabulary"], step["sequence_length"], step["standardize"], **kwargs)


def _padded(ids: tf.RaggedTensor, sequence_length: int) -> tf.Tensor:
    """Ragged ids (batch, tokens) as (batch, length) int64: at most ``sequence_length``
    tokens, padded with 0 to the longest, at least one position."""
    dense = tf.cast(ids[:, :sequence_length].to_tensor(default_value=PAD), tf.int64)
    # A batch of empty documents still has one (padding) position.
    return tf.pad(dense, [[0, 0], [0, tf.maximum(1 - tf.shape(dense)[1], 0)]])


def _row_lengths(tokenize: Any, documents: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Tokens in each document before truncation, by ``tokenize`` (strings to ragged)."""
    out = []
    for start in range(0, len(documents), batch):
        chunk = tf.constant(encoded(documents[start:start + batch]))
        out.append(tokenize(chunk).row_lengths().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


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


class SequenceTokenizer(keras.layers.Layer):
    """Documents (a batch of strings) to ids, (batch, length) int64: the batch padded with
    0 to its longest document, at most ``sequence_length`` ids. A subclass says how a
    document becomes its ids (``pieces``)."""

    def __init__(self, vocabulary: list[str], sequence_length: int, standardize: str,
                 **kwargs: Any):
        kwargs.pop("dtype", None)
        super().__init__(dtype="int64", **kwargs)
        self.vocabulary = list(vocabulary)
        self.sequence_length = int(sequence_length)
        self.standardize = standardize

    def pieces(self, documents: tf.Tensor) -> tf.RaggedTensor:
        """Each document's ids, untruncated: (batch, ids)."""
        raise NotImplementedError

    def call(self, documents: tf.Tensor) -> tf.Tensor:
        return _padded(self.pieces(documents), self.sequence_length)

    def lengths(self, documents: np.ndarray) -> np.ndarray:
        """Ids of each document before truncation."""
        return _row_lengths(self.pieces, documents)

    @property
    def width(self) -> int:
        """Columns of a document's ids padded to the sequence length (what a converted
        model takes: ``compression.tflite.after_tokenizer``)."""
        return self.sequence_length

    def compute_output_shape(self, input_shape: Any) -> tf.TensorShape:
        return tf.TensorShape([input_shape[0], None])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary": self.vocabulary,
                "sequence_length": self.sequence_length, "standardize": self.standardize}


@keras.utils.register_keras_serializable(package="lmt_tf")
class Tokenize(SequenceTokenizer):
    """Words (whitespace-separated after standardization) to ids: 0 pads, 1 is a word
    outside the vocabulary."""

    def __init__(self, vocabulary: list[str], sequence_length: int,
                 standardize: str = "lower_and_strip_punctuation", **kwargs: Any):
        super().__init__(vocabulary, sequence_length, standardize, **kwargs)
        self.vectorizer = keras.layers.TextVectorization(
            standardize=None if standardize == "none" else standardize,
            vocabulary=self.vocabulary, output_mode="int", ragged=True,
            name="vectorize")

    def pieces(self, documents: tf.Tensor) -> tf.RaggedTensor:
        return self.vectorizer(tf.reshape(documents, [-1]))


@keras.utils.register_keras_serializable(package="lmt_tf")
class WordPieceTokenize(SequenceTokenizer):
    """Documents (a batch of strings) to WordPiece ids, (batch, length) int64: the batch
    padded with 0 to its longest document, at most ``sequence_length`` pieces. Id 0 is
    ``[PAD]``, 1 ``[UNK]`` (a word with a character outside the vocabulary), the
    ``vocabulary`` follows. TensorFlow Text's ``FastBertTokenizer``: BERT's splitting at
    whitespace and punctuation, then the longest pieces from the left; a SavedModel of
    it needs ``import tensorflow_text`` before loading (``models.saved`` does it)."""

    def __init__(self, vocabulary: list[str], sequence_length: int,
                 standardize: str = "lower", **kwargs: Any):
        super().__init__(vocabulary, sequence_length, standardize, **kwargs)
        # The flatbuffer model of the vocabulary is a constant of the traced graph.
        self.tokenizer = text_ops().FastBertTokenizer(
            vocab=[*RESERVED, *self.vocabulary], token_out_type=tf.int64,
            unknown_token=RESERVED[OOV],
            lower_case_nfd_strip_accents=standardize.startswith("lower"))

    def pieces(self, documents: tf.Tensor) -> tf.RaggedTensor:
        """Each document's piece ids, untruncated: (batch, pieces)."""
        documents = _strip_punctuation(tf.reshape(documents, [-1]), self.standardize)
        return self.tokenizer.tokenize(documents).merge_dims(1, -1)


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
        # max_tokens fixes the width as a number: built in a graph (the pre-flight size
        # check builds models there), a vocabulary's size is otherwise a tensor.
        self.vectorizer = keras.layers.TextVectorization(
            max_tokens=len(self.vocabulary) + 1, pad_to_max_tokens=True,
            standardize=None if standardize == "none" else standardize,
            vocabulary=self.vocabulary, output_mode="count", name="vectorize")
        # Count columns: 0 is the out-of-vocabulary bucket, weighted 0.
        self.weights_ = tf.constant([0.0, *self.idf], tf.float32)

    def call(self, documents: tf.Tensor) -> tf.Tensor:
        counts = tf.cast(self.vectorizer(tf.reshape(documents, [-1])), tf.float32)
        tf_ = tf.where(counts > 0, 1 + tf.math.log(tf.maximum(counts, 1.0)), 0.0)
        return tf.math.l2_normalize(tf_ * self.weights_, axis=-1)

    @property
    def width(self) -> int:
        """Columns of a document's vector: the out-of-vocabulary bucket and each word."""
        return len(self.vocabulary) + 1

    def compute_output_shape(self, input_shape: Any) -> tf.TensorShape:
        return tf.TensorShape([input_shape[0], self.width])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "vocabulary": self.vocabulary, "idf": self.idf,
                "standardize": self.standardize}


# The layers that take a model's documents, whatever ``Tokenizer.kind`` made them: what
# comes after one is a network on numbers (ids, or TF-IDF vectors).
TOKENIZER_LAYERS = (SequenceTokenizer, BagOfWords)
