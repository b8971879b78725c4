"""The Trainer: builds model and optimizer inside the strategy's scope, runs ``model.fit``
on per-worker input, evaluates, and saves/restores per-epoch checkpoints.

The Trainer asks the strategy how many replicas there are and never names a model.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check, check_types, configured_call
from lmt_tf.data.pipeline import BatchPlan, InputConfig, eval_steps, plan_batches
from lmt_tf.data.splits import Split, Splits
from lmt_tf.errors import ConfigError
from lmt_tf.optim.decoupled import DecoupledBlocks
from lmt_tf.optim.local_sgd import LocalSGD, replica_local_variables
from lmt_tf.optim.train_step import CustomTrainStep, MicroBatchTrainStep
from lmt_tf.runtime.strategy import local_updates_unsupported
from lmt_tf.training import model_transforms
from lmt_tf.training.model_transforms import ModelTransform, inference_model
from lmt_tf.training.preemption import PREEMPTED_DIR, StartAt

ModelFn = Callable[..., keras.Model]
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Metric names that model.compile() maps to the loss's own variant.
_COMPILE_METRIC_NAMES = {"accuracy", "acc", "crossentropy", "ce"}


@dataclass
class TrainConfig:
    """How a model is trained. Batch sizes are global: summed over all replicas."""

    epochs: int = 1  # passes over the training split
    global_batch_size: int = 128  # examples per optimizer step, all replicas together
    steps_per_epoch: int | None = None  # None: every full global batch of the split once
    optimizer: Callable[..., Any] = keras.optimizers.Adam  # called with no arguments
    loss: str = "sparse_categorical_crossentropy"  # a Keras loss name
    metrics: tuple[str, ...] = ("accuracy",)  # Keras metric names
    steps_per_execution: int = 1  # steps per tf.function call (fewer host round trips)
    # XLA-compile the optimizer's update of each variable, fusing its elementwise ops
    # (Adam on the quickstart CNN: 1.3 instead of 3.0 ms on CPU). None (auto): on where
    # the update waits for every gradient (more than one replica in sync, or gradient
    # transforms), since there it is on the critical path; off where it overlaps
    # backpropagation and compiling (~0.5 s) would not pay; Keras' choice (on) with a
    # GPU. Never under parameter servers: XLA cannot reach variables on another ps.
    jit_compile_update: bool | None = None
    verbose: int | None = None  # Keras verbosity; None: bar on a terminal, else per epoch
    deterministic: bool = False  # TensorFlow op determinism (slower; bitwise repeatable)
    micro_batches: int = 1  # k: gradient accumulation over k micro-batches per step
    gradient_transforms: tuple[Callable[..., Any], ...] = ()  # e.g. (@ClipByGlobalNorm(),)
    precision: str = "float32"  # float32 | mixed_float16 (GPU) | mixed_bfloat16
    update_multipliers: dict[str, float] = field(default_factory=dict)  # block -> factor
    unfreeze_epochs: dict[str, int] = field(default_factory=dict)  # block -> first epoch
    decoupled_blocks: tuple[str, ...] = ()  # layers ending each greedily trained block
    # On a NaN or infinite loss: roll back to the last checkpoint and continue with the
    # learning rate times divergence_lr_factor, up to this many times (0: fail at once).
    divergence_retries: int = 0
    divergence_lr_factor: float = 0.5  # in (0, 1)
    local_steps: int | None = None  # local SGD: average replicas every H local steps
    sync_steps: int = 0  # post-local SGD: synchronous optimizer steps before local ones

    def __post_init__(self) -> None:
        for name in ("metrics", "gradient_transforms", "decoupled_blocks"):
            if isinstance(getattr(self, name), list):  # gin writes [...] as a list
                setattr(self, name, tuple(getattr(self, name)))
        check_types(self)
        check(self.epochs >= 1, "TrainConfig.epochs", f"must be >= 1, got {self.epochs}")
        check(self.micro_batches >= 1, "TrainConfig.micro_batches",
              f"must be >= 1, got {self.micro_batches}")
        check(self.precision in PRECISIONS, "TrainConfig.precision",
              f"must be one of {PRECISIONS}, got {self.precision!r}")
        check(all(f >= 0 for f in self.update_multipliers.values()),
              "TrainConfig.update_multipliers", f"must be >= 0, got {self.update_multipliers}")
        check(all(e >= 0 for e in self.unfreeze_epochs.values()),
              "TrainConfig.unfreeze_epochs", f"must be >= 0, got {self.unfreeze_epochs}")
        if self.local_steps is not None:
            check(self.local_steps >= 1, "TrainConfig.local_steps",
                  f"must be >= 1, got {self.local_steps}")
            check(self.steps_per_execution == 1, "TrainConfig.local_steps",
                  "needs TrainConfig.steps_per_execution = 1 (averaging runs between steps)")
        check(self.divergence_retries >= 0, "TrainConfig.divergence_retries",
              f"must be >= 0, got {self.divergence_retries}")
        check(0 < self.divergence_lr_factor < 1, "TrainConfig.divergence_lr_factor",
              f"must be in (0, 1), got {self.divergence_lr_factor}")
        check(self.sync_steps >= 0, "TrainConfig.sync_steps",
              f"must be >= 0, got {self.sync_steps}")
        combined = (self.micro_batches > 1 or self.gradient_transforms
                    or self.update_multipliers or self.unfreeze_epochs)
        check(not (self.decoupled_blocks and combined), "TrainConfig.decoupled_blocks",
              "cannot be combined with micro_batches, gradient_transforms, "
              "update_multipliers or unfreeze_epochs")
        check(self.steps_per_execution >= 1, "TrainConfig.steps_per_execution",
              f"must be >= 1, got {self.steps_per_execution}")
        configured_call(keras.losses.get, "TrainConfig.loss", self.loss)
        for metric in self.metrics:
            _check_metric(metric)


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
          ConfigError: if the per-replica batch does not split into the micro-batches.
        """
        plan = plan_batches(len(train_split), self.config.global_batch_size,
                            self.strategy.num_replicas_in_sync, self.config.steps_per_epoch)
        check(plan.per_replica_batch_size % self.config.micro_batches == 0,
              "TrainConfig.micro_batches", f"{self.config.micro_batches} must divide the "
              f"per-replica batch of {plan.per_replica_batch_size}")
        return plan

    def build_model(self, model_fn: ModelFn, splits: Splits,
                    extra: Sequence[ModelTransform] = ()) -> keras.Model:
        """Builds and compiles the model; variables (optimizer slots included) are created
        in the strategy's scope so that they are mirrored or placed on parameter servers.

        The returned model is the built one with the ``extra`` model transforms (a
        stage's) and then the configured ones applied (``model_transforms.
        inference_model`` strips them again).
        """
        previous = keras.mixed_precision.global_policy()
        # Layers take the policy in force when they are built, and compile wraps the
        # optimizer for loss scaling under mixed_float16; nothing else sees the policy.
        keras.mixed_precision.set_global_policy(self.config.precision)
        try:
            return self._build(model_fn, splits, extra)
        finally:
            keras.mixed_precision.set_global_policy(previous)

    def _build(self, model_fn: ModelFn, splits: Splits,
               extra: Sequence[ModelTransform]) -> keras.Model:
        local = self.config.local_steps is not None
        if local:
            reason = local_updates_unsupported(self.strategy)
            check(reason is None, "TrainConfig.local_steps", f"cannot be used: {reason}")

        def per_replica():
            return replica_local_variables() if local else contextlib.nullcontext()

        with self.strategy.scope():
            with per_replica():
                model = configured_call(model_fn, "run_experiment.model",
                                        input_shape=splits.input_shape,
                                        num_classes=splits.num_classes)
            model = model_transforms.apply(model, [*extra, *self.model_transforms(splits)])
            optimizer = configured_call(self.config.optimizer, "TrainConfig.optimizer")
            check(not isinstance(optimizer, keras.optimizers.legacy.Optimizer),
                  "TrainConfig.optimizer", f"is a legacy optimizer ({type(optimizer).__name__}"
                  " from keras.optimizers.legacy); use its keras.optimizers counterpart")
            configured_call(model.compile, "TrainConfig (loss, metrics, optimizer)",
                            optimizer=optimizer, loss=self.config.loss,
                            metrics=list(self.config.metrics),
                            steps_per_execution=self.config.steps_per_execution)
            _compile_update(model.optimizer, self._jit_compile_update())
            if (getattr(_inner(model.optimizer), "jit_compile", False) and not local
                    and isinstance(model, MicroBatchTrainStep)):
                model.fuse_rescaling()  # clipping factors multiplied inside the update
            if self.config.divergence_retries:
                check(isinstance(_learning_rate(model.optimizer), tf.Variable),
                      "TrainConfig.divergence_retries", "needs a constant learning rate "
                      "(a rollback lowers it; a schedule cannot be lowered)")
            # Slots exist before a checkpoint restore, so restore is immediate, not deferred.
            with per_replica():  # under local SGD each replica keeps its own optimizer state
                model.optimizer.build(model.trainable_variables)
        return model

    def model_transforms(self, splits: Splits) -> list[ModelTransform]:
        """The model transforms that ``config`` asks for, in the order they wrap."""
        config = self.config
        if config.decoupled_blocks:  # combined with nothing else (checked in TrainConfig)
            return [DecoupledBlocks(config.decoupled_blocks, splits.num_classes, config.loss)]
        if (config.micro_batches > 1 or config.gradient_transforms or config.update_multipliers
                or config.unfreeze_epochs or config.local_steps is not None):
            return [CustomTrainStep(config.micro_batches, config.gradient_transforms,
                                    config.update_multipliers, config.unfreeze_epochs)]
        return []

    def checkpoint_manager(self, model: keras.Model, directory: Path,
                           keep: int = 2) -> tf.train.CheckpointManager:
        """Keeps the ``keep`` newest checkpoints of model and optimizer in ``directory``:
        per-epoch ones in a run's ``checkpoints/``, the one saved on preemption in
        ``checkpoints/preempted/`` (numbered by global step)."""
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        return tf.train.CheckpointManager(checkpoint, str(directory), max_to_keep=keep)

    @staticmethod
    def restore(model: keras.Model, directory: Path, steps_per_epoch: int) -> StartAt:
        """Restores the newest checkpoint in ``directory`` into ``model`` and its optimizer:
        the one saved on preemption if it is further along than the last per-epoch one.

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
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        checkpoint.restore(latest).assert_existing_objects_matched()
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
        callbacks = [*model_transforms.transform_callbacks(model), *callbacks]
        if self.config.local_steps is not None:
            weights = [v for v in inference_model(model).weights if v.dtype.is_floating]
            callbacks = [LocalSGD(self.config.local_steps, self.config.sync_steps,
                                  plan.steps_per_epoch, weights), *callbacks]
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

    def lower_learning_rate(self, model: keras.Model) -> tuple[float, float]:
        """Multiplies the optimizer's (constant) learning rate by
        ``config.divergence_lr_factor``; returns it before and after."""
        rate = _learning_rate(model.optimizer)
        before = float(rate.numpy())
        rate.assign(before * self.config.divergence_lr_factor)
        return before, float(rate.numpy())

    def evaluate(self, model: keras.Model, split: Split) -> dict[str, float]:
        """Loss and metrics over the whole ``split``."""
        batch = self.config.global_batch_size
        results = model.evaluate(split.eval_dataset(batch), steps=eval_steps(split, batch),
                                 return_dict=True, verbose=0)
        return {k: float(v) for k, v in results.items()}

    def _jit_compile_update(self) -> bool:
        if isinstance(self.strategy, tf.distribute.ParameterServerStrategy):
            return False
        if self.config.jit_compile_update is not None:
            return self.config.jit_compile_update
        return (self.strategy.num_replicas_in_sync > 1 or bool(self.config.gradient_transforms)
                or bool(tf.config.list_physical_devices("GPU")))

    def _verbosity(self) -> int:
        if self.config.verbose is not None:
            return self.config.verbose
        return 1 if sys.stdout.isatty() else 2


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> Any:
    """The learning-rate variable of ``optimizer`` (through a loss-scaling wrapper), or
    its schedule."""
    return getattr(_inner(optimizer), "_learning_rate", None)


def _inner(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer itself, under a loss-scaling wrapper (mixed_float16) if any."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _check_metric(name: Any) -> None:
    """Raises ConfigError unless ``name`` is a metric that ``model.compile`` resolves
    (``keras.metrics.get`` hands an unknown string back instead of failing)."""
    if not isinstance(name, str) or name in _COMPILE_METRIC_NAMES:
        return
    if callable(configured_call(keras.metrics.get, "TrainConfig.metrics", name)):
        return
    import difflib

    known = sorted(_COMPILE_METRIC_NAMES | {n for n in dir(keras.metrics)
                                            if n.islower() and not n.startswith("_")})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConfigError(f"TrainConfig.metrics: unknown metric {name!r}{hint}")


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
