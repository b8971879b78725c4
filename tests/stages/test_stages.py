"""Stages: an experiment lists them; a run killed in a later stage resumes there, in the
same MLflow run, without training again."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmt_tf import experiment
from lmt_tf.cli import main
from lmt_tf.data.sources import load_digits
from lmt_tf.invocation import Configs, ExportConfig, RunOptions
from lmt_tf.models.mlp import build_mlp
from lmt_tf.stages import Export, RunContext, Stage, Train
from lmt_tf.training.train_config import TrainConfig
from tests.conftest import TINY, all_runs, mlflow_client


def test_dry_run_lists_the_stages(gin_file, capsys) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", "--dry-run"]) == 0
    assert "lmt: stages: train, export" in capsys.readouterr().out


def test_an_experiment_without_export_exports_nothing(gin_file, in_tmp: Path) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", "--gin_param", "run_experiment.stages = [@train()]"]) == 0
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert mlflow_client(in_tmp).list_artifacts(run.info.run_id, "saved_model") == []


@pytest.mark.parametrize("stages, message", [
    ("[@train]", "run_experiment.stages must list stages such as @train()"),
    ("[@train(), @train()]", "names train more than once"),
    ("[@squeeze()]", "No configurable matching reference '@squeeze()'"),
])
def test_bad_stage_lists_are_one_line(gin_file, in_tmp: Path, capsys, stages: str,
                                      message: str) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", "--gin_param", f"run_experiment.stages = {stages}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert all_runs(in_tmp) == []


class _Interrupted(Stage):
    """Stands for a later stage that is killed (Ctrl-C, SIGTERM) the first time."""

    name = "fragile"

    def __init__(self, fail: bool):
        self.fail = fail
        self.ran = False

    def work(self, context: RunContext) -> None:
        if self.fail:
            raise KeyboardInterrupt("killed in a later stage")
        self.ran = True


def _run(stages: list[Stage], **options) -> experiment.RunResult:
    configs = Configs(train=TrainConfig(epochs=2, global_batch_size=64, verbose=0),
                      export=ExportConfig(mlflow_model=False))
    return experiment.run_experiment(
        load_digits, build_mlp, name="staged", stages=stages, configs=configs,
        options=RunOptions(echo=lambda _: None, **options))


def test_a_run_killed_in_a_later_stage_resumes_there(in_tmp: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _run([Train(), _Interrupted(fail=True), Export()])
    (killed,) = all_runs(in_tmp)
    assert killed.info.status == "KILLED"
    later = _Interrupted(fail=False)
    resumed = _run([Train(), later, Export()], resume=True)
    assert resumed.run_id == killed.info.run_id and later.ran
    run = mlflow_client(in_tmp).get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    # Training was not repeated: each epoch's loss once, the test metrics once.
    client = mlflow_client(in_tmp)
    assert [m.step for m in client.get_metric_history(resumed.run_id, "loss")] == [1, 2]
    assert len(client.get_metric_history(resumed.run_id, "test_accuracy")) == 1
    assert [a.path for a in client.list_artifacts(resumed.run_id, "saved_model")]
