"""Row-sparse updates of embedding tables: a second optimizer for the variables of the
model's ``keras.layers.Embedding`` layers (``TrainConfig.embedding_optimizer``), which
touches only the rows a step looked up, in the tables and in its own slots, while the
rest of the model keeps ``TrainConfig.optimizer`` (Adam, say).

An embedding lookup's gradient is a ``tf.IndexedSlices`` (the looked-up rows). What
tf-keras 2.21's optimizers do with it (``tf_keras/src/optimizers/``):

- ``Adagrad`` and ``SGD`` without momentum update only those rows (scatter-adds).
- ``Ftrl`` does not: it runs its dense update for every row ("Ftrl optimizer has the
  same implementation for sparse and dense gradients update"), rewriting the whole
  table and both slots each step. ``SparseFtrl`` here is row-sparse.
- ``Adam``, ``RMSprop`` and SGD with momentum decay their slots over every row.
- Slots are created beside each shard of a partitioned table (parameter servers), but
  ``Adagrad`` and ``Ftrl`` compute their initial values in the calling process: the
  coordinator would hold a whole table's worth of them while building (measured with a
  381 MB table over 2 ps: +579 MB of the coordinator's peak RSS). ``SparseAdagrad`` and
  ``SparseFtrl`` compute them on the device of the shard (+0 MB).

The train step (``train_step.MicroBatchTrainStep``) keeps those gradients sparse from
the tape to the update; a technique that would have to densify a table's gradient or
touch every row is refused in one line (``EmbeddingOptimizer.validate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check
from lmt_tf.errors import ConfigError
from lmt_tf.optim.technique import StepSpec, Technique
from lmt_tf.optim.transforms import AdaptiveGradientClipping

SETTING = "TrainConfig.embedding_optimizer"


def _filled(variable: tf.Variable, value: float) -> tf.Tensor:
    """A tensor of ``variable``'s shape filled with ``value``, made on the variable's
    device: under parameter servers on the ps that holds the shard, never in this
    process."""
    with tf.device(variable.device):
        return tf.fill(variable.shape, tf.constant(value, variable.dtype))


class SparseAdagrad(keras.optimizers.Adagrad):
    """Adagrad (Duchi et al., 2011), as ``keras.optimizers.Adagrad``, whose update of a
    sparse gradient touches only the looked-up rows; its accumulators start on the
    device of the variable (shard) they belong to."""

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        keras.optimizers.Optimizer.build(self, var_list)  # the base: index, EMA
        if getattr(self, "_built", False):
            return
        self._built = True
        self._accumulators = [
            self.add_variable_from_reference(
                var, "accumulator", initial_value=_filled(var, self.initial_accumulator_value))
            for var in var_list]


class SparseFtrl(keras.optimizers.Ftrl):
    """FTRL-Proximal (McMahan et al., 2013), the settings of ``keras.optimizers.Ftrl``,
    updated with TensorFlow's fused FTRL kernels: for a sparse gradient only the
    looked-up rows of the variable and of both slots change (Keras' own ``Ftrl`` rewrites
    every row). The kernels are those of ``keras.optimizers.legacy.Ftrl``; slots start
    on the device of the variable (shard) they belong to."""

    def build(self, var_list: Sequence[tf.Variable]) -> None:
        keras.optimizers.Optimizer.build(self, var_list)
        if getattr(self, "_built", False):
            return
        self._accumulators, self._linears = [], []
        for var in var_list:
            self._accumulators.append(self.add_variable_from_reference(
                var, "accumulator", initial_value=_filled(var, self.initial_accumulator_value)))
            self._linears.append(self.add_variable_from_reference(
                var, "linear", initial_value=_filled(var, 0.0)))
        self._built = True

    def update_step(self, gradient: tf.Tensor | tf.IndexedSlices, variable: tf.Variable
                    ) -> tf.Operation:
        index = self._index_dict[self._var_key(variable)]
        accumulator, linear = self._accumulators[index], self._linears[index]
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        # As the legacy optimizer: beta goes into the L2 strength the kernels take.
        settings = dict(
            lr=lr, l1=tf.cast(self.l1_regularization_strength, dtype),
            l2=tf.cast(self.l2_regularization_strength, dtype) + self.beta / (2.0 * lr),
            l2_shrinkage=tf.cast(self.l2_shrinkage_regularization_strength, dtype),
            lr_power=tf.cast(self.learning_rate_power, dtype))
        handles = dict(var=variable.handle, accum=accumulator.handle, linear=linear.handle)
        if isinstance(gradient, tf.IndexedSlices):
            return tf.raw_ops.ResourceSparseApplyFtrlV2(
                **handles, grad=gradient.values, indices=gradient.indices, **settings)
        return tf.raw_ops.ResourceApplyFtrlV2(**handles, grad=gradient, **settings)


# The optimizers that update only the looked-up rows of a sparse gradient (SGD only
# without momentum), and what others do instead (the first class that matches).
_ROW_SPARSE: tuple[type, ...] = (SparseAdagrad, SparseFtrl)
_DENSE_INSTEAD = {
    keras.optimizers.Adagrad: "makes its accumulators' initial values in this process (a "
                              "whole table's worth on the coordinator under parameter "
                              "servers); @SparseAdagrad updates the same way",
    keras.optimizers.Ftrl: "runs its dense update for every row",
    keras.optimizers.SGD: "decays its momentum over every row",
}


_ALLOWED = "@SparseAdagrad, @SparseFtrl or @keras.optimizers.SGD without momentum"


def check_row_sparse_class(cls: type) -> None:
    """Raises ConfigError unless instances of ``cls`` can update only the looked-up
    rows (SGD: if without momentum, which ``check_row_sparse`` checks on the instance).

    Raises:
      ConfigError: naming the class, what it does instead and what is allowed.
    """
    name = cls.__name__
    check(issubclass(cls, keras.optimizers.Optimizer), SETTING,
          f"must make a keras.optimizers optimizer (one of {_ALLOWED}), got {name}")
    if issubclass(cls, (*_ROW_SPARSE, keras.optimizers.SGD)):
        return
    why = next((reason for dense, reason in _DENSE_INSTEAD.items() if issubclass(cls, dense)),
               "updates every row (its slots decay everywhere)")
    raise ConfigError(f"{SETTING} must update only the looked-up rows: {name} {why}; "
                      f"use {_ALLOWED}")


def check_row_sparse(optimizer: Any) -> None:
    """Raises ConfigError unless ``optimizer`` updates only the looked-up rows of a
    sparse gradient (and its slots only there).

    Raises:
      ConfigError: naming the optimizer, what it does instead and what is allowed.
    """
    check_row_sparse_class(type(optimizer))
    name = type(optimizer).__name__
    if isinstance(optimizer, keras.optimizers.SGD) and not isinstance(optimizer, _ROW_SPARSE):
        check(not optimizer.momentum, SETTING,
              f"must update only the looked-up rows: SGD {_DENSE_INSTEAD[keras.optimizers.SGD]}"
              f"; use {_ALLOWED}")
    for option, why in (("weight_decay", "decays every row"),
                        ("use_ema", "averages every row")):
        check(not getattr(optimizer, option, None), SETTING,
              f"{name} with {option} {why}: leave {option} off for the embedding tables")


def embedding_variables(model: keras.Model) -> list[tf.Variable]:
    """The trainable variables of ``model``'s ``keras.layers.Embedding`` layers (each
    shard of a partitioned table), in the order of ``model.trainable_variables``."""
    tables = {id(v) for layer in model.submodules
              if isinstance(layer, keras.layers.Embedding) for v in layer.trainable_weights}
    return [v for v in model.trainable_variables if id(v) in tables]


@dataclass
class EmbeddingOptimizer(Technique):
    """The embedding tables' own optimizer: the variables of ``keras.layers.Embedding``
    layers are updated by it, row-sparse (only the rows a step looked up, in the table
    and in its slots), the rest by ``TrainConfig.optimizer``. It keeps its own learning
    rate: ``TrainConfig.learning_rate_schedule`` and divergence rollbacks change the
    other optimizer's."""

    # A row-sparse optimizer class called with no arguments (@SparseAdagrad, @SparseFtrl);
    # None: one optimizer for every variable.
    embedding_optimizer: Callable[..., Any] | None = None

    def validate(self, config: Any) -> None:
        if isinstance(self.embedding_optimizer, type):  # a class bound in gin: check now
            check_row_sparse_class(self.embedding_optimizer)
        check(config.precision != "mixed_float16", SETTING,
              "cannot be combined with TrainConfig.precision 'mixed_float16': loss scaling "
              "skips a step only in TrainConfig.optimizer; use 'mixed_bfloat16' or 'float32'")
        check(not any(isinstance(t, AdaptiveGradientClipping)
                      for t in getattr(config, "gradient_transforms", ())), SETTING,
              "cannot be combined with AdaptiveGradientClipping in "
              "TrainConfig.gradient_transforms: its unit norms read every row of each table "
              "every step")
        check(not getattr(config, "local_steps", 0), SETTING,
              "cannot be combined with TrainConfig.local_steps: local SGD averages every "
              "row of each table across replicas")

    def shape(self, step: StepSpec) -> None:
        step.embedding_optimizer = self.embedding_optimizer
