"""Strategies: replicas, per-replica batches, and MirroredStrategy == one device."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.pipeline import array_train_input_fn
from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.runtime.env import configure_cpu_devices, set_seed
from lmt_tf.runtime.strategy import (
    default_strategy,
    describe,
    mirrored_strategy,
    one_device_strategy,
)
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


def test_mirrored_on_cpu_has_one_replica_per_logical_device() -> None:
    strategy = mirrored_strategy(num_cpu_devices=2)
    info = describe(strategy)
    assert info.name == "MirroredStrategy" and info.replicas == 2
    assert len(set(info.devices)) == 2 and all("CPU" in d for d in info.devices)


def test_more_cpu_devices_than_initialised_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="already running with 2"):
        configure_cpu_devices(3)


def test_unknown_cross_device_ops_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cross_device_ops must be one of"):
        mirrored_strategy(cross_device_ops="ring")


def test_one_device_defaults_to_cpu_without_gpu() -> None:
    assert describe(one_device_strategy()).devices[0].endswith("CPU:0")


def test_per_replica_batch_is_half_the_global_batch_and_covers_it() -> None:
    splits = load_digits()
    trainer = Trainer(TrainConfig(global_batch_size=32), mirrored_strategy(2))
    plan = trainer.plan(splits.train)
    assert plan.replicas == 2 and plan.per_replica_batch_size == 16
    input_fn = array_train_input_fn(splits.train, plan, seed=3, start_epoch=0)
    mirrored = trainer.strategy.distribute_datasets_from_function(input_fn)
    x, _ = next(iter(mirrored))
    parts = trainer.strategy.experimental_local_results(x)
    assert [p.shape[0] for p in parts] == [16, 16]
    single = next(iter(input_fn(tf.distribute.InputContext())))[0]
    assert single.shape[0] == 32
    np.testing.assert_array_equal(np.concatenate([p.numpy() for p in parts]), single.numpy())


def _one_step(strategy: tf.distribute.Strategy) -> list[np.ndarray]:
    splits = load_digits()
    config = TrainConfig(epochs=1, steps_per_epoch=1, global_batch_size=64, verbose=0,
                         optimizer=lambda: keras.optimizers.SGD(0.5))
    trainer = Trainer(config, strategy)
    set_seed(7)
    model = trainer.build_model(build_mlp, splits)
    trainer.fit(model, splits, seed=11)
    return model.get_weights()


def test_one_mirrored_step_equals_one_default_step_on_the_same_global_batch() -> None:
    single = _one_step(default_strategy())
    mirrored = _one_step(mirrored_strategy(2))
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The step moved the weights: the comparison is not between two initialisations.
    set_seed(7)
    initial = build_mlp((8, 8), 10).get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(initial, single, strict=True)) > 1e-3


def test_two_mirrored_strategies_in_one_process_do_not_mix_reductions() -> None:
    """A sweep or a test session builds several strategies; models of different sizes
    must train under each (collective all-reduce keys would collide on CPUs)."""
    x = np.random.default_rng(0).random((64, 8), dtype=np.float32)
    y = np.arange(64) % 3
    for units in (4, 16):
        strategy = mirrored_strategy(2)
        with strategy.scope():
            model = keras.Sequential([keras.layers.Dense(units, input_shape=(8,)),
                                      keras.layers.Dense(3)])
            model.compile("sgd", "sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
