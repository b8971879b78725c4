"""The Trainer: builds model and optimizer inside the strategy's scope, runs ``model.fit``
on per-worker input, evaluates, and saves/restores per-epoch checkpoints.

The Trainer asks the strategy how many replicas there are, and the training techniques
(``train_config.TECHNIQUES``, or a stage's) what they change; it never names a model or
a technique.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check, configured_call
from lmt_tf.data.pipeline import BatchPlan, InputConfig, eval_steps, plan_batches
from lmt_tf.data.splits import Split, Splits
from lmt_tf.optim import model_transforms, schedules, technique, weight_decay
from lmt_tf.optim.model_transforms import ModelTransform
from lmt_tf.optim.schedules import ScaledSchedule
from lmt_tf.optim.technique import Technique
from lmt_tf.optim.train_step import MicroBatchTrainStep, step_transforms
from lmt_tf.training.callbacks import LearningRate, MetricsSink
from lmt_tf.training.checkpoints import timed_restore
from lmt_tf.training.preemption import PREEMPTED_DIR, StartAt
from lmt_tf.training.train_config import TrainConfig, compile_metrics

ModelFn = Callable[..., keras.Model]


@dataclass
class TrainResult:
    """What training produced."""

    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch logs
    initial_epoch: int = 0  # epochs already done when this call started (resume)


class Trainer:
    """Trains one model under one strategy."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy,
                 input_config: InputConfig | None = None):
        self.config = config
        self.strategy = strategy
        self.input_config = input_config or InputConfig()

    def plan(self, train_split: Split) -> BatchPlan:
        """The batch plan for ``train_split`` under this strategy's replicas.

        Raises:
          ConfigError: if a technique cannot split the per-replica batch, or the precision
            cannot run under the strategy.
        """
        check(not (self.config.precision == "mixed_float16"
                   and isinstance(self.strategy, tf.distribute.ParameterServerStrategy)),
              "TrainConfig.precision", "'mixed_float16' cannot train under parameter servers "
              "(tf-keras has no loss scaling there); use 'mixed_bfloat16' or 'float32'")
        plan = plan_batches(len(train_split), self.config.global_batch_size,
                            self.strategy.num_replicas_in_sync, self.config.steps_per_epoch)
        for used in self.config.techniques():
            used.check_batch(plan.per_replica_batch_size)
        return plan

    def build_model(self, model_fn: ModelFn, splits: Splits,
                    transforms: Sequence[ModelTransform] = (),
                    techniques: Sequence[Technique] = ()) -> keras.Model:
        """Builds and compiles the model; variables (optimizer slots included) are created
        in the strategy's scope so that they are mirrored or placed on parameter servers.

        The returned model is the built one with a stage's model ``transforms`` applied,
        then the train step of a stage's ``techniques`` and the configured ones
        (``model_transforms.inference_model`` strips them all again).
        """
        previous = keras.mixed_precision.global_policy()
        # Layers take the policy in force when they are built, and compile wraps the
        # optimizer for loss scaling under mixed_float16; nothing else sees the policy.
        keras.mixed_precision.set_global_policy(self.config.precision)
        try:
            return self._build(model_fn, splits, transforms,
                               [*technique.active(techniques), *self.config.techniques()])
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def _build(self, model_fn: ModelFn, splits: Splits, transforms: Sequence[ModelTransform],
               techniques: Sequence[Technique]) -> keras.Model:
        for used in techniques:
            used.check(self.strategy)
        with self.strategy.scope():
            with technique.variables(techniques):
                model = configured_call(model_fn, "run_experiment.model",
                                        input_shape=splits.input_shape,
                                        num_classes=splits.num_classes)
            model = model_transforms.apply(
                model, [*transforms, *step_transforms(techniques, self.config)])
            optimizer = configured_call(self.config.optimizer, "TrainConfig.optimizer")
            check(not isinstance(optimizer, keras.optimizers.legacy.Optimizer),
                  "TrainConfig.optimizer", f"is a legacy optimizer ({type(optimizer).__name__}"
                  " from keras.optimizers.legacy); use its keras.optimizers counterpart")
            optimizer = self._scheduled(optimizer, splits)
            configured_call(model.compile, "TrainConfig (loss, metrics, optimizer)",
                            optimizer=optimizer, loss=self.config.loss,
                            metrics=compile_metrics(self.config.metrics),
                            steps_per_execution=self.config.steps_per_execution)
            _compile_update(model.optimizer, self._jit_compile_update(techniques))
            if (getattr(_inner(model.optimizer), "jit_compile", False)
                    and all(t.allows_fused_update for t in techniques)
                    and isinstance(model, MicroBatchTrainStep)):
                model.fuse_rescaling()  # clipping factors multiplied inside the update
            if self.config.exclude_from_weight_decay:
                weight_decay.exclude(_inner(model.optimizer), model,
                                     self.config.exclude_from_weight_decay)
            # Slots exist before a checkpoint restore, so restore is immediate, not deferred.
            with technique.variables(techniques):  # e.g. optimizer state per replica
                if isinstance(model, MicroBatchTrainStep):  # its optimizers' own variables
                    model.build_optimizers()
                else:
                    model.optimizer.build(model.trainable_variables)
        return model

    def _scheduled(self, optimizer: keras.optimizers.Optimizer, splits: Splits
                   ) -> keras.optimizers.Optimizer:
        """``optimizer``, or one of the same config with another learning rate: the
        configured schedule sized to this run (``TrainConfig.epochs`` x steps per epoch
        optimizer steps), peaking at the optimizer's own rate; under divergence retries,
        any schedule as a ``ScaledSchedule``, which a rollback can lower."""
        rate = _learning_rate(optimizer)
        shape = self.config.learning_rate_schedule
        name = type(optimizer).__name__
        if shape is not None:
            check(isinstance(rate, tf.Variable), schedules.SETTING,
                  f"peaks at the optimizer's learning rate, but {name} already has a "
                  f"schedule ({type(rate).__name__}); bind a number as "
                  f"keras.optimizers.{name}.learning_rate")
            total = self.plan(splits.train).steps_per_epoch * self.config.epochs
            rate = shape.build(float(rate.numpy()), total)
        if self.config.divergence_retries and isinstance(
                rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = ScaledSchedule(rate)
        if rate is _learning_rate(optimizer):
            return optimizer
        return configured_call(type(optimizer).from_config, "TrainConfig.optimizer",
                               {**optimizer.get_config(), "learning_rate": rate})

    def checkpoint_manager(self, model: keras.Model, directory: Path,
                           keep: int = 2) -> tf.train.CheckpointManager:
        """Keeps the ``keep`` newest checkpoints of model and optimizer in ``directory``:
        per-epoch ones in a run's ``checkpoints/``, the one saved on preemption in
        ``checkpoints/preempted/`` (numbered by global step)."""
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=keep)

    @staticmethod
    def restore(model: keras.Model, directory: Path, steps_per_epoch: int,
                sink: MetricsSink | None = None) -> StartAt:
        """Restores the newest checkpoint in ``directory`` into ``model`` and its optimizer:
        the one saved on preemption if it is further along than the last per-epoch one.
        Its restore seconds and bytes go to ``sink`` (``checkpoints.RESTORE_SECONDS``,
        ``checkpoints.BYTES``) at step = the epochs it completed.

        Returns:
          Where training continues (epoch 0, step 0 if there is no checkpoint).
        """
        latest, epochs = latest_checkpoint(directory)
        preempted = tf.train.latest_checkpoint(str(directory / PREEMPTED_DIR))
        step = int(preempted.rsplit("-", 1)[1]) if preempted else 0
        if step > epochs * steps_per_epoch:
            latest, start = preempted, StartAt(*divmod(step, steps_per_epoch))
        else:
            start = StartAt(epochs, 0)
        if latest is None:
            return StartAt()
        cost = timed_restore(tf.train.Checkpoint(model=model, optimizer=model.optimizer), latest)
        if sink:
            sink(cost, start.epoch)
        return start

    def fit(self, model: keras.Model, splits: Splits, seed: int,
            start: StartAt = StartAt(),  # noqa: B008 (frozen, so one shared default is safe)
            callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
        """Trains from ``start`` to the end of epoch ``config.epochs``, validating every
        epoch.

        Epoch ``e`` sees the same batches whatever step training started from, so a
        resumed run continues exactly where the interrupted one stopped (a run started
        mid-epoch logs that epoch's metrics over the steps it ran).
        """
        plan = self.plan(splits.train)
        input_fn = splits.train.train_input_fn(plan, seed, start.epoch, self.input_config,
                                               start_step=start.step)
        # The configured schedule's rate joins each epoch's logs before callbacks read them.
        scheduled = self.config.learning_rate_schedule is not None
        callbacks = [*([LearningRate()] if scheduled else []),
                     *model_transforms.transform_callbacks(model), *callbacks]
        # Keras asks this for the first (epoch, step) of fit, as for its BackupAndRestore.
        model._training_state = start if start.step else None  # noqa: SLF001
        try:
            history = model.fit(
                keras.utils.experimental.DatasetCreator(input_fn),
                epochs=self.config.epochs,
                initial_epoch=start.epoch,
                steps_per_epoch=plan.steps_per_epoch,
                validation_data=splits.validation.eval_dataset(plan.global_batch_size)
                if len(splits.validation) else None,
                validation_steps=eval_steps(splits.validation, plan.global_batch_size),
                callbacks=list(callbacks),
                verbose=self._verbosity(),
            )
        finally:
            model._training_state = None  # noqa: SLF001
        return TrainResult(model, dict(history.history), start.epoch)

    def learning_rate(self, model: keras.Model) -> float:
        """The optimizer's learning rate now (a schedule's: at its last step)."""
        return float(keras.backend.get_value(_inner(model.optimizer).learning_rate))

    def lower_learning_rate(self, model: keras.Model, initial: float, rollbacks: int) -> str:
        """Lowers the optimizer's learning rate to ``initial`` (a constant rate) times
        ``config.divergence_lr_factor`` to the power ``rollbacks``, or scales its
        schedule by that power: each rollback lowers it by the factor again, whatever
        the restored checkpoint holds. Returns the change, for the run's record."""
        rate = _learning_rate(model.optimizer)
        factor = self.config.divergence_lr_factor ** rollbacks
        if isinstance(rate, ScaledSchedule):
            before = float(rate.scale.numpy())
            rate.scale.assign(factor)
            return f"learning-rate schedule scaled by {before:g} -> {factor:g}"
        before = float(rate.numpy())
        rate.assign(initial * factor)
        return f"learning rate {before:g} -> {float(rate.numpy()):g}"

    def evaluate(self, model: keras.Model, split: Split) -> dict[str, float]:
        """Loss and metrics over the whole ``split``."""
        batch = self.config.global_batch_size
        results = model.evaluate(split.eval_dataset(batch), steps=eval_steps(split, batch),
                                 return_dict=True, verbose=0)
        return {k: float(v) for k, v in results.items()}

    def _jit_compile_update(self, techniques: Sequence[Technique]) -> bool:
        if isinstance(self.strategy, tf.distribute.ParameterServerStrategy):
            return False
        if self.config.jit_compile_update is not None:
            return self.config.jit_compile_update
        return (self.strategy.num_replicas_in_sync > 1
                or any(t.waits_for_all_gradients for t in techniques)
                or bool(tf.config.list_physical_devices("GPU")))

    def _verbosity(self) -> int:
        if self.config.verbose is not None:
            return self.config.verbose
        return 1 if sys.stdout.isatty() else 2


def optimizers(model: keras.Model) -> list[keras.optimizers.Optimizer]:
    """Every optimizer that trains ``model`` (the model in its training wrappers): its
    own, and the embedding tables' if it has one."""
    return list(getattr(model, "optimizers", None) or [model.optimizer])


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> Any:
    """The learning-rate variable of ``optimizer`` (through a loss-scaling wrapper), or
    its schedule."""
    return getattr(_inner(optimizer), "_learning_rate", None)


def _inner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer itself, under a loss-scaling wrapper (mixed_float16) if any."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def latest_checkpoint(directory: Path) -> tuple[str | None, int]:
    """The newest per-epoch checkpoint in ``directory`` and the epochs it completed (its
    number: the manager saves once per epoch), or (None, 0)."""
    latest = tf.train.latest_checkpoint(str(directory))
    return (latest, int(latest.rsplit("-", 1)[1])) if latest else (None, 0)


def _compile_update(optimizer: keras.optimizers.Optimizer, jit_compile: bool) -> None:
    """Turns XLA for the optimizer's per-variable update on or off (through a
    loss-scaling wrapper). Optimizers without the switch (``keras.optimizers.legacy``)
    keep their fused kernels."""
    from tf_keras.src.utils.tf_utils import can_jit_compile

    inner = _inner(optimizer)
    if hasattr(inner, "jit_compile"):
        inner.jit_compile = jit_compile and can_jit_compile()
