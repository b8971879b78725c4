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


def _stages(*names: str) -> list[Stage]:
    from lmt_tf import config

    config.register()
    return [config.configurable(name)() for name in names]


@pytest.mark.parametrize("order, refused", [
    (("train", "export"), None),
    (("train", "prune", "cluster", "qat", "tflite", "evaluate", "export"), None),
    (("prototypes", "train", "export"), None),  # prototypes measure the model as built
    (("federate", "distill", "export"), None),
    (("tflite", "train", "export"), "tflite"),
    (("export",), "export"),
    (("prune", "train"), "prune"),
    (("cluster", "train"), "cluster"),
    (("qat", "train"), "qat"),
    (("distill", "export"), "distill"),
    (("evaluate", "train"), "evaluate"),
    (("prototypes", "export"), "export"),
])
def test_each_stage_is_checked_for_a_trained_model_before_it(
        order: tuple[str, ...], refused: str | None) -> None:
    from lmt_tf.errors import ConfigError
    from lmt_tf.stages.context import check_order

    stages = _stages(*order)
    if refused is None:
        check_order(stages)
        return
    with pytest.raises(ConfigError) as error:
        check_order(stages)
    assert f"]: {refused} needs a trained model, and no stage before it trains" in str(
        error.value)


def test_what_lets_a_stage_run_without_training_before_it() -> None:
    from lmt_tf.stages.context import check_order
    from lmt_tf.stages.distill import Distill
    from lmt_tf.stages.evaluate import Evaluate

    check_order([Distill(teacher="an-earlier-run"), Export()])
    check_order([Evaluate(model="an-earlier-run")])
    check_order([Export(allow_untrained=True)])


def test_a_flower_server_needs_a_federate_stage() -> None:
    from lmt_tf.errors import ConfigError
    from lmt_tf.stages.context import check_order

    check_order(_stages("federate", "export"), federated=True)
    with pytest.raises(ConfigError, match="a Flower deployment needs a federate stage"):
        check_order(_stages("train", "export"), federated=True)


@pytest.mark.parametrize("args", [
    ["--gin_param", "run_experiment.stages = [@tflite(), @train(), @export()]"],
    ["--gin_param", "run_experiment.stages = [@train(), @export()]", "--flower-server",
     "127.0.0.1:1"],
])
def test_a_stage_order_refused_leaves_no_run_behind(gin_file, in_tmp: Path, capsys,
                                                   args: list[str]) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert all_runs(in_tmp) == [] and not (in_tmp / "lmt_work").exists()


def test_an_untrained_model_is_exported_when_asked_for(in_tmp: Path) -> None:
    result = _run([Export(allow_untrained=True)])
    run = mlflow_client(in_tmp).get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" not in run.data.metrics
    assert [a.path for a in mlflow_client(in_tmp).list_artifacts(result.run_id,
                                                                 "saved_model")]
