"""Preemption: when a scheduler sends SIGTERM (Kubernetes, SLURM, ``lmt launch
--timeout``), every worker saves a checkpoint at the same step and training stops; the
run ends KILLED, and ``--resume`` continues from that step, mid-epoch.

TensorFlow's ``tf.distribute.experimental.PreemptionCheckpointHandler`` does the
agreement: the worker that is signalled picks the next step, the others acknowledge it
through the coordination service, and all save there. lmt gives it its own save (a
checkpoint numbered by global step in ``checkpoints/preempted/``) and exit (raising
``Preempted``). Parameter-server training is not covered (the handler does not support
it, and Keras allows no batch-level callbacks there: ``callbacks.batch_hooks_allowed``):
there SIGTERM stops the coordinator at once and the last per-epoch checkpoint is
where a resume starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.process import Preempted

PREEMPTED_DIR = "preempted"  # under a run's checkpoint directory


class _HandlerInternals(logging.Filter):
    """The handler warns that its own ``total_run_calls`` is deprecated when it saves;
    that is TensorFlow's internal business, not the user's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "total_run_calls" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_HandlerInternals())


@dataclass(frozen=True)
class StartAt:
    """Where training (re)starts: ``step`` steps into epoch ``epoch`` (0-based)."""

    epoch: int = 0
    step: int = 0

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch: int, initial_epoch: int,
                                              mode: Any = None) -> tuple[int, int]:
        """What Keras' ``fit`` asks ``model._training_state`` for the first (epoch, step);
        Keras' own BackupAndRestore answers the same question this way."""
        return self.epoch, self.step


@contextlib.contextmanager
def _loopback_cloud_probe() -> Iterator[None]:
    """TensorFlow's handler asks the GCE metadata server whether it runs on Google Cloud
    (an HTTP request to metadata.google.internal). Off Google Cloud, as the machine's DMI
    data tells, the question goes to a closed loopback port and is answered at once,
    without traffic leaving the host. An explicit GCE_METADATA_IP wins."""
    try:
        vendor = Path("/sys/class/dmi/id/product_name").read_text()
    except OSError:
        vendor = ""
    if "GCE_METADATA_IP" in os.environ or "Google" in vendor:
        yield
        return
    os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
    try:
        yield
    finally:
        os.environ.pop("GCE_METADATA_IP", None)


class PreemptionCheckpoint(keras.callbacks.Callback):
    """Saves model and optimizer when this or another worker is preempted, at a step all
    workers agree on, then raises ``Preempted``. Use as a context manager around ``fit``:
    it restores the SIGTERM handler it replaces while training.
    """

    # It reads no logs: without this, Keras would copy every step's logs to the host
    # for it (a device sync per step).
    _supports_tf_logs = True

    def __init__(self, strategy: tf.distribute.Strategy, manager: tf.train.CheckpointManager,
                 steps_per_epoch: int, on_saved: Callable[[int], None] | None = None):
        super().__init__()
        self._strategy = strategy
        self._manager = manager
        self._steps_per_epoch = steps_per_epoch
        self._on_saved = on_saved
        self._epoch = self._batch = 0
        self._handler: Any = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._previous_sigterm: Any = None

    def __enter__(self) -> PreemptionCheckpoint:
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore_signal()
        if self._scratch is not None:
            self._scratch.cleanup()

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._handler is not None:  # fit again in the same context (a rollback)
            return
        resolver = getattr(self._strategy, "cluster_resolver", None)
        # The handler restores the newest checkpoint of the manager it is given when it
        # starts; lmt has restored already, so it gets an empty one of its own.
        self._scratch = tempfile.TemporaryDirectory(prefix="lmt-preemption-")
        empty = tf.train.CheckpointManager(tf.train.Checkpoint(), self._scratch.name,
                                           max_to_keep=1)
        config = tf.distribute.experimental.TerminationConfig(
            exit_fn=self._exit, save_fn=self._save, grace_period=0)
        with _loopback_cloud_probe():
            self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
                resolver, empty, termination_config=config)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batch = batch
        self._handler.save_checkpoint_if_preempted()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._restore_signal()

    @property
    def _global_step(self) -> int:
        return self._epoch * self._steps_per_epoch + self._batch + 1

    def _save(self) -> None:
        self._manager.save(checkpoint_number=self._global_step)
        if self._on_saved:
            self._on_saved(self._global_step)

    def _exit(self) -> None:
        self._restore_signal()
        raise Preempted(f"preempted (SIGTERM): checkpoint saved after step "
                        f"{self._global_step} (epoch {self._epoch + 1}); continue with "
                        f"--resume")

    def _restore_signal(self) -> None:
        if self._previous_sigterm is not None:
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                signal.signal(signal.SIGTERM, self._previous_sigterm)
