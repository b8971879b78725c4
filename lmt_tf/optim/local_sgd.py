"""Local SGD ("local update"; Lin et al., 2020, "Don't Use Large Mini-Batches, Use Local
SGD"): each replica takes H optimizer steps on its own data without synchronising, then
the replicas' weights (and optimizer state) are averaged with one all-reduce. Post-local
SGD trains synchronously for the first T steps, then locally.

The replicas' diverging copies are on-read-synchronised variables: each replica updates
its own copy, and reading outside a replica (checkpoints, export) gives their mean.
``LocalSGD`` is the technique (``TrainConfig.local_steps``, ``sync_steps``);
``ReplicaAveraging`` the callback that averages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.optim.technique import Technique
from lmt_tf.runtime.strategy import local_updates_unsupported


@contextlib.contextmanager
def replica_local_variables() -> Iterator[None]:
    """Floating-point variables made inside become one copy per replica (model weights
    are made non-trainable for TensorFlow, which forbids trainable on-read variables;
    Keras still lists them as trainable weights and the train step watches them)."""

    def creator(next_creator, **kwargs):
        dtype = kwargs.get("dtype")
        if dtype is not None and not tf.as_dtype(dtype).is_floating:
            return next_creator(**kwargs)
        kwargs.update(synchronization=tf.VariableSynchronization.ON_READ,
                      aggregation=tf.VariableAggregation.MEAN, trainable=False)
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield


class ReplicaAveraging(keras.callbacks.Callback):
    """Switches the train step to local updates after ``sync_steps`` optimizer steps and
    averages the replicas' weights every ``local_steps`` local steps, and at the end."""

    _supports_tf_logs = True  # the batch hook reads no logs

    def __init__(self, local_steps: int, sync_steps: int, variables: list[tf.Variable]):
        super().__init__()
        self.local_steps = local_steps
        self.sync_steps = sync_steps
        self.variables = variables
        self.synchronisations = 0  # weight averagings so far
        self._epoch = 0
        self._since_average = 0
        self._average = None

    def average(self) -> None:
        """One all-reduce: every replica's weights become the mean of all replicas'."""
        strategy = self.model.distribute_strategy
        with strategy.scope():
            if self._average is None:
                variables = self.variables

                def mean_of_replicas() -> None:
                    context = tf.distribute.get_replica_context()
                    means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                               [tf.identity(v) for v in variables])
                    for variable, mean in zip(variables, means, strict=True):
                        variable.assign(mean)

                self._average = tf.function(lambda: strategy.run(mean_of_replicas))
            self._average()
        self.synchronisations += 1
        self._since_average = 0

    def _set_local(self, local: bool) -> None:
        if self.model.local_updates != local:
            self.model.local_updates = local
            self.model.train_function = self.model.make_train_function(force=True)

    @property
    def steps_per_epoch(self) -> int:
        return self.params["steps"]  # what fit runs per epoch

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch = epoch
        self._set_local(epoch * self.steps_per_epoch >= self.sync_steps)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        step = self._epoch * self.steps_per_epoch + batch + 1
        if step <= self.sync_steps:
            if step == self.sync_steps:
                self._set_local(True)
            return
        self._since_average += 1
        if self._since_average == self.local_steps:
            self.average()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None:
            logs["weight_synchronisations"] = float(self.synchronisations)

    def on_train_end(self, logs=None) -> None:
        if self._since_average:
            self.average()  # the model evaluated and exported is the replicas' mean


@dataclass
class LocalSGD(Technique):
    """Local SGD: every replica updates its own copy of the weights, and the copies are
    averaged every ``local_steps`` steps; post-local SGD after ``sync_steps``
    synchronous ones."""

    local_steps: int | None = None  # local SGD: average replicas every H local steps
    sync_steps: int = 0  # post-local SGD: synchronous optimizer steps before local ones

    allows_fused_update = False  # its local steps would need clipping factors per replica

    def active(self) -> bool:
        return self.local_steps is not None

    def validate(self, config: Any) -> None:
        if self.local_steps is not None:
            check(self.local_steps >= 1, "TrainConfig.local_steps",
                  f"must be >= 1, got {self.local_steps}")
            check(config.steps_per_execution == 1, "TrainConfig.local_steps",
                  "needs TrainConfig.steps_per_execution = 1 (averaging runs between steps)")
            # The loss-scale optimizer decides "finite?" on replica 0 alone: other replicas
            # would apply their overflowed local steps, and averaging would spread them.
            check(config.precision != "mixed_float16", "TrainConfig.local_steps",
                  "cannot be combined with TrainConfig.precision = 'mixed_float16' (loss "
                  "scaling skips overflowed steps by replica 0's gradients only); use "
                  "'mixed_bfloat16', which needs no loss scaling")
        check(self.sync_steps >= 0, "TrainConfig.sync_steps",
              f"must be >= 0, got {self.sync_steps}")

    def check(self, strategy: tf.distribute.Strategy) -> None:
        reason = local_updates_unsupported(strategy)
        check(reason is None, "TrainConfig.local_steps", f"cannot be used: {reason}")

    def variables(self) -> contextlib.AbstractContextManager:
        # Each replica keeps its own weights and optimizer state.
        return replica_local_variables()

    def callbacks(self, step: keras.Model) -> list[keras.callbacks.Callback]:
        weights = [v for v in inference_model(step).weights if v.dtype.is_floating]
        return [ReplicaAveraging(self.local_steps, self.sync_steps, weights)]
