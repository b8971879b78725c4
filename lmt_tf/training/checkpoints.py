"""What a checkpoint costs, as metrics of the run: the seconds a save and a restore
take and the bytes the checkpoint holds on disk (``checkpoint/save_seconds``,
``checkpoint/restore_seconds``, ``checkpoint/bytes``).

A checkpoint is written by the tasks that hold its variables: TensorFlow 2.21 groups
the tensors to save by task (``tf.train.experimental.ShardByTaskPolicy``, the default
when ``tf.train.CheckpointOptions`` names no sharding callback, in
``tensorflow/python/checkpoint/functional_saver.py``) and runs each group's save op on
its task. Under parameter servers each ps writes its own shards of the tables and of
their optimizer slots; the coordinator writes only the index and reads no table.
Measured with a table of 10^8 float32 (381 MB) and its Adagrad slot over 2 ps: +10 MB
of the coordinator's peak RSS to save (0.8-1.0 s), +0 MB to restore (0.7-1.1 s); naming
the coordinator as ``experimental_io_device`` instead costs +592 to +756 MB to save and
+598 to +797 MB to restore. So lmt saves with TensorFlow's default.
"""

from __future__ import annotations

import time
from pathlib import Path

import tensorflow as tf

SAVE_SECONDS = "checkpoint/save_seconds"
RESTORE_SECONDS = "checkpoint/restore_seconds"
BYTES = "checkpoint/bytes"


def checkpoint_bytes(prefix: str | Path) -> int:
    """The bytes of the checkpoint ``prefix`` on disk: its index and every data shard."""
    prefix = Path(prefix)
    files = [prefix.with_name(prefix.name + ".index"),
             *prefix.parent.glob(prefix.name + ".data-*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def timed_save(manager: tf.train.CheckpointManager, number: int) -> dict[str, float]:
    """Saves checkpoint ``number`` with ``manager``; returns its save seconds and bytes."""
    start = time.perf_counter()
    prefix = manager.save(checkpoint_number=number)
    return {SAVE_SECONDS: time.perf_counter() - start, BYTES: checkpoint_bytes(prefix)}


def timed_restore(checkpoint: tf.train.Checkpoint, prefix: str) -> dict[str, float]:
    """Restores ``prefix`` into ``checkpoint`` (every object of it must match); returns
    the restore seconds and the checkpoint's bytes."""
    start = time.perf_counter()
    checkpoint.restore(prefix).assert_existing_objects_matched()
    return {RESTORE_SECONDS: time.perf_counter() - start, BYTES: checkpoint_bytes(prefix)}
