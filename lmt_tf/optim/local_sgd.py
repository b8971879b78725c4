"""Local SGD ("local update"; Lin et al., 2020, "Don't Use Large Mini-Batches, Use Local
SGD"): each replica takes H optimizer steps on its own data without synchronising, then
the replicas' weights (and optimizer state) are averaged with one all-reduce. Post-local
SGD trains synchronously for the first T steps, then locally.

The replicas' diverging copies are on-read-synchronised variables: each replica updates
its own copy, and reading outside a replica (checkpoints, export) gives their mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import tensorflow as tf
import tf_keras as keras


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


class LocalSGD(keras.callbacks.Callback):
    """Switches the train step to local updates after ``sync_steps`` optimizer steps and
    averages the replicas' weights every ``local_steps`` local steps, and at the end."""

    _supports_tf_logs = True  # the batch hook reads no logs

    def __init__(self, local_steps: int, sync_steps: int, steps_per_epoch: int,
                 variables: list[tf.Variable]):
        super().__init__()
        self.local_steps = local_steps
        self.sync_steps = sync_steps
        self.steps_per_epoch = steps_per_epoch
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
