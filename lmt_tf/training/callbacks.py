"""Keras callbacks that report metrics and save per-epoch checkpoints.

Both act at epoch boundaries (or every N steps, buffered), never inside the step: a
metric logged per step would force a device-to-host copy each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import tensorflow as tf
import tf_keras as keras

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


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer after every epoch as checkpoint number ``epoch + 1``,
    then calls ``on_saved(epochs_completed)``."""

    def __init__(self, manager: tf.train.CheckpointManager,
                 on_saved: Callable[[int], None] | None = None):
        super().__init__()
        self._manager = manager
        self._on_saved = on_saved

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self._manager.save(checkpoint_number=epoch + 1)
        if self._on_saved:
            self._on_saved(epoch + 1)
