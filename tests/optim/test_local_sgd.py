"""Local SGD: H=1 is synchronous training; averaging every H steps; replicas diverge
between averagings and agree right after."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


class ReplicaWatch(keras.callbacks.Callback):
    """After every step: do the two replicas hold the same first-layer kernel?"""

    def __init__(self):
        super().__init__()
        self.same: list[bool] = []

    def on_train_batch_end(self, batch, logs=None):
        kernel = inference_model(self.model).get_layer("dense_0").kernel
        copies = self.model.distribute_strategy.experimental_local_results(kernel)
        self.same.append(bool(np.allclose(copies[0].numpy(), copies[1].numpy())))


def train(strategy, steps: int = 8, **config):
    splits = load_digits()
    trainer = Trainer(TrainConfig(epochs=1, steps_per_epoch=steps, global_batch_size=64,
                                  verbose=0, optimizer=lambda: keras.optimizers.SGD(0.1),
                                  **config), strategy)
    set_seed(2)
    model = trainer.build_model(build_mlp, splits)
    watch = ReplicaWatch()
    history = trainer.fit(model, splits, seed=6, callbacks=[watch]).history
    return inference_model(model), history, watch.same


def test_one_local_step_is_synchronous_training() -> None:
    synchronous, _, _ = train(mirrored_strategy(2))
    local, history, same = train(mirrored_strategy(2), local_steps=1)
    assert history["weight_synchronisations"] == [8.0]
    assert all(same)
    for a, b in zip(synchronous.get_weights(), local.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_four_local_steps_average_a_quarter_as_often() -> None:
    _, history, same = train(mirrored_strategy(2), steps=8, local_steps=4)
    assert history["weight_synchronisations"] == [2.0]  # 8 steps / H=4
    # Equal right after each averaging (steps 4 and 8), different in between.
    assert same == [False, False, False, True, False, False, False, True]


def test_post_local_sgd_is_synchronous_first() -> None:
    _, history, same = train(mirrored_strategy(2), steps=8, local_steps=2, sync_steps=4)
    assert same[:4] == [True] * 4  # synchronous: replicas never differ
    assert same[4:] == [False, True, False, True]
    assert history["weight_synchronisations"] == [2.0]


def test_local_sgd_needs_replicas_in_sync() -> None:
    with pytest.raises(ConfigError, match="TrainConfig.local_steps cannot be used: "
                                          "DefaultStrategy has one replica"):
        Trainer(TrainConfig(local_steps=4), default_strategy()).build_model(
            build_mlp, load_digits())
    with pytest.raises(ConfigError, match="TrainConfig.local_steps must be >= 1"):
        TrainConfig(local_steps=0)
