"""Mixed precision: float32 variables, the policy's compute dtype, float32 outputs."""

from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


@pytest.mark.parametrize("precision, compute", [("mixed_bfloat16", "bfloat16"),
                                                ("mixed_float16", "float16")])
def test_policy_dtypes_and_convergence(precision: str, compute: str) -> None:
    splits = load_digits()
    config = TrainConfig(epochs=6, global_batch_size=64, verbose=0, precision=precision,
                         optimizer=lambda: keras.optimizers.Adam(0.01))
    trainer = Trainer(config, default_strategy())
    model = trainer.build_model(build_mlp, splits)
    hidden = model.get_layer("dense_0")
    assert hidden.compute_dtype == compute and hidden.variable_dtype == "float32"
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert model.output.dtype == "float32"
    assert (precision == "mixed_float16") == isinstance(
        model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert keras.mixed_precision.global_policy().name == "float32"  # nothing else sees it
    history = trainer.fit(model, splits, seed=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert trainer.evaluate(model, splits.test)["accuracy"] > 0.85


def test_mixed_precision_with_accumulation_keeps_loss_scaling() -> None:
    splits = load_digits()
    config = TrainConfig(epochs=3, global_batch_size=64, verbose=0, micro_batches=2,
                         precision="mixed_float16",
                         optimizer=lambda: keras.optimizers.Adam(0.01))
    trainer = Trainer(config, default_strategy())
    model = trainer.build_model(build_mlp, splits)
    history = trainer.fit(model, splits, seed=0).history
    assert np.isfinite(history["gradient_norm"]).all()
    assert history["loss"][-1] < history["loss"][0]
    assert inference_model(model).get_layer("dense_0").compute_dtype == "float16"


def test_unknown_precision() -> None:
    with pytest.raises(ConfigError, match="TrainConfig.precision must be one of"):
        TrainConfig(precision="float16")


def test_clip_by_value_keeps_non_finite_gradients_non_finite() -> None:
    import tensorflow as tf

    from lmt_tf.optim.transforms import ClipByValue

    gradient = tf.constant([0.5, -3.0, np.inf, -np.inf, np.nan])
    (clipped,) = ClipByValue(1.0)([gradient], [tf.Variable(tf.zeros(5))])
    np.testing.assert_array_equal(clipped.numpy()[:2], [0.5, -1.0])
    assert not np.isfinite(clipped.numpy()[2:]).any()


def test_an_overflowed_step_under_clipping_is_skipped_and_lowers_the_scale() -> None:
    """mixed_float16 on the CPU: with a loss scale of 2^100 the float16 backward pass
    overflows; the step must leave the weights as they were and halve the scale, with
    the clipping chain in between."""
    from lmt_tf.optim.transforms import ClipByValue

    splits = load_digits()
    config = TrainConfig(epochs=1, global_batch_size=64, steps_per_epoch=1, verbose=0,
                         precision="mixed_float16",
                         gradient_transforms=(ClipByValue(1.0),),
                         optimizer=lambda: keras.optimizers.SGD(0.1))
    trainer = Trainer(config, default_strategy())
    model = trainer.build_model(build_mlp, splits)
    scale = model.optimizer._loss_scale._current_loss_scale  # noqa: SLF001 (no public setter)
    scale.assign(2.0 ** 100)
    before = [w.copy() for w in inference_model(model).get_weights()]
    trainer.fit(model, splits, seed=0)
    for a, b in zip(before, inference_model(model).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(model.optimizer.loss_scale) == 2.0 ** 99


def test_local_sgd_with_loss_scaling_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="TrainConfig.local_steps cannot be combined with "
                                          "TrainConfig.precision = 'mixed_float16'"):
        TrainConfig(local_steps=4, precision="mixed_float16")
    TrainConfig(local_steps=4, precision="mixed_bfloat16")  # no loss scaling: allowed


def test_parameter_servers_with_loss_scaling_are_refused_before_anything_is_built() -> None:
    import tensorflow as tf

    class _ParameterServers(tf.distribute.ParameterServerStrategy):
        def __init__(self) -> None:  # the type is what counts; no cluster is needed
            pass

    trainer = Trainer(TrainConfig(precision="mixed_float16"), _ParameterServers())
    with pytest.raises(ConfigError, match="'mixed_float16' cannot train under parameter "
                                          "servers"):
        trainer.plan(load_digits().train)
