"""Layer-wise update multipliers and gradual unfreezing."""

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


def _deltas(strategy, optimizer, steps=1, epochs=1, **config) -> dict[str, np.ndarray]:
    """How far each weight moved, by layer/weight name."""
    splits = load_digits()
    trainer = Trainer(TrainConfig(epochs=epochs, steps_per_epoch=steps, global_batch_size=64,
                                  verbose=0, optimizer=optimizer, **config), strategy)
    set_seed(9)
    model = trainer.build_model(lambda **k: build_mlp(hidden_units=(16, 8), **k), splits)
    inner = inference_model(model)
    before = {v.name: v.numpy() for v in inner.trainable_variables}
    history = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            history.append({v.name: v.numpy() for v in inner.trainable_variables})

    trainer.fit(model, splits, seed=4, callbacks=[Snapshot()])
    return {name: [h[name] - before[name] for h in history] for name in before}


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.SGD(0.2),
                                       lambda: keras.optimizers.Adam(0.01)])
@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_each_block_update_is_scaled_by_its_factor(optimizer, strategy: str) -> None:
    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    plain = _deltas(make(), optimizer)
    scaled = _deltas(make(), optimizer, update_multipliers={"dense_0": 0.25, "dense_1": 0.0})
    for name, moves in plain.items():
        factor = 0.25 if name.startswith("dense_0") else 0.0 if name.startswith(
            "dense_1") else 1.0
        assert np.abs(moves[0]).max() > 0
        np.testing.assert_allclose(scaled[name][0], factor * moves[0], rtol=1e-4, atol=1e-7)


def test_gradual_unfreezing_by_epoch() -> None:
    moves = _deltas(default_strategy(), lambda: keras.optimizers.SGD(0.2), steps=2, epochs=3,
                    unfreeze_epochs={"dense_0": 1, "dense_1": 2})
    for name, per_epoch in moves.items():
        moved = [bool(np.abs(d).max() > 0) for d in per_epoch]  # cumulative after each epoch
        first = 1 if name.startswith("dense_0") else 2 if name.startswith("dense_1") else 0
        assert moved == [epoch >= first for epoch in range(3)], (name, moved)


def test_unknown_block_names_the_setting_and_the_layers() -> None:
    trainer = Trainer(TrainConfig(update_multipliers={"conv_9": 0.5}), default_strategy())
    with pytest.raises(ConfigError, match="TrainConfig.update_multipliers names block "
                                          "'conv_9'.*dense_0, predictions"):
        trainer.build_model(build_mlp, load_digits())
    with pytest.raises(ConfigError, match="TrainConfig.update_multipliers must be >= 0"):
        TrainConfig(update_multipliers={"dense": -1.0})
