"""The tiny text set-up the text tests share: Reuters R8 cut to a few hundred documents
(or a few of each class), a one-block transformer of embed 16 behind the tokenizer, and
the same as gin lines for the tests that run experiment files."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import tf_keras as keras

from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.sources import few_shot
from lmt_tf.data.splits import Split, Splits
from lmt_tf.data.text import load_reuters
from lmt_tf.data.tokenization import Tokenizer
from lmt_tf.invocation import Configs, ExportConfig
from lmt_tf.models.mlp import build_mlp
from lmt_tf.models.transformer import build_transformer
from lmt_tf.training.train_config import TrainConfig

# R8's class names, in id order.
R8 = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
# The tiny transformer: one block of embed 16, 2 heads, feed-forward 32.
TRANSFORMER = {"embed_dim": 16, "num_heads": 2, "num_blocks": 1, "ff_dim": 32}
TOKENS = 32  # the tiny tokenizer's sequence length


def tiny_r8(train: int = 300, validation: int = 100, test: int = 200) -> Splits:
    """The first ``train`` / ``validation`` / ``test`` documents of R8's splits."""
    splits = load_reuters()

    def first(split: Split, n: int) -> Split:
        return Split(split.x[:n], split.y[:n])

    return dataclasses.replace(splits, train=first(splits.train, train),
                               validation=first(splits.validation, validation),
                               test=first(splits.test, test))


def r8_few_shot(per_class: int) -> Splits:
    """``per_class`` training documents of each R8 class, no validation split, R8's whole
    test split."""
    return few_shot(functools.partial(load_reuters, validation_fraction=0.0), per_class)


def tiny_transformer(*args: Any, **kwargs: Any) -> keras.Model:
    """``build_transformer`` of the tiny size; ``kwargs`` add to (or override) it."""
    return build_transformer(*args, **{**TRANSFORMER, **kwargs})


def tiny_tokenizer(kind: str) -> Tokenizer:
    """A tokenizer of ``kind`` (``Tokenizer.kind``) of 500 ids and ``TOKENS`` tokens
    (WordPiece: learned from the 1,000 most frequent training words)."""
    return Tokenizer(kind=kind, vocabulary_size=500, sequence_length=TOKENS,
                     learner_words=1000)


def tiny_text_model(kind: str) -> Callable[..., keras.Model]:
    """The tiny model behind a tokenizer of ``kind``: the transformer on a sequence of
    ids, an MLP of 16 hidden units on a bag of words (``tf_idf``)."""
    if kind == "tf_idf":
        return functools.partial(build_mlp, hidden_units=(16,))
    return tiny_transformer


def tiny_text_configs(kind: str) -> Configs:
    """Three steps of 32 documents behind ``tiny_tokenizer(kind)``; a SavedModel export,
    no MLflow model."""
    return Configs(
        train=TrainConfig(epochs=1, steps_per_epoch=3, global_batch_size=32, verbose=0),
        preprocess=Preprocessing(tokenizer=tiny_tokenizer(kind)),
        export=ExportConfig(mlflow_model=False))


def tiny_text_gin(vocabulary_size: int, sequence_length: int) -> str:
    """Gin lines: documents tokenized into words (``vocabulary_size`` ids, at most
    ``sequence_length`` tokens) in front of the tiny transformer."""
    sizes = "".join(f"build_transformer.{name} = {value}\n"
                    for name, value in TRANSFORMER.items())
    return ("include 'gin/preprocessing/words.gin'\n"
            "include 'gin/models/transformer.gin'\n"
            f"Tokenizer.vocabulary_size = {vocabulary_size}\n"
            f"Tokenizer.sequence_length = {sequence_length}\n" + sizes)


def r8_few_shot_gin(per_class: int) -> str:
    """Gin lines: the data of ``r8_few_shot(per_class)``."""
    return ("run_experiment.data = @few_shot\n"
            "few_shot.data = @load_reuters\n"
            f"few_shot.per_class = {per_class}\n"
            "load_reuters.validation_fraction = 0.0\n")
