"""Transfer and few-shot learning: few-shot sampling draws exactly N of each class (the
same for the same seed); a model logged by an earlier run gets a new head, its frozen
layers stay as trained while the rest fine-tunes; the prototype baseline classifies by the
nearest class mean; and the mistakes a user makes are one line each."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf import config
from lmt_tf.cli import main
from lmt_tf.config import run_parsed
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.sources import few_shot, load_digits
from lmt_tf.data.splits import Split, Splits
from lmt_tf.data.text import load_20newsgroups, load_reuters
from lmt_tf.data.tokenization import OOV, BagOfWords, Tokenizer, WordPieceTokenize
from lmt_tf.errors import DataError
from lmt_tf.experiment import RunResult, run_experiment
from lmt_tf.invocation import Configs, ExportConfig, RunOptions
from lmt_tf.models.saved import export_saved_model
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.transfer import prototype_predictions
from tests.conftest import TINY, all_runs
from tests.tiny_text import (
    r8_few_shot_gin,
    tiny_r8,
    tiny_text_configs,
    tiny_text_model,
    tiny_transformer,
)

TRANSFER = """
include 'gin/strategies/default.gin'
run_experiment.data = @few_shot
few_shot.data = @load_digits
few_shot.per_class = 5
run_experiment.model = @build_transfer
build_transfer.freeze = ('dense_0',)
run_experiment.stages = [@prototypes(), @train(), @export()]
TrainConfig.optimizer = @keras.optimizers.SGD
keras.optimizers.SGD.learning_rate = 0.1
TrainConfig.epochs = 3
TrainConfig.global_batch_size = 10
TrainConfig.verbose = 0
"""


def test_few_shot_draws_exactly_n_of_each_class_the_same_for_the_same_seed() -> None:
    first = few_shot(load_digits, per_class=3, seed=1)
    assert np.bincount(first.train.y).tolist() == [3] * 10
    again = few_shot(load_digits, per_class=3, seed=1)
    np.testing.assert_array_equal(first.train.x, again.train.x)
    other = few_shot(load_digits, per_class=3, seed=2)
    assert not np.array_equal(first.train.x, other.train.x)
    whole = load_digits()
    assert len(first.test) == len(whole.test) and len(first.validation) == len(whole.validation)
    smallest = int(np.bincount(whole.train.y).min())
    with pytest.raises(DataError, match=f"per_class {smallest + 1} exceeds the {smallest}"):
        few_shot(load_digits, per_class=smallest + 1)


def test_few_shot_documents_keep_all_of_a_smaller_class_only_if_allowed() -> None:
    r8 = functools.partial(load_reuters, validation_fraction=0.1)
    with pytest.raises(DataError, match=r"per_class 50 exceeds the 37 training examples of "
                                        r"class 3 \(grain\) in reuters-r8 \(few_shot.allow"):
        few_shot(r8, per_class=50)
    drawn = few_shot(r8, per_class=50, allow_fewer=True)
    assert np.bincount(drawn.train.y).tolist() == [50, 50, 50, 37, 50, 50, 50, 50]
    assert drawn.train.x.dtype == object and all(isinstance(d, str) for d in drawn.train.x)
    assert drawn.class_names[3] == "grain" and len(drawn.test) == 2189


def test_digits_as_mnist_stores_them() -> None:
    digits = load_digits(mnist_like=True)
    assert digits.input_shape == (28, 28) and digits.train.x.dtype == np.uint8
    assert digits.train.x[:, :4].max() == 0 and digits.train.x.max() == 255


def test_prototypes_take_the_class_of_the_nearest_mean() -> None:
    inputs = keras.Input((2,))
    embed = keras.Model(inputs, keras.layers.Lambda(lambda t: t)(inputs))
    train_x = np.array([[0, 0], [0, 2], [10, 0], [10, 2]], np.float32)
    train_y = np.array([0, 0, 1, 1])
    x = np.array([[1, 1], [9, 1], [4.9, 1], [5.1, 1]], np.float32)
    np.testing.assert_array_equal(prototype_predictions(embed, train_x, train_y, x, 2),
                                  [0, 1, 0, 1])


@pytest.mark.slow
def test_transfer_replaces_the_head_and_keeps_frozen_layers_as_trained(
        gin_file, in_tmp: Path, capsys) -> None:
    source_file = gin_file(TINY, "source.gin")
    assert main(["run", source_file]) == 0
    (source,) = all_runs(in_tmp)
    exp = gin_file(TRANSFER + f"build_transfer.source = '{source.info.run_id}'\n")
    assert main(["run", exp]) == 0
    printed = capsys.readouterr().out
    assert "prototypes (nearest class mean of 50 training embeddings)" in printed
    (run,) = [r for r in all_runs(in_tmp) if r.info.run_id != source.info.run_id]
    assert run.info.status == "FINISHED" and run.data.params["derived.train_examples"] == "50"
    assert 0.3 < run.data.metrics["prototypes/test_accuracy"] <= 1

    from lmt_tf.tracking.read import load_model

    before, after = load_model(source.info.run_id), load_model(run.info.run_id)
    # Frozen: exactly as the source trained it. Fine-tuned: moved. The head: new.
    for weights, trained in zip(after.get_layer("dense_0").get_weights(),
                                before.get_layer("dense_0").get_weights(), strict=True):
        np.testing.assert_array_equal(weights, trained)
    assert after.layers[-1].name == "transfer_head"
    assert "predictions" not in [layer.name for layer in after.layers]

    # Unfrozen, the same layer fine-tunes.
    assert main(["run", exp, "--gin_param", "build_transfer.freeze = ()"]) == 0
    newest = max(all_runs(in_tmp), key=lambda r: r.info.start_time)
    moved = load_model(newest.info.run_id).get_layer("dense_0").get_weights()[0]
    assert not np.array_equal(moved, before.get_layer("dense_0").get_weights()[0])

    # A source that cannot take the data: one line, exit 2.
    capsys.readouterr()
    assert main(["run", exp, "--gin_param", "load_digits.mnist_like = True"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes inputs of shape (8, 8), but the data has examples of " \
        "shape (28, 28)" in err[0]


@pytest.mark.slow
def test_transfer_mistakes_are_one_line(gin_file, in_tmp: Path, capsys) -> None:
    no_model = gin_file(TINY + "ExportConfig.saved_model = False\n"
                               "ExportConfig.mlflow_model = False\n", "bare.gin")
    assert main(["run", no_model]) == 0
    (bare,) = all_runs(in_tmp)
    capsys.readouterr()
    cases = [
        (f"build_transfer.source = '{bare.info.run_id}'", "cannot load the model runs:/"),
        ("build_transfer.source = ''", "build_transfer.source is not set"),
        ("build_transfer.source = 'x'\nfew_shot.per_class = 500",
         "few_shot.per_class 500 exceeds the"),
    ]
    for binding, message in cases:
        exp = gin_file(TRANSFER + binding + "\n", "bad.gin")
        assert main(["run", exp]) == 2, binding
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (binding, err)


def _small_20newsgroups() -> Splits:
    """300 training posts of 20 Newsgroups (15 of each group) and 200 test posts."""
    splits = few_shot(functools.partial(load_20newsgroups, validation_fraction=0.0), 15)
    return dataclasses.replace(splits, test=Split(splits.test.x[:200], splits.test.y[:200]))


def _text_source(echoed: list[str]) -> RunResult:
    """A tiny transformer trained a few steps on 20 Newsgroups, exported: the source."""
    configs = Configs(
        train=TrainConfig(epochs=1, steps_per_epoch=3, global_batch_size=32, verbose=0),
        preprocess=Preprocessing(tokenizer=Tokenizer(vocabulary_size=500,
                                                     sequence_length=32)),
        export=ExportConfig(mlflow_model=False))
    return run_experiment(_small_20newsgroups, tiny_transformer, name="source", configs=configs,
                          options=RunOptions(echo=echoed.append))


# The source carried to R8 with one document of each class; its embeddings kept frozen.
TEXT_TRANSFER = r8_few_shot_gin(1) + """
run_experiment.model = @build_transfer
build_transfer.freeze = ('token_embedding',)
run_experiment.stages = [@prototypes(), @train()]
TrainConfig.epochs = 2
TrainConfig.global_batch_size = 8
TrainConfig.verbose = 0
"""


def _run(exp: str, echoed: list[str]) -> RunResult:
    config.parse([exp], [])
    return run_parsed(options=RunOptions(config_files=[exp], echo=echoed.append))


def test_a_text_model_carries_its_tokenizer_to_few_shot_r8(gin_file, in_tmp: Path,
                                                           capsys) -> None:
    echoed: list[str] = []
    source = _text_source(echoed)
    exp = gin_file(TEXT_TRANSFER + f"build_transfer.source = '{source.run_id}'\n")
    target = _run(exp, echoed)
    assert "lmt: preprocessing in the model: tokenize (the model's own tokenizer, fitted " \
        "where it was trained)" in echoed
    assert any("prototypes (nearest class mean of 8 training embeddings)" in line
               for line in echoed)
    (run,) = [r for r in all_runs(in_tmp) if r.info.run_id == target.run_id]
    assert run.info.status == "FINISHED" and run.data.params["derived.train_examples"] == "8"
    assert 0 <= run.data.metrics["prototypes/test_accuracy"] <= 1
    before, after = source.model, target.model
    # The target tokenizes with the source's vocabulary (fitted on 20 Newsgroups), in
    # front of the source's embeddings (frozen: exactly as trained).
    tokenizer = after.get_layer("preprocess_tokenize")
    assert tokenizer.vocabulary == before.get_layer("preprocess_tokenize").vocabulary
    assert len(tokenizer.vocabulary) == 498 and "god" in tokenizer.vocabulary
    np.testing.assert_array_equal(after.get_layer("token_embedding").get_weights()[0],
                                  before.get_layer("token_embedding").get_weights()[0])
    assert not np.array_equal(after.get_layer("block0_ffn1").get_weights()[0],
                              before.get_layer("block0_ffn1").get_weights()[0])  # tuned
    # The head is new and has R8's 8 classes; the source's 20-way softmax is gone.
    assert after.layers[-1].name == "transfer_head" and after.output_shape == (None, 8)
    assert "predictions" not in [layer.name for layer in after.layers]
    assert before.output_shape == (None, 20)
    # Raw documents in, one probability per R8 class out.
    probabilities = after.predict(np.array(["oil prices rose", "the bank cut its rate"],
                                           object), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    # A tokenizer fitted here would give the source's embeddings other ids; a source
    # without one cannot take documents. One line each.
    inputs = keras.Input((8, 8))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(inputs))
    export_saved_model(keras.Model(inputs, outputs), in_tmp / "image_model")
    cases = [
        (f"build_transfer.source = '{source.run_id}'\n"
         "include 'gin/preprocessing/words.gin'",
         "Preprocessing.tokenizer must not be set: run_experiment.model build_transfer "
         "tokenizes documents with its source's tokenizer"),
        (f"build_transfer.source = '{in_tmp / 'image_model'}'",
         "has no tokenizer (it takes inputs of shape (8, 8)), but the data is documents"),
    ]
    capsys.readouterr()
    for binding, message in cases:
        bad = gin_file(TEXT_TRANSFER + binding + "\n", "bad.gin")
        assert main(["run", bad]) == 2, binding
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (binding, err)


# The layer a transferred model keeps frozen: a sequence model's token embedding, a bag of
# words model's first dense layer.
FROZEN = {"wordpiece": "token_embedding", "tf_idf": "dense_0"}


@pytest.mark.parametrize("kind", ["wordpiece", "tf_idf"])
def test_a_wordpiece_or_bag_of_words_source_carries_its_tokenizer(kind: str, gin_file,
                                                                   in_tmp: Path) -> None:
    """A source that tokenizes into WordPiece ids or a bag of words carries its tokenizer
    to the new task as one of words does: the same vocabulary, the same output for the
    same text, in front of the source's trained layers."""
    echoed: list[str] = []
    source = run_experiment(tiny_r8, tiny_text_model(kind), name="source",
                            configs=tiny_text_configs(kind),
                            options=RunOptions(echo=echoed.append))
    exp = gin_file(TEXT_TRANSFER + f"build_transfer.source = '{source.run_id}'\n"
                                   f"build_transfer.freeze = ('{FROZEN[kind]}',)\n")
    target = _run(exp, echoed)
    assert "lmt: preprocessing in the model: tokenize (the model's own tokenizer, fitted " \
        "where it was trained)" in echoed
    before, after = source.model, target.model
    theirs, ours = before.get_layer("preprocess_tokenize"), after.get_layer("preprocess_tokenize")
    assert type(ours) is type(theirs) is {"wordpiece": WordPieceTokenize,
                                          "tf_idf": BagOfWords}[kind]
    assert ours.vocabulary == theirs.vocabulary and ours.get_config() == theirs.get_config()
    documents = tf.constant(["Oil prices rose, OPEC said.", "the bank cut its rate",
                             "oilbarrelmoney"])
    made = ours(documents).numpy()
    np.testing.assert_array_equal(made, theirs(documents).numpy())
    if kind == "wordpiece":
        # A word the source never saw: pieces of its vocabulary, not [UNK].
        pieces = made[2][made[2] != 0]
        assert len(pieces) > 1 and OOV not in pieces, made[2]
    np.testing.assert_array_equal(after.get_layer(FROZEN[kind]).get_weights()[0],
                                  before.get_layer(FROZEN[kind]).get_weights()[0])
    assert after.layers[-1].name == "transfer_head" and after.output_shape == (None, 8)
    (run,) = [r for r in all_runs(in_tmp) if r.info.run_id == target.run_id]
    assert run.info.status == "FINISHED" and 0 <= run.data.metrics["test_accuracy"] <= 1
