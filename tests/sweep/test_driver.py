"""lmt sweep on Optuna: a 2x2 grid is one parent run and four nested trial runs whose
params carry their bindings; the same command again runs only what failed; bad input is
refused before any trial starts; a sweep's experiment keeps its artifacts where `lmt run`'s
does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.cli import main
from lmt_tf.sweep.driver import Sweep, trial_command
from lmt_tf.sweep.space import parse_dimension
from tests.conftest import TINY, all_runs, mlflow_client

NPZ = TINY.replace("include 'gin/data/digits.gin'", "run_experiment.data = @load_npz")


def _write_npz(path: Path) -> None:
    from lmt_tf.data.sources import load_digits

    train = load_digits().train
    np.savez(path, x=train.x, y=train.y)


@pytest.mark.slow
def test_a_grid_sweep_nests_its_trials_and_reruns_only_what_failed(gin_file, in_tmp: Path,
                                                                  capsys) -> None:
    gin_file(NPZ + "TrainConfig.epochs = 1\n")
    _write_npz(in_tmp / "a.npz")  # b.npz is not there yet: its trials fail
    command = ["sweep", "exp.gin", "--parallel", "2",
               "--grid", "keras.optimizers.SGD.learning_rate=[0.05,0.2]",
               "--grid", "load_npz.path=['a.npz','b.npz']"]
    assert main(command) == 1
    assert "2 trial(s) failed (run the same command again to retry them)" in \
        capsys.readouterr().out
    _write_npz(in_tmp / "b.npz")
    assert main(command) == 0
    assert "2 trial(s) done, 2 to run (2 again after failing)" in capsys.readouterr().out
    assert main(command) == 0
    assert "4 trial(s) done, 0 to run" in capsys.readouterr().out

    runs = all_runs(in_tmp)
    (parent,) = [r for r in runs if r.info.run_name.startswith("sweep-")]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    # The failed trials stopped on their data before a run was made: every run is one
    # of the four grid points, each once.
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(children) == len(finished) == 4
    grid = {(r.data.params["SGD.learning_rate"], r.data.params["load_npz.path"])
            for r in finished}
    assert grid == {(lr, path) for lr in ("0.05", "0.2") for path in ("'a.npz'", "'b.npz'")}
    assert parent.info.status == "FINISHED"
    top = max(r.data.metrics["val_accuracy"] for r in finished)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(top)
    best = {r.info.run_id: r for r in finished}[parent.data.tags["lmt.sweep.best_run"]]
    assert best.data.metrics["val_accuracy"] == pytest.approx(top)  # (a.npz = b.npz: ties)


def test_bad_sweeps_fail_before_any_trial(gin_file, in_tmp: Path, capsys, monkeypatch) -> None:
    gin_file(TINY)
    assert main(["sweep", "exp.gin", "--grid", "TrainConfig.nonsense=[1,2]"]) == 2
    assert "doesn't have a parameter named 'nonsense'" in capsys.readouterr().err
    assert main(["sweep", "exp.gin", "--search", "TrainConfig.epochs=int(1,3)"]) == 2
    assert "--search needs --trials N" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert main(["sweep", "exp.gin", "--grid", "TrainConfig.epochs=[1,2]"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert not (in_tmp / "lmt_sweeps.db").exists() and not all_runs(in_tmp)


def test_a_trial_is_an_lmt_run_of_this_interpreter_with_its_bindings() -> None:
    sweep = Sweep(["exp.gin", "--gin_param", "TrainConfig.epochs = 1"], "exp",
                  [parse_dimension("SGD.learning_rate=[0.1,0.2]", grid=True)])
    command = trial_command(sweep, ["SGD.learning_rate = 0.2"], 1)
    assert command == [sys.executable, "-m", "lmt_tf.cli", "run", "exp.gin",
                       "--gin_param", "TrainConfig.epochs = 1",
                       "--gin_param", "SGD.learning_rate = 0.2",
                       "--run-name", f"{sweep.study_name}-trial-1"]


@pytest.mark.slow
def test_a_sweep_in_a_fresh_directory_keeps_its_artifacts_in_mlartifacts(gin_file,
                                                                        in_tmp: Path) -> None:
    """The experiment a sweep creates is made as `lmt run` makes it: its artifacts under
    ./mlartifacts (TrackingConfig.artifact_root), not MLflow's default ./mlruns."""
    gin_file(TINY + "TrainConfig.epochs = 1\nExportConfig.mlflow_model = False\n")
    assert main(["sweep", "exp.gin", "--quiet",
                 "--grid", "keras.optimizers.SGD.learning_rate=[0.1]"]) == 0
    experiment = mlflow_client(in_tmp).get_experiment_by_name("exp")
    assert experiment.artifact_location == (in_tmp / "mlartifacts").resolve().as_uri()
    (trial,) = [r for r in all_runs(in_tmp) if not r.info.run_name.startswith("sweep-")]
    assert trial.info.artifact_uri.startswith(experiment.artifact_location + "/")
    assert list((in_tmp / "mlartifacts").rglob("operative_config.gin"))
    assert not (in_tmp / "mlruns").exists()
