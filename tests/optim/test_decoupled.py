"""Decoupled Greedy Learning: no gradient crosses blocks; the model trains."""

from __future__ import annotations

import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.cnn import build_cnn
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.decoupled import DecoupledGreedyModel
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


def test_no_gradient_crosses_between_blocks() -> None:
    model = DecoupledGreedyModel(build_cnn((8, 8), 10, filters=(4, 8), dense_units=16),
                                 ["pool_0", "pool_1"], 10, "sparse_categorical_crossentropy")
    x = tf.random.stateless_uniform((6, 8, 8), seed=(1, 2))
    y = tf.constant([0, 1, 2, 3, 4, 5])
    blocks = model.block_variables()
    assert len(blocks) == 3
    with tf.GradientTape(persistent=True) as tape:
        losses = model.block_losses(x, y)
    for i, loss in enumerate(losses):
        for j, block in enumerate(blocks):
            grads = tape.gradient(loss, block)
            nonzero = [g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads]
            if i == j:
                assert any(nonzero), f"block {i}'s loss does not train block {i}"
            else:
                assert not any(nonzero), f"block {i}'s loss reaches block {j}"


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_decoupled_training_learns_and_exports_the_plain_model(strategy: str) -> None:
    splits = load_digits()
    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    config = TrainConfig(epochs=8, global_batch_size=64, verbose=0,
                         decoupled_blocks=("dense_0",),
                         optimizer=lambda: keras.optimizers.Adam(0.01))
    trainer = Trainer(config, make())
    model = trainer.build_model(lambda **k: build_mlp(hidden_units=(32, 16), **k), splits)
    history = trainer.fit(model, splits, seed=0).history
    assert history["block_0_loss"][-1] < history["block_0_loss"][0]
    assert "val_block_0_loss" not in history
    assert trainer.evaluate(model, splits.test)["accuracy"] > 0.85
    assert inference_model(model).name == "mlp"


def test_bad_block_names_and_combinations() -> None:
    with pytest.raises(ConfigError, match="names \\['conv_7'\\], not layers of 'mlp'"):
        Trainer(TrainConfig(decoupled_blocks=("conv_7",)), default_strategy()).build_model(
            build_mlp, load_digits())
    with pytest.raises(ConfigError, match="cannot be combined with micro_batches"):
        TrainConfig(decoupled_blocks=("dense_0",), micro_batches=2)
