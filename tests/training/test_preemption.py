"""SIGTERM saves a checkpoint at the next step and ends the run KILLED; --resume continues
mid-epoch to the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf import config
from lmt_tf.config import run_parsed
from lmt_tf.invocation import RunOptions
from lmt_tf.process import Preempted
from tests.conftest import TINY, all_runs, mlflow_client


class _SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM, as a scheduler would, after a given step."""

    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.epoch, self.batch, self._current = epoch, batch, -1

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._current = epoch

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if (self._current, batch) == (self.epoch, self.batch):
            os.kill(os.getpid(), signal.SIGTERM)


def _run(exp: str, work_dir: str, **options):
    config.parse([exp], [f"run_experiment.work_dir = '{work_dir}'"])
    return run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None,
                                             **options))


@pytest.mark.parametrize("strategy", ["default_strategy", "mirrored_strategy"])
def test_sigterm_checkpoints_mid_epoch_and_resume_matches_uninterrupted(
        gin_file, in_tmp: Path, strategy: str) -> None:
    exp = gin_file(TINY + f"TrainConfig.epochs = 3\nrun_experiment.strategy = @{strategy}\n")
    whole = _run(exp, "whole")
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=r"checkpoint saved after step 26 \(epoch 2\)"):
        _run(exp, "parts", callbacks=[_SigtermAt(epoch=1, batch=5)])
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    killed = next(r for r in all_runs(in_tmp) if r.info.run_id != whole.run_id)
    assert killed.info.status == "KILLED" and "Preempted" in killed.data.tags["lmt.error"]
    # 18 steps per epoch: the signal came after step 24; the handler picks the step after
    # the next one (25 + 1), which every worker has acknowledged by then.
    (checkpoint,) = in_tmp.glob("parts/*/*/checkpoints/preempted/ckpt-26.index")

    resumed = _run(exp, "parts", resume=True)
    assert resumed.run_id == killed.info.run_id
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    run = mlflow_client(in_tmp).get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(whole.test_metrics["accuracy"])
