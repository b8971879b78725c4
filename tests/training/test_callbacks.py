"""The divergence guard: a non-finite loss stops training before it is checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmt_tf import config
from lmt_tf.cli import EXIT_USER_ERROR, main
from lmt_tf.experiment import RunOptions, run_experiment
from lmt_tf.training.callbacks import TrainingDiverged
from tests.conftest import TINY, all_runs


def test_a_diverging_run_fails_with_step_and_epoch_and_exports_nothing(gin_file,
                                                                      in_tmp: Path) -> None:
    exp = gin_file(TINY)
    config.parse([exp], ["keras.optimizers.SGD.learning_rate = 1e30"])
    with pytest.raises(TrainingDiverged) as caught:
        run_experiment(options=RunOptions(config_files=[exp], echo=lambda _: None))
    # Step 1's update already blows the weights up; step 2's loss is the first non-finite.
    assert caught.value.epoch == 1 and 1 <= caught.value.step <= 3
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED"
    assert f"at step {caught.value.step} (epoch 1)" in run.data.tags["lmt.error"]
    assert "test_accuracy" not in run.data.metrics
    assert not list(in_tmp.glob("lmt_work/*/*/export"))  # nothing exported
    assert not list(in_tmp.glob("lmt_work/*/*/checkpoints/*.index"))  # nor checkpointed
    assert not list(in_tmp.glob("lmt_work/*/LATEST"))


def test_divergence_is_one_line_exit_2(gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    status = main(["run", "exp.gin", "--gin_param", "keras.optimizers.SGD.learning_rate = 1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USER_ERROR and len(err) == 1
    assert err[0].startswith("lmt: error: training diverged: loss is ")
