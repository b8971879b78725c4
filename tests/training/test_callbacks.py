"""The divergence guard: a non-finite loss stops training before it is checkpointed. The
sweep's trial reporter: a trial below the median is pruned, its run ends KILLED."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lmt_tf import config
from lmt_tf.cli import main
from lmt_tf.config import run_parsed
from lmt_tf.invocation import RunOptions
from lmt_tf.process import EXIT_USER_ERROR, TRIAL_ENV
from lmt_tf.training.callbacks import TrainingDiverged
from tests.conftest import TINY, all_runs


def test_a_diverging_run_fails_with_step_and_epoch_and_exports_nothing(gin_file,
                                                                      in_tmp: Path) -> None:
    exp = gin_file(TINY)
    config.parse([exp], ["keras.optimizers.SGD.learning_rate = 1e30"])
    with pytest.raises(TrainingDiverged) as caught:
        run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
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


def test_rollback_lowers_the_learning_rate_and_equals_a_run_at_that_rate(
        gin_file, in_tmp: Path) -> None:
    """lr 1e30 diverges at once; rolled back to the weights before training with the rate
    times 1e-31 = 0.1, the run ends with the weights of a run at 0.1 from the start."""
    import numpy as np

    from tests.conftest import mlflow_client

    exp = gin_file(TINY)
    config.parse([exp], ["run_experiment.work_dir = 'steady'"])
    steady = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    config.parse([exp], ["run_experiment.work_dir = 'rolled'",
                         "keras.optimizers.SGD.learning_rate = 1e30",
                         "TrainConfig.divergence_retries = 2",
                         "TrainConfig.divergence_lr_factor = 1e-31"])
    lines: list[str] = []
    rolled = run_parsed(options=RunOptions(config_files=[exp], echo=lines.append))
    assert any("training diverged at step" in line and "(1/2)" in line for line in lines)
    for a, b in zip(steady.model.get_weights(), rolled.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    run = mlflow_client(in_tmp).get_run(rolled.run_id)
    assert run.info.status == "FINISHED"
    assert "learning rate 1e+30 -> 0.1" in run.data.tags["lmt.rollback.1"]
    assert "rolled back to epoch 1, step 1" in run.data.tags["lmt.rollback.1"]
    assert run.data.metrics["divergence_rollbacks"] == 1


def test_a_rollback_scales_a_schedule(gin_file, in_tmp: Path) -> None:
    """Warmup and cosine decay peaking at 1e30 diverges within its warmup; rolled back to
    the weights before training with the schedule times 1e-31, the run trains along the
    schedule peaking at 0.1 and logs its rate each epoch."""
    import math

    import numpy as np

    from tests.conftest import mlflow_client

    exp = gin_file(TINY + "TrainConfig.learning_rate_schedule = @WarmupCosineDecay()\n"
                          "WarmupCosineDecay.warmup_fraction = 0.25\n")
    config.parse([exp], ["keras.optimizers.SGD.learning_rate = 1e30",
                         "TrainConfig.steps_per_epoch = 4",  # 8 steps, 2 of warmup
                         "TrainConfig.divergence_retries = 1",
                         "TrainConfig.divergence_lr_factor = 1e-31",
                         "run_experiment.stages = [@train()]"])
    rolled = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    client = mlflow_client(in_tmp)
    run = client.get_run(rolled.run_id)
    assert run.info.status == "FINISHED"
    assert "rolled back to epoch 1, step 1; learning-rate schedule scaled by 1 -> 1e-31" in \
        run.data.tags["lmt.rollback.1"]
    rates = [m.value for m in client.get_metric_history(rolled.run_id, "learning_rate")]
    # The rate of each epoch's last step (3, 7): half a cosine from 0.1 over steps 2..8.
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 6)) for step in (3, 7)]
    np.testing.assert_allclose(rates, expected, rtol=1e-5)
    assert np.isfinite(np.concatenate([w.ravel() for w in rolled.model.get_weights()])).all()


def test_rollbacks_that_do_not_help_end_failed(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY)
    config.parse([exp], ["keras.optimizers.SGD.learning_rate = 1e30",
                         "TrainConfig.divergence_retries = 2"])  # 1e30 * 0.5 * 0.5: no help
    with pytest.raises(TrainingDiverged):
        run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED"
    assert {"lmt.rollback.1", "lmt.rollback.2"} <= set(run.data.tags)
    assert "lmt.rollback.3" not in run.data.tags
    # The factor compounds: each rollback lowers the first rate by it once more.
    assert "learning rate 1e+30 -> 5e+29" in run.data.tags["lmt.rollback.1"]
    assert "learning rate 1e+30 -> 2.5e+29" in run.data.tags["lmt.rollback.2"]


def test_a_trial_below_the_median_is_pruned_and_its_run_ends_killed(
        gin_file, in_tmp: Path, monkeypatch, capsys) -> None:
    import json

    import optuna

    storage = f"sqlite:///{in_tmp / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_warmup_steps=1))
    for _ in range(5):  # MedianPruner waits for 5 trials; these reached 0.99 at once
        trial = study.ask()
        for epoch in (1, 2):
            trial.report(0.99, epoch)
        study.tell(trial, 0.99)
    trial = study.ask()
    monkeypatch.setenv(TRIAL_ENV, json.dumps({"storage": storage, "study": "s",
                                              "trial_id": trial._trial_id,
                                              "metric": "val_accuracy"}))
    gin_file(TINY + "TrainConfig.epochs = 3\n")
    assert main(["run", "exp.gin"]) == 3
    assert "lmt: pruned by the sweep after epoch 1 (val_accuracy" in capsys.readouterr().err
    (run,) = all_runs(in_tmp)
    assert run.info.status == "KILLED"
    reported = study.trials[-1].intermediate_values
    assert sorted(reported) == [1]  # reported, then stopped before the second epoch


def test_check_finite_variables_counts_on_each_variable_and_shard() -> None:
    """Each shard counts its own NaN/inf values where it lives (a sharded table is never
    read whole into the coordinator); integer variables are skipped."""
    from lmt_tf.training.callbacks import check_finite_variables

    clean = [tf.Variable(np.ones((4, 2), np.float32)), tf.Variable([1, 2], dtype=tf.int64)]
    check_finite_variables(clean, "x")
    bad = np.ones((6, 2), np.float32)
    bad[4, 1], bad[5, 0] = np.nan, np.inf
    sharded = tf.__internal__.distribute.ShardedVariable(  # two shards of 3 rows
        [tf.Variable(bad[:3]), tf.Variable(bad[3:])])
    with pytest.raises(TrainingDiverged, match="2 of 20 weights of the model are NaN or "
                                               "infinite"):
        check_finite_variables([*clean[:1], sharded], "the model")
