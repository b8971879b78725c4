"""Gradient accumulation: k micro-batches of b equal one batch of k*b."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.optim.train_step import MicroBatchTrainStep
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer

OPTIMIZERS = {"sgd": lambda: keras.optimizers.SGD(0.1),
              "adam": lambda: keras.optimizers.Adam(0.01)}


def train(micro_batches: int, strategy, optimizer: str, steps: int = 3):
    splits = load_digits()
    config = TrainConfig(epochs=1, steps_per_epoch=steps, global_batch_size=64, verbose=0,
                         micro_batches=micro_batches, optimizer=OPTIMIZERS[optimizer])
    trainer = Trainer(config, strategy)
    set_seed(3)
    model = trainer.build_model(build_mlp, splits)
    trainer.fit(model, splits, seed=1)
    return model


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_four_micro_batches_equal_one_big_batch(optimizer: str, strategy: str) -> None:
    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    big = train(1, make(), optimizer)
    accumulated = train(4, make(), optimizer)
    assert isinstance(accumulated, MicroBatchTrainStep)
    assert int(accumulated.optimizer.iterations.numpy()) == 3  # one update per 4 micro-batches
    for a, b in zip(big.get_weights(), inference_model(accumulated).get_weights(),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    set_seed(3)
    initial = build_mlp((8, 8), 10).get_weights()
    assert not np.allclose(initial[0], big.get_weights()[0])  # training moved the weights


def test_schedules_count_optimizer_steps() -> None:
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.0])
    splits = load_digits()
    config = TrainConfig(epochs=1, steps_per_epoch=4, global_batch_size=64, verbose=0,
                         micro_batches=8, optimizer=lambda: keras.optimizers.SGD(schedule))
    trainer = Trainer(config, default_strategy())
    model = trainer.build_model(build_mlp, splits)
    trainer.fit(model, splits, seed=0)
    # 4 optimizer steps, not 32 micro-batches: the learning rate is 0 from step 3 on.
    assert int(model.optimizer.iterations.numpy()) == 4
    assert float(model.optimizer.learning_rate) == 0.0


@pytest.mark.parametrize("k, message", [
    (0, "TrainConfig.micro_batches must be >= 1"),
    (5, "TrainConfig.micro_batches 5 must divide the per-replica batch of 64"),
])
def test_bad_micro_batches(k: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(TrainConfig(global_batch_size=64, micro_batches=k),
                default_strategy()).plan(load_digits().train)
