"""Keras callbacks that report metrics (to the run, and to a sweep's trial) and save
per-epoch checkpoints.

Both act at epoch boundaries (or every N steps, buffered), never inside the step: a
metric logged per step would force a device-to-host copy each step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.errors import LmtError
from lmt_tf.process import TRIAL_ENV, Pruned
from lmt_tf.training.checkpoints import timed_save

MetricsSink = Callable[[Mapping[str, float], int], None]


class EpochMetrics(keras.callbacks.Callback):
    """Sends each epoch's logs (``loss``, ``val_accuracy``, ...) to ``sink`` at step
    ``epoch + 1`` (the number of epochs completed)."""

    def __init__(self, sink: MetricsSink):
        super().__init__()
        self._sink = sink

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        if logs:
            self._sink({k: float(v) for k, v in logs.items()}, epoch + 1)


class Throughput(keras.callbacks.Callback):
    """Training examples per second of each epoch (validation excluded), sent to ``sink``
    as ``examples_per_second`` at step ``epoch + 1``."""

    def __init__(self, sink: MetricsSink, examples_per_epoch: int):
        super().__init__()
        self._sink = sink
        self._examples = examples_per_epoch
        self._start = 0.0
        self._seconds: float | None = None

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self._start, self._seconds = time.perf_counter(), None

    def on_test_begin(self, logs: Mapping[str, float] | None = None) -> None:
        if self._seconds is None:  # validation inside fit starts after the epoch's steps
            self._seconds = time.perf_counter() - self._start

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        seconds = self._seconds or time.perf_counter() - self._start
        self._sink({"examples_per_second": self._examples / seconds}, epoch + 1)


class LearningRate(keras.callbacks.Callback):
    """Adds ``learning_rate`` to each epoch's logs: the rate of the epoch's last optimizer
    step (a schedule's value there), for the callbacks after it to log. List it first."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
            # A scheduled optimizer holds the rate it computed for its last step.
            logs["learning_rate"] = float(keras.backend.get_value(optimizer.learning_rate))


class StepMetrics(keras.callbacks.Callback):
    """Samples the training logs every ``every_n_steps`` optimizer steps and sends them to
    ``sink`` as ``step/<name>`` at the end of each epoch, in one batch."""

    _supports_tf_logs = True  # keep Keras from copying logs to the host every step

    def __init__(self, sink: MetricsSink, every_n_steps: int, steps_per_epoch: int):
        super().__init__()
        self._sink = sink
        self._every = every_n_steps
        self._steps_per_epoch = steps_per_epoch
        self._epoch = 0
        self._buffer: list[tuple[dict[str, float], int]] = []

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Mapping[str, tf.Tensor] | None = None) -> None:
        step = self._epoch * self._steps_per_epoch + batch + 1
        if logs and step % self._every == 0:
            self._buffer.append(({f"step/{k}": float(v) for k, v in logs.items()}, step))

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        for metrics, step in self._buffer:
            self._sink(metrics, step)
        self._buffer.clear()


def batch_hooks_allowed(strategy: tf.distribute.Strategy) -> bool:
    """Whether Keras runs batch-level callbacks under ``strategy``: everywhere but under
    parameter servers, where ``fit`` refuses them."""
    return not isinstance(strategy, tf.distribute.ParameterServerStrategy)


def divergence_guard(strategy: tf.distribute.Strategy,
                     steps_per_epoch: int) -> DivergenceGuard:
    """The guard for ``strategy``: per step where batch-level callbacks run, else per
    epoch."""
    guard = StepDivergenceGuard if batch_hooks_allowed(strategy) else DivergenceGuard
    return guard(steps_per_epoch)


class TrainingDiverged(LmtError):
    """The training loss, or the weights training left, became NaN or infinite.

    Args:
      value: the non-finite loss (or weight).
      step, epoch: where (a stage's round or 0 outside a fit).
      where: what diverged, if not the loss at ``step`` of a fit.
    """

    def __init__(self, value: float, step: int, epoch: int, where: str | None = None):
        where = where or f"loss is {value} at step {step} (epoch {epoch})"
        super().__init__(f"training diverged: {where}; no checkpoint or model of it was "
                         f"saved (lower the learning rate, clip gradients, or check the data)")
        self.value, self.step, self.epoch = value, step, epoch


def check_finite(weights: Sequence[Any], what: str) -> None:
    """Raises ``TrainingDiverged`` if any of the float ``weights`` (of ``what``: "the
    model the prune stage left") is NaN or infinite."""
    arrays = [np.asarray(w) for w in weights]
    arrays = [w for w in arrays if np.issubdtype(w.dtype, np.floating)]
    bad = [w[~np.isfinite(w)] for w in arrays]
    count = sum(b.size for b in bad)
    if count:
        first = next(float(b.flat[0]) for b in bad if b.size)
        raise TrainingDiverged(first, 0, 0, f"{count:,} of {sum(w.size for w in arrays):,} "
                                            f"weights of {what} are NaN or infinite")


def check_finite_variables(variables: Sequence[Any], what: str) -> None:
    """``check_finite`` on variables where they live: each variable (each shard of a
    partitioned one) counts its NaN and infinite values on its own device, so a table
    sharded over parameter servers is never read into this process.

    Raises:
      TrainingDiverged: if any float value of ``variables`` is NaN or infinite.
    """
    count, total, first = 0, 0, None
    for variable in variables:
        for part in getattr(variable, "variables", None) or [variable]:
            if not part.dtype.is_floating:
                continue
            with tf.device(part.device):
                bad = tf.math.logical_not(tf.math.is_finite(part))
                found = int(tf.math.count_nonzero(bad))
                if found and first is None:
                    first = float(tf.boolean_mask(part, bad)[0])
            count += found
            total += int(np.prod(part.shape))
    if count:
        raise TrainingDiverged(first, 0, 0, f"{count:,} of {total:,} weights of {what} "
                                            f"are NaN or infinite")


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training when an epoch's training loss is NaN or infinite by raising
    ``TrainingDiverged``; list it before the checkpoint callback so that a diverged
    epoch is never saved. The epoch-level check is all that parameter-server training
    allows (no batch-level callbacks); elsewhere use ``StepDivergenceGuard``.
    """

    def __init__(self, steps_per_epoch: int):
        super().__init__()
        self._steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if logs and "loss" in logs:
            self._check(logs["loss"], epoch, self._steps_per_epoch - 1)

    def _check(self, loss: Any, epoch: int, batch: int) -> None:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(value, epoch * self._steps_per_epoch + batch + 1, epoch + 1)


class StepDivergenceGuard(DivergenceGuard):
    """``DivergenceGuard`` that also stops within the epoch, one step after the first
    non-finite loss.

    It reads each step's loss one step late, when the next step has been dispatched:
    that value is ready, so the check never stalls an accelerator's queue. Keras' loss in
    the logs is the epoch's running mean, so it stays non-finite once a step's loss is.
    """

    _supports_tf_logs = True  # the check reads one scalar; leave the rest on the device

    def __init__(self, steps_per_epoch: int):
        super().__init__(steps_per_epoch)
        self._epoch = 0
        self._pending: tuple[Any, int, int] | None = None  # (loss, epoch, batch)

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._pending = None  # a fit after a rollback starts afresh

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        previous, self._pending = self._pending, (loss, self._epoch, batch)
        if previous is not None:
            self._check(*previous)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        if self._pending is not None:
            self._check(*self._pending)
            self._pending = None
        super().on_epoch_end(epoch, logs)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer after every epoch as checkpoint number ``epoch + 1``,
    sends its save seconds and bytes to ``sink`` (``checkpoints.SAVE_SECONDS``,
    ``checkpoints.BYTES``) at step ``epoch + 1``, then calls
    ``on_saved(epochs_completed)``."""

    def __init__(self, manager: tf.train.CheckpointManager,
                 on_saved: Callable[[int], None] | None = None,
                 sink: MetricsSink | None = None):
        super().__init__()
        self._manager = manager
        self._on_saved = on_saved
        self._sink = sink

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        cost = timed_save(self._manager, epoch + 1)
        if self._sink:
            self._sink(cost, epoch + 1)
        if self._on_saved:
            self._on_saved(epoch + 1)


class TrialReporter(keras.callbacks.Callback):
    """Reports each epoch's ``metric`` to a sweep's Optuna ``trial``, and stops the run
    (``Pruned``) when the sweep's pruner says so."""

    def __init__(self, trial: Any, metric: str):
        super().__init__()
        self._trial, self._metric = trial, metric

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        value = (logs or {}).get(self._metric)
        if value is None:
            return
        self._trial.report(float(value), epoch + 1)
        if self._trial.should_prune():
            raise Pruned(f"pruned by the sweep after epoch {epoch + 1} "
                         f"({self._metric} {value:.4f})")


def trial_reporter() -> TrialReporter | None:
    """The reporter to the trial that ``lmt sweep --prune`` names in this process's
    environment (``process.TRIAL_ENV``); None outside a pruned sweep."""
    spec = os.environ.get(TRIAL_ENV)
    if not spec:
        return None
    import optuna

    spec = json.loads(spec)
    study = optuna.load_study(study_name=spec["study"], storage=spec["storage"])
    return TrialReporter(optuna.trial.Trial(study, spec["trial_id"]), spec["metric"])
