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


BLOCKS = 2


def build_encoder_like(input_shape, num_classes) -> keras.Model:
    """Layers named as the transformer builder names them: digits' pixels (0-16) as 64
    tokens, token and position embeddings, 2 pre-norm blocks (Dense layers in place of
    attention), a final norm and the head."""
    import tensorflow as tf

    pixels = keras.Input(input_shape)
    ids = tf.cast(keras.layers.Flatten()(pixels), "int32")
    positions = tf.zeros_like(ids) + tf.range(64)
    x = (keras.layers.Embedding(17, 8, name="token_embedding")(ids)
         + keras.layers.Embedding(64, 8, name="position_embedding")(positions))
    for i in range(BLOCKS):
        h = keras.layers.LayerNormalization(name=f"block{i}_norm1")(x)
        x = x + keras.layers.Dense(8, name=f"block{i}_attention")(h)
        h = keras.layers.LayerNormalization(name=f"block{i}_norm2")(x)
        h = keras.layers.Dense(16, activation="relu", name=f"block{i}_ffn1")(h)
        x = x + keras.layers.Dense(8, name=f"block{i}_ffn2")(h)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(pixels, keras.layers.Dense(num_classes, activation="softmax",
                                                  name="predictions")(x))


def _encoder_deltas(strategy, **config) -> dict[str, np.ndarray]:
    """How far each weight moved in one SGD step at rate 1, by weight name. (The update
    is not XLA-compiled: compiling it per variable would take most of the test's time,
    and the factors apply after it either way.)"""
    splits = load_digits(validation_fraction=0.0)  # no validation pass to trace
    trainer = Trainer(TrainConfig(epochs=1, steps_per_epoch=1, global_batch_size=64, verbose=0,
                                  optimizer=lambda: keras.optimizers.SGD(1.0),
                                  jit_compile_update=False, **config), strategy)
    set_seed(9)
    model = trainer.build_model(build_encoder_like, splits)
    inner = inference_model(model)
    before = {v.name: v.numpy() for v in inner.trainable_variables}
    trainer.fit(model, splits, seed=4)
    return {v.name: v.numpy() - before[v.name] for v in inner.trainable_variables}


def depth_factor(name: str, decay: float) -> float:
    """By hand: the head 1, block i of 2 decay ** (2 - i), embeddings decay ** 3."""
    if name.startswith("block"):
        return decay ** (BLOCKS - int(name[5]))
    return decay ** (BLOCKS + 1) if "embedding" in name else 1.0


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_layer_decay_scales_each_blocks_update_by_depth_times_its_multiplier(
        strategy: str) -> None:
    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    plain = _encoder_deltas(make())
    decayed = _encoder_deltas(make(), layer_decay=0.5,
                              update_multipliers={"block0_ffn": 0.5, "token_embedding": 0.0})
    multiplier = {"block0_ffn1": 0.5, "block0_ffn2": 0.5, "token_embedding": 0.0}
    for name, move in plain.items():
        layer = name.split("/")[0]
        factor = depth_factor(layer, 0.5) * multiplier.get(layer, 1.0)
        assert np.abs(move).max() > 0, name
        np.testing.assert_allclose(decayed[name], factor * move, rtol=1e-4, atol=1e-7,
                                   err_msg=name)
    # The numbers the rule gives: head 1, block1 0.5, block0 0.25, embeddings 0.125.
    assert [depth_factor(n, 0.5) for n in ("predictions", "final_norm", "block1_ffn1",
                                           "block0_attention", "position_embedding")] == [
        1.0, 1.0, 0.5, 0.25, 0.125]


def test_layer_decay_needs_blocks_and_a_decay_in_range() -> None:
    trainer = Trainer(TrainConfig(layer_decay=0.8), default_strategy())
    with pytest.raises(ConfigError, match=r"^TrainConfig.layer_decay needs transformer blocks, "
                                          r"layers named block\{i\}_\.\.\. .*but model "
                                          r"'mlp' has none \(layers with weights: dense_0, "
                                          r"predictions\)$"):
        trainer.build_model(lambda **k: build_mlp(hidden_units=(8,), **k), load_digits())
    with pytest.raises(ConfigError, match=r"TrainConfig.layer_decay must be in \(0, 1\]"):
        TrainConfig(layer_decay=1.5)
