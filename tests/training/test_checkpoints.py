"""Every run logs what its checkpoints cost: save seconds and bytes per epoch, restore
seconds when it resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import tf_keras as keras

from lmt_tf import config
from lmt_tf.config import run_parsed
from lmt_tf.invocation import RunOptions
from lmt_tf.training.checkpoints import BYTES, RESTORE_SECONDS, SAVE_SECONDS, checkpoint_bytes
from tests.conftest import TINY, all_runs, mlflow_client


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    """Ctrl-C once the first epoch's checkpoint is saved (lmt's callbacks run first)."""

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if epoch == 0:
            raise KeyboardInterrupt


def _run(exp: str, **options):
    config.parse([exp], [])
    return run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None, **options))


def test_save_and_restore_seconds_and_bytes_are_metrics_of_the_run(gin_file,
                                                                   in_tmp: Path) -> None:
    exp = gin_file(TINY)
    with pytest.raises(KeyboardInterrupt):
        _run(exp, callbacks=[_StopAfterFirstEpoch()])
    (killed,) = all_runs(in_tmp)
    resumed = _run(exp, resume=True)
    assert resumed.run_id == killed.info.run_id
    client = mlflow_client(in_tmp)

    def history(name: str) -> list:
        return sorted(client.get_metric_history(resumed.run_id, name), key=lambda m: m.step)

    saves = history(SAVE_SECONDS)
    assert [m.step for m in saves] == [1, 2] and all(0 < m.value < 60 for m in saves)
    (restore,) = history(RESTORE_SECONDS)
    assert restore.step == 1 and 0 < restore.value < 60  # restored after one epoch
    (checkpoints,) = in_tmp.glob("lmt_work/*/*/checkpoints")
    on_disk = [checkpoint_bytes(checkpoints / f"ckpt-{n}") for n in (1, 2)]
    assert on_disk[0] > 4 * 2_410  # the MLP's 2,410 float32 weights, not just an index
    # The restore reads checkpoint 1; each save logs the bytes of its own checkpoint.
    assert [m.value for m in history(BYTES)] == [on_disk[0], on_disk[0], on_disk[1]]
