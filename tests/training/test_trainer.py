"""Trainer configuration checks and checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.transforms import ClipByGlobalNorm
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.callbacks import EpochCheckpoint
from lmt_tf.training.preemption import StartAt
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "TrainConfig.epochs must be >= 1"),
    ({"epochs": 2.5}, "TrainConfig.epochs must be an integer"),
    ({"global_batch_size": "64"}, "TrainConfig.global_batch_size must be an integer"),
    ({"steps_per_execution": 0}, "steps_per_execution must be >= 1"),
    ({"metrics": "accuracy"}, "TrainConfig.metrics must be"),
])
def test_bad_train_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_a_legacy_optimizer_is_refused_with_its_counterpart_named() -> None:
    config = TrainConfig(global_batch_size=64, verbose=0,
                         optimizer=lambda: keras.optimizers.legacy.Adam(0.01))
    with pytest.raises(ConfigError, match="legacy optimizer .Adam.*keras.optimizers"):
        Trainer(config, default_strategy()).build_model(build_mlp, load_digits())


def test_checkpoint_restores_weights_and_epoch(tmp_path: Path) -> None:
    splits = load_digits()
    trainer = Trainer(TrainConfig(epochs=2, global_batch_size=64, verbose=0),
                      default_strategy())
    model = trainer.build_model(build_mlp, splits)
    manager = trainer.checkpoint_manager(model, tmp_path)
    saved: list[int] = []
    trainer.fit(model, splits, seed=0, callbacks=[EpochCheckpoint(manager, saved.append)])
    assert saved == [1, 2]
    fresh = trainer.build_model(build_mlp, splits)
    assert Trainer.restore(fresh, tmp_path, 18) == StartAt(epoch=2, step=0)
    for a, b in zip(model.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert fresh.optimizer.iterations.numpy() == model.optimizer.iterations.numpy()


@pytest.mark.parametrize("precision", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_xla_compiled_update_trains_as_the_plain_update(precision: str) -> None:
    """The optimizer's update can be XLA-compiled on CPU too (through the loss-scaling
    wrapper under mixed precision); it computes the same update."""
    splits = load_digits()
    weights = {}
    for jit in (True, False):
        config = TrainConfig(epochs=1, steps_per_epoch=5, global_batch_size=64, verbose=0,
                             precision=precision, jit_compile_update=jit)
        trainer = Trainer(config, default_strategy())
        set_seed(3)
        model = trainer.build_model(build_mlp, splits)
        assert getattr(model.optimizer, "inner_optimizer", model.optimizer).jit_compile == jit
        initial = model.get_weights()
        trainer.fit(model, splits, seed=0)
        weights[jit] = model.get_weights()
    for a, b in zip(weights[True], weights[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not np.allclose(weights[True][0], initial[0])  # it trained


def _jit_compiled(strategy, **config) -> bool:
    trainer = Trainer(TrainConfig(**config), strategy)
    model = trainer.build_model(build_mlp, load_digits())
    return getattr(model.optimizer, "inner_optimizer", model.optimizer).jit_compile


def test_the_update_is_compiled_by_default_where_it_waits_for_every_gradient() -> None:
    assert not _jit_compiled(default_strategy())  # overlaps backpropagation: not worth it
    assert _jit_compiled(default_strategy(), gradient_transforms=(ClipByGlobalNorm(1.0),))
    assert _jit_compiled(mirrored_strategy(2))  # after the all-reduce
    assert not _jit_compiled(mirrored_strategy(2), jit_compile_update=False)
