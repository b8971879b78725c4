"""Weight decay that leaves biases and normalization layers alone, under the default and
the mirrored strategy, in float32 and mixed bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer

RATE, DECAY, STEPS = 0.1, 0.5, 3


def build_zero_gradient(input_shape, num_classes) -> keras.Model:
    """Digits' pixels (0-16) as 64 tokens: embedding, norm, dense, then a multiply by 0,
    so that every weight before it (and the head's kernel) gets a gradient of exactly 0.
    Biases and norms start away from 0, where decay would show."""
    pixels = keras.Input(input_shape)  # 8 x 8
    ids = tf.cast(keras.layers.Flatten()(pixels), "int32")
    tokens = keras.layers.Embedding(17, 4, name="token_embedding")(ids)
    x = keras.layers.LayerNormalization(name="block0_norm1", beta_initializer="ones")(tokens)
    x = keras.layers.Dense(4, bias_initializer="ones", name="block0_ffn1")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Rescaling(0.0)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return keras.Model(pixels, outputs)


def weights_after(strategy, precision: str, exclude: tuple[str, ...]
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    # Not XLA-compiled: the decay is applied before the update (compiled or not), and
    # compiling per variable would take most of the test's time.
    config = TrainConfig(epochs=1, steps_per_epoch=STEPS, global_batch_size=32, verbose=0,
                         precision=precision, exclude_from_weight_decay=exclude,
                         jit_compile_update=False,
                         optimizer=lambda: keras.optimizers.AdamW(RATE, weight_decay=DECAY))
    trainer = Trainer(config, strategy)
    splits = load_digits(validation_fraction=0.0)  # no validation pass to trace
    set_seed(5)
    model = trainer.build_model(build_zero_gradient, splits)
    inner = inference_model(model)
    before = {v.name: v.numpy() for v in inner.trainable_variables}
    trainer.fit(model, splits, seed=0)
    return before, {v.name: v.numpy() for v in inner.trainable_variables}


@pytest.mark.parametrize(("strategy", "precision"), [("default", "float32"),
                                                     ("mirrored", "float32"),
                                                     ("mirrored", "mixed_bfloat16")])
def test_kernels_and_embeddings_decay_and_biases_and_norms_do_not(strategy: str,
                                                                  precision: str) -> None:
    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    before, after = weights_after(make(), precision, ("biases", "norms"))
    shrink = (1 - RATE * DECAY) ** STEPS  # Adam's step is 0 on a zero gradient: decay alone
    for name in ("token_embedding/embeddings:0", "block0_ffn1/kernel:0",
                 "predictions/kernel:0"):
        assert np.abs(before[name]).min() > 0, name
        np.testing.assert_allclose(after[name], shrink * before[name], rtol=1e-6, err_msg=name)
    for name in ("block0_norm1/gamma:0", "block0_norm1/beta:0", "block0_ffn1/bias:0"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
        assert np.abs(before[name]).min() > 0, name  # ones: decay would have shown
    assert not np.allclose(after["predictions/bias:0"], before["predictions/bias:0"])  # trains


def test_without_the_exclusion_keras_decays_biases_and_norms_too() -> None:
    before, after = weights_after(default_strategy(), "float32", ())
    shrink = (1 - RATE * DECAY) ** STEPS
    for name in ("block0_norm1/gamma:0", "block0_norm1/beta:0", "block0_ffn1/bias:0"):
        np.testing.assert_allclose(after[name], shrink * before[name], rtol=1e-6, err_msg=name)


def test_embeddings_can_be_excluded_and_nothing_to_exclude_from_is_one_line() -> None:
    before, after = weights_after(default_strategy(), "float32", ("embeddings",))
    name = "token_embedding/embeddings:0"
    np.testing.assert_array_equal(after[name], before[name])
    trainer = Trainer(TrainConfig(exclude_from_weight_decay=("biases",)), default_strategy())
    with pytest.raises(ConfigError, match=r"^TrainConfig.exclude_from_weight_decay leaves "
                                          r"biases out of the optimizer's weight decay, but "
                                          r"Adam has none \(weight_decay None\); set keras."
                                          r"optimizers.Adam.weight_decay, or leave this out$"):
        trainer.build_model(build_mlp, load_digits())
    with pytest.raises(ConfigError, match="TrainConfig.exclude_from_weight_decay must be"):
        TrainConfig(exclude_from_weight_decay=("layernorm",))


def test_attention_projection_biases_are_biases_though_not_vectors() -> None:
    """MultiHeadAttention's query, key and value biases are (heads, size) matrices: a rule
    by rank (vectors only) would decay them."""
    from lmt_tf.optim.weight_decay import excluded

    x = keras.Input((5, 8))
    y = keras.layers.MultiHeadAttention(2, 4, name="block0_attention")(x, x)
    model = keras.Model(x, keras.layers.LayerNormalization(name="final_norm")(y))
    names = sorted(v.name for v in excluded(model, ("biases", "norms")))
    assert names == sorted([f"block0_attention/{p}/bias:0"
                            for p in ("query", "key", "value", "attention_output")]
                           + ["final_norm/gamma:0", "final_norm/beta:0"])
    assert [len(v.shape) for v in excluded(model, ("biases",))] == [2, 2, 2, 1]
    assert len(model.trainable_variables) == 10  # the 4 kernels are left to decay
