"""run_experiment end to end: MLflow contents, statuses, and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf import config
from lmt_tf.config import run_parsed
from lmt_tf.invocation import RunOptions
from tests.conftest import TINY, all_runs, mlflow_client


def _run(files: list[str], bindings: list[str] = (), **options):
    config.parse(files, list(bindings))
    return run_parsed(options=RunOptions(config_files=files, bindings=list(bindings),
                                             echo=lambda _: None, **options))


def test_tiny_run_is_one_finished_mlflow_run_with_config_metrics_and_model(
        gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY)
    result = _run([exp], ["TrainConfig.epochs = 3"])
    runs = all_runs(in_tmp)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == result.run_id
    params = run.data.params
    assert params["TrainConfig.epochs"] == "3"  # the --gin_param binding wins
    assert params["TrainConfig.global_batch_size"] == "64"
    assert params["build_mlp.hidden_units"] == "(32,)"
    assert params["derived.replicas"] == "1" and params["derived.parameters"] == "2410"
    assert run.data.tags["lmt.strategy"] == "DefaultStrategy"
    assert run.data.tags["tensorflow.version"].startswith("2.21")
    client = mlflow_client(in_tmp)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert losses[-1].value < losses[0].value
    speed = client.get_metric_history(run.info.run_id, "examples_per_second")
    assert [m.step for m in speed] == [1, 2, 3] and all(m.value > 0 for m in speed)
    assert 0.5 < run.data.metrics["test_accuracy"] <= 1.0
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    config_files = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/operative_config.gin", "config/config.gin"} <= config_files
    operative = Path(client.download_artifacts(run.info.run_id, "config/operative_config.gin",
                                               str(in_tmp))).read_text()
    assert "TrainConfig.epochs = 3" in operative
    saved = {a.path for a in client.list_artifacts(run.info.run_id, "saved_model")}
    assert "saved_model/saved_model.pb" in saved
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run.info.run_id]


def test_params_hold_every_setting_used_and_the_data_set_is_an_input(
        gin_file, in_tmp: Path) -> None:
    from lmt_tf.data.sources import load_digits

    exp = gin_file(TINY)
    _run([exp])
    (run,) = all_runs(in_tmp)
    params = run.data.params
    # Defaults nobody wrote in a gin file, so that any two runs compare on them.
    assert params["TrainConfig.micro_batches"] == "1"
    assert params["SGD.nesterov"] == "False" and params["SGD.momentum"] == "0.0"
    assert params["InputConfig.shuffle_buffer"] == "10000"
    assert params["load_digits.seed"] == "0"
    operative = config.flat_params(Path(mlflow_client(in_tmp).download_artifacts(
        run.info.run_id, "config/operative_config.gin", str(in_tmp))).read_text())
    missing = {k for k in operative if k not in params}
    assert not missing  # every binding of the operative config is a param
    (dataset_input,) = run.inputs.dataset_inputs
    digits = load_digits()
    assert dataset_input.dataset.name == "digits"
    assert dataset_input.dataset.digest == digits.digest()
    assert "sklearn.datasets.load_digits" in dataset_input.dataset.source
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["train_examples"] == str(len(digits.train)) and tags["test_examples"] == "359"


class _StopAtEpoch(keras.callbacks.Callback):
    """Interrupts training as Ctrl-C would, when ``epoch`` begins."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt("test interrupt")


def test_interrupted_run_is_killed_and_resume_matches_uninterrupted(
        gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 3\n")
    whole = _run([exp], ["run_experiment.work_dir = 'whole'"])

    with pytest.raises(KeyboardInterrupt):
        _run([exp], ["run_experiment.work_dir = 'parts'"], callbacks=[_StopAtEpoch(1)])
    killed = [r for r in all_runs(in_tmp) if r.info.run_id != whole.run_id]
    assert [r.info.status for r in killed] == ["KILLED"]

    resumed = _run([exp], ["run_experiment.work_dir = 'parts'"], resume=True)
    assert resumed.run_id == killed[0].info.run_id  # the same MLflow run continues
    assert len(all_runs(in_tmp)) == 2
    run = mlflow_client(in_tmp).get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    # Its tags describe how it ended: finished, not the interruption before.
    assert "lmt.error" not in run.data.tags and "lmt.ended_by" not in run.data.tags
    history = mlflow_client(in_tmp).get_metric_history(resumed.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    for a, b in zip(whole.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_without_earlier_run_is_an_error(gin_file) -> None:
    from lmt_tf.errors import LmtError

    exp = gin_file(TINY)
    with pytest.raises(LmtError, match="nothing to resume"):
        _run([exp], resume=True)


def test_failure_ends_run_failed_with_error_tag(gin_file, in_tmp: Path) -> None:
    class Boom(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("disk on fire")

    exp = gin_file(TINY)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _run([exp], callbacks=[Boom()])
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED"
    assert "disk on fire" in run.data.tags["lmt.error"]


def test_step_metrics_every_n_steps(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY)
    result = _run([exp], ["TrackingConfig.log_every_n_steps = 5",
                          "TrainConfig.steps_per_epoch = 10"])
    steps = mlflow_client(in_tmp).get_metric_history(result.run_id, "step/loss")
    assert sorted(m.step for m in steps) == [5, 10, 15, 20]


def _artifact(in_tmp: Path, run_id: str, path: str) -> str:
    return Path(mlflow_client(in_tmp).download_artifacts(run_id, path, str(in_tmp))).read_text()


def test_resume_with_changed_bindings_is_refused_unless_allowed(gin_file, in_tmp: Path) -> None:
    from lmt_tf.errors import ConfigError

    exp = gin_file(TINY + "TrainConfig.epochs = 3\n")
    with pytest.raises(KeyboardInterrupt):
        _run([exp], callbacks=[_StopAtEpoch(1)])
    (killed,) = all_runs(in_tmp)
    changed = ["TrainConfig.epochs = 4", "keras.optimizers.SGD.learning_rate = 0.05"]
    with pytest.raises(ConfigError) as refused:
        _run([exp], changed, resume=True)
    assert str(refused.value).startswith(
        "--resume with changed bindings (SGD.learning_rate: 0.1 -> 0.05; "
        "TrainConfig.epochs: 3 -> 4)")
    assert mlflow_client(in_tmp).get_run(killed.info.run_id).info.status == "KILLED"  # untouched

    resumed = _run([exp], changed, resume=True, allow_changes=True)
    assert resumed.run_id == killed.info.run_id
    run = mlflow_client(in_tmp).get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.params["TrainConfig.epochs"] == "3"
    # The original config stays as it was; the resume's changes and config lie beside it.
    assert "TrainConfig.epochs = 3" in _artifact(in_tmp, run.info.run_id, "config/config.gin")
    assert _artifact(in_tmp, run.info.run_id, "config/resume-1/changes.txt") == (
        "SGD.learning_rate: 0.1 -> 0.05\nTrainConfig.epochs: 3 -> 4\n")
    assert "TrainConfig.epochs = 4" in _artifact(in_tmp, run.info.run_id,
                                                 "config/resume-1/config.gin")
    losses = mlflow_client(in_tmp).get_metric_history(resumed.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]


def test_a_failed_start_leaves_latest_on_the_run_with_a_checkpoint(gin_file,
                                                                  in_tmp: Path) -> None:
    from lmt_tf.errors import LmtError

    exp = gin_file(TINY)
    finished = _run([exp])
    with pytest.raises(KeyboardInterrupt):  # stopped before its first checkpoint
        _run([exp], callbacks=[_StopAtEpoch(0)])
    # --resume would pick the latest run with a checkpoint: the finished one, which has
    # nothing left to do; it is not re-opened.
    with pytest.raises(LmtError, match="nothing to resume: run .* finished all 2 epoch"):
        _run([exp], resume=True)
    run = mlflow_client(in_tmp).get_run(finished.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(r.info.status for r in all_runs(in_tmp)) == ["FINISHED", "KILLED"]


def test_a_named_run_resumes_that_run(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 3\n")
    with pytest.raises(KeyboardInterrupt):
        _run([exp], callbacks=[_StopAtEpoch(2)], run_name="first")
    _run([exp])  # a later run of the same experiment: the latest one
    resumed = _run([exp], resume=True, run_name="first")
    assert resumed.run_dir.name == "first"
    run = mlflow_client(in_tmp).get_run(resumed.run_id)
    assert run.info.run_name == "first" and run.info.status == "FINISHED"


@pytest.mark.parametrize("binding", ["run_experiment.name = '../outside'",
                                     "run_experiment.name = 'a/b'"])
def test_a_run_name_cannot_leave_the_work_dir(gin_file, in_tmp: Path, binding: str) -> None:
    from lmt_tf.errors import ConfigError

    exp = gin_file(TINY)
    with pytest.raises(ConfigError, match="run_experiment.name must be"):
        _run([exp], [binding])
    assert all_runs(in_tmp) == [] and not (in_tmp / "outside").exists()


def test_a_run_has_one_owner_at_a_time(gin_file, in_tmp: Path) -> None:
    """A second --resume of a run that another process is continuing is refused in one
    line, and leaves the run as it was; once that process is gone, the resume goes on."""
    import subprocess
    import sys

    from lmt_tf.errors import LmtError

    exp = gin_file(TINY + "TrainConfig.epochs = 2\n")
    with pytest.raises(KeyboardInterrupt):
        _run([exp], run_name="shared", callbacks=[_StopAtEpoch(1)])
    lock = in_tmp / "lmt_work" / "exp" / "shared" / "owner.lock"
    holder = subprocess.Popen(  # another process owning the run, as a resume would
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a');"
         " fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush();"
         " print('held', flush=True); time.sleep(120)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LmtError, match="run shared is in use by pid 4242 on elsewhere"):
            _run([exp], run_name="shared", resume=True)
    finally:
        holder.kill()
        holder.wait()
    (run,) = all_runs(in_tmp)
    assert run.info.status == "KILLED"
    resumed = _run([exp], run_name="shared", resume=True)
    assert resumed.run_id == run.info.run_id
    assert mlflow_client(in_tmp).get_run(run.info.run_id).info.status == "FINISHED"


def test_a_running_run_with_a_live_owner_is_not_reopened(gin_file, in_tmp: Path) -> None:
    """The store says who owns a run too: a resume from another working copy (no shared
    lock) of a run RUNNING under a live process is refused."""
    import mlflow

    from lmt_tf.errors import LmtError
    from lmt_tf.liveness import owner_tags
    from lmt_tf.tracking.config import TrackingConfig
    from lmt_tf.tracking.run import TrackedRun

    client = mlflow_client(in_tmp)
    experiment = client.create_experiment("owned")
    other = client.create_run(experiment, tags=owner_tags())  # this live process owns it
    run = TrackedRun(TrackingConfig(), "owned")
    with pytest.raises(LmtError, match=f"run {other.info.run_id} is RUNNING, owned by pid"):
        run.start("again", run_id=other.info.run_id)
    assert mlflow.active_run() is None


def test_a_run_that_never_started_leaves_no_run_directory(gin_file, in_tmp: Path) -> None:
    from lmt_tf.errors import LmtError

    exp = gin_file(TINY + "TrackingConfig.artifact_root = 'taken'\n")
    (in_tmp / "taken").write_text("a file where the artifacts would go")
    with pytest.raises(LmtError, match="is a file, not a directory"):
        _run([exp])
    assert list((in_tmp / "lmt_work" / "exp").iterdir()) == []
