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
