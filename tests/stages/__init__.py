"""Tests of the stages; ``run_stages`` runs a tiny digits experiment through the plain
root with the stages given."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tf_keras as keras

from lmt_tf import experiment
from lmt_tf.data.sources import load_digits
from lmt_tf.invocation import Configs, ExportConfig, RunOptions
from lmt_tf.models.mlp import build_mlp
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.training.train_config import TrainConfig


def run_stages(stages: Sequence[Any], *, hidden: int = 32, epochs: int = 1,
               optimizer: Callable[[], Any] = lambda: keras.optimizers.SGD(0.1),
               strategy: Callable[[], Any] | None = None, micro_batches: int = 1,
               **options: Any) -> experiment.RunResult:
    """The digits MLP (one hidden layer of ``hidden`` units) through ``stages``."""
    configs = Configs(train=TrainConfig(epochs=epochs, global_batch_size=64, verbose=0,
                                        micro_batches=micro_batches, optimizer=optimizer),
                      export=ExportConfig(mlflow_model=False))
    return experiment.run_experiment(
        load_digits, lambda **k: build_mlp(hidden_units=(hidden,), **k), name="staged",
        strategy=strategy or default_strategy, stages=stages, configs=configs,
        options=RunOptions(echo=lambda _: None, **options))
