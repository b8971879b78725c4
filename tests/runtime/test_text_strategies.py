"""The transformer on text under each strategy: its tokenizer (a lookup table made in the
strategy's scope) works on every replica, a mirrored step equals one step on one device
on the same global batch, and a multi-worker and a parameter-server job train it as one
device does, each ending with one MLflow run."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.splits import Splits
from lmt_tf.data.tokenization import Tokenizer
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer
from tests.conftest import all_runs, mlflow_client
from tests.runtime.test_launcher import Launch
from tests.tiny_text import r8_few_shot, r8_few_shot_gin, tiny_text_gin, tiny_transformer

SEQUENCE = 512  # tokens: long enough that the replicas' halves pad to different lengths
ORDER = 2  # seed of the data order: a first batch whose halves differ in length
TINY_TRANSFORMER = functools.partial(tiny_transformer, dropout=0.0)


def _one_step(strategy: tf.distribute.Strategy, splits: Splits) -> tuple[float, list]:
    """The loss of one SGD step on the first global batch of 32 documents, and the
    weights after it."""
    fitted = Preprocessing(tokenizer=Tokenizer(vocabulary_size=300,
                                               sequence_length=SEQUENCE)).fit(splits)
    config = TrainConfig(epochs=1, steps_per_epoch=1, global_batch_size=32, verbose=0,
                         optimizer=lambda: keras.optimizers.SGD(0.5))
    trainer = Trainer(config, strategy)
    set_seed(7)
    model = trainer.build_model(fitted.wrap(TINY_TRANSFORMER), splits)
    history = trainer.fit(model, splits, seed=ORDER).history
    return history["loss"][0], model.get_weights()


def test_one_mirrored_step_on_documents_equals_one_default_step() -> None:
    splits = r8_few_shot(per_class=4)
    loss, single = _one_step(default_strategy(), splits)
    mirrored_loss, mirrored = _one_step(mirrored_strategy(2), splits)
    assert mirrored_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Not trivially equal: each replica tokenizes its 16 documents and pads them to its
    # own longest, and the two halves of the global batch differ in length.
    trainer = Trainer(TrainConfig(global_batch_size=32), default_strategy())
    batch = next(iter(splits.train.train_input_fn(trainer.plan(splits.train), ORDER, 0)(
        tf.distribute.InputContext())))[0].numpy()
    tokenize = Preprocessing(tokenizer=Tokenizer(vocabulary_size=300,
                                                 sequence_length=SEQUENCE)).fit(splits)
    layer = tokenize.layers()[0]
    halves = [layer(tf.constant(part)).shape[1] for part in (batch[:16], batch[16:])]
    assert halves[0] != halves[1], halves
    # The step moved the weights: the comparison is not between two initialisations.
    set_seed(7)
    initial = TINY_TRANSFORMER((SEQUENCE,), 8, vocabulary_size=300).get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(initial, single, strict=True)) > 1e-3


TEXT = tiny_text_gin(200, 32) + r8_few_shot_gin(4) + """
build_transformer.dropout = 0.0
TrainConfig.optimizer = @keras.optimizers.Adam
keras.optimizers.Adam.learning_rate = 0.01
TrainConfig.epochs = 2
TrainConfig.global_batch_size = 32
TrainConfig.verbose = 0
run_experiment.stages = [@train()]
"""
STRATEGIES = {"MultiWorkerMirroredStrategy": "multi_worker_mirrored_strategy",
              "ParameterServerStrategy": "parameter_server_strategy"}


@pytest.mark.slow
def test_multi_worker_and_parameter_server_jobs_train_text_as_one_device(in_tmp: Path) -> None:
    jobs = {"MultiWorkerMirroredStrategy": ["--workers", "2"],
            # One worker: its steps run one after the other, as on one device.
            "ParameterServerStrategy": ["--workers", "1", "--ps", "1"]}
    launches = {}
    for strategy, args in jobs.items():  # both at once, each in its own directory
        directory = in_tmp / strategy
        directory.mkdir()
        (directory / "exp.gin").write_text(TEXT + "run_experiment.strategy = "
                                           f"@{STRATEGIES[strategy]}\n")
        launches[strategy] = Launch([*args, "--timeout", "240", "exp.gin"], directory)
    losses = {}
    for strategy, launch in launches.items():
        assert launch.wait(300) == 0, launch.output
        (run,) = all_runs(in_tmp / strategy)  # one MLflow run, whatever its tasks
        assert run.info.status == "FINISHED", launch.output
        assert run.data.tags["lmt.strategy"] == strategy
        history = mlflow_client(in_tmp / strategy).get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2] and history[1].value < history[0].value
        losses[strategy] = run.data.metrics["test_loss"]
    # Both equal one device's training: 2 replicas in sync, or one worker's steps in turn.
    assert losses["ParameterServerStrategy"] == pytest.approx(
        losses["MultiWorkerMirroredStrategy"], rel=1e-4)
