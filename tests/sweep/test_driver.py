"""lmt sweep on Optuna: a 2x2 grid is one parent run and four nested trial runs whose
params carry their bindings; the same command again runs only what failed; bad input is
refused before any trial starts; a sweep's experiment keeps its artifacts where `lmt run`'s
does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.cli import main
from lmt_tf.liveness import ENDED_BY, OWNER_PID, owner_tags
from lmt_tf.rundir import check_name
from lmt_tf.sweep.driver import LOG_DIR, Sweep, trial_command
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
    # One line on stderr says which trials failed and why; the parent run says it too.
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("lmt: error: 2 trial(s) failed (run the same command again to "
                            "retry them): trial ") and "b.npz" in error
    (failed,) = [r for r in all_runs(in_tmp) if r.info.run_name.startswith("sweep-")]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["lmt.error"] == f"LmtError: {error.removeprefix('lmt: error: ')}"
    _write_npz(in_tmp / "b.npz")
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "2 trial(s) done, 2 to run (2 again after failing)" in out
    # Two trial slots, each with its part of the host's GPUs (here: none).
    assert "lmt sweep: devices: 0 GPU(s); trial:0: CPU, trial:1: CPU; all-reduce ring" in out
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


@pytest.mark.parametrize(("arguments", "message"), [
    (["--grid", "TrainConfig.nonsense=[1,2]"], "doesn't have a parameter named 'nonsense'"),
    (["--search", "TrainConfig.epochs=int(1,3)"], "--search needs --trials N"),
    (["--grid", "TrainConfig.epochs=[nan]"], "'nan' is not a gin value"),
    (["--search", "TrainConfig.epochs=int(0.5,1.5)", "--trials", "2"],
     "int needs two integers, low and high, got 0.5,1.5"),
    # Every value is taken by the experiment's configs, not only the first.
    (["--grid", "TrainConfig.epochs=[1,0]"],
     "with TrainConfig.epochs = 0: TrainConfig.epochs must be >= 1, got 0"),
    (["--grid", "TrainConfig.epochs=[1,2]", "--metric", "val_acuracy"],
     "--metric 'val_acuracy': the experiment logs no such metric (did you mean "
     "val_accuracy?)"),
    (["--grid", "TrainConfig.epochs=[1,2]", "--metric", "val_acuracy", "--prune"],
     "(did you mean val_accuracy?)"),
    (["--grid", "TrainConfig.epochs=[1,2]", "--metric", "test_accuracy", "--prune"],
     "--prune judges trials each epoch on --metric, so it must be a per-epoch metric of "
     "the train stage (loss, accuracy, val_loss, val_accuracy), got 'test_accuracy'"),
    (["--grid", "TrainConfig.epochs=[1,2]", "--metric", "prune/val_accuracy"],
     "the experiment has no stage 'prune' (its stages: train, export)"),
    (["--grid", "TrainConfig.epochs=[1,2]", "--metric", "val_auc"],
     "its val metrics: val_accuracy, val_loss"),
])
def test_bad_sweeps_fail_before_any_trial(gin_file, in_tmp: Path, capsys, arguments,
                                          message) -> None:
    gin_file(TINY)
    assert main(["sweep", "exp.gin", *arguments]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lmt: error: ") and message in line
    assert not all_runs(in_tmp) and not (in_tmp / "lmt_sweeps").exists()


def test_a_sweep_against_an_unreachable_server_fails_at_once(gin_file, in_tmp: Path, capsys,
                                                             monkeypatch) -> None:
    gin_file(TINY)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert main(["sweep", "exp.gin", "--grid", "TrainConfig.epochs=[1,2]"]) == 2
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert not (in_tmp / "lmt_sweeps.db").exists() and not all_runs(in_tmp)


@pytest.mark.parametrize("name", ["../../x", "/tmp/lmt-escaped/x", "a/../../b", "..", ".x",
                                  "-x", "a b", "x" * 300, "ünï/cødé"])
def test_sweep_paths_stay_in_the_working_directory_whatever_the_experiment_name(
        name: str, in_tmp: Path) -> None:
    """Trial logs (and trial run names, which name run directories) are built from the
    study's name, which is built from the experiment's (TrackingConfig.experiment_name:
    any MLflow name)."""
    sweep = Sweep(["exp.gin"], name, [parse_dimension("SGD.learning_rate=[0.1]", grid=True)])
    logs = (in_tmp / LOG_DIR).resolve()
    for number in (0, 7, 10**6):
        log = (in_tmp / sweep.log_file(number)).resolve()
        assert log.parent.parent == logs and log.name == f"trial-{number}.log"
        assert check_name(sweep.trial_name(number), "a run name")
    other = Sweep(["exp.gin"], name + "y", sweep.dimensions)
    assert other.study_name != sweep.study_name  # names made safe do not collide


def test_a_plain_experiment_name_is_kept_in_the_study_name() -> None:
    sweep = Sweep(["exp.gin"], "my_exp-1.2", [parse_dimension("a.b=[1]", grid=True)])
    assert sweep.study_name.startswith("my_exp-1.2-") and len(sweep.study_name) == 21


def test_a_corrupt_study_file_is_one_line(gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    (in_tmp / "lmt_sweeps.db").write_bytes(b"not a database" * 300)
    assert main(["sweep", "exp.gin", "--grid", "TrainConfig.epochs=[1,2]"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"lmt: error: the sweep study file {in_tmp / 'lmt_sweeps.db'} cannot be "
                    f"used (file is not a database); move it away to start afresh (the "
                    f"sweeps it holds are then forgotten)")
    (in_tmp / "lmt_sweeps.db").unlink()
    (in_tmp / "lmt_sweeps.db").mkdir()
    assert main(["sweep", "exp.gin", "--grid", "TrainConfig.epochs=[1,2]"]) == 2
    assert capsys.readouterr().err == (f"lmt: error: the sweep study file "
                                       f"{in_tmp / 'lmt_sweeps.db'} is not a file; move it "
                                       f"away\n")
    assert not all_runs(in_tmp)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_sweep_in_a_read_only_directory_is_one_line(tmp_path: Path) -> None:
    """A read-only bind mount of the working directory, in a mount namespace of the
    test's own (root, or an unprivileged user namespace where the kernel allows it)."""
    work = tmp_path / "ro"
    work.mkdir()
    (work / "exp.gin").write_text(TINY)
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    probe = subprocess.run(["unshare", "-m", *user, "sh", "-c", "mount --bind / /mnt"],
                           capture_output=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip("no mount namespaces here")
    script = (f'mount --bind "{work}" "{work}" && mount -o remount,bind,ro "{work}" && '
              f'cd "{work}" && exec "$0" -m lmt_tf.cli sweep exp.gin '
              f'--grid "TrainConfig.epochs=[1,2]"')
    elsewhere = tmp_path / "store" / "mlruns.db"
    elsewhere.parent.mkdir()
    errors = []
    for store in (None, f"sqlite:///{elsewhere}"):  # its MLflow store; its study file
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update({"MLFLOW_TRACKING_URI": store} if store else {})
        done = subprocess.run(["unshare", "-m", *user, "sh", "-c", script, sys.executable],
                              capture_output=True, text=True, timeout=300, env=env,
                              check=False)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        errors.append(line)
    assert errors == [
        f"lmt: error: cannot use the MLflow store {work / 'mlruns.db'}: it does not exist, "
        f"and {work} is not a directory you can write to; run from a directory you can "
        f"write to, or set MLFLOW_TRACKING_URI",
        f"lmt: error: cannot write the sweep study file {work / 'lmt_sweeps.db'} (unable to "
        f"open database file); lmt sweep keeps its study in the working directory: run it "
        f"from a directory you can write to"]
    assert list(work.iterdir()) == [work / "exp.gin"]


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


def _killed_sweep(in_tmp: Path, owner: dict[str, str]) -> tuple[Sweep, str, str]:
    """The store and study a sweep of one grid point leaves when it is killed with its
    trial's run already FINISHED but not yet told to the study: the study's trial still
    RUNNING, the parent run RUNNING and owned by ``owner``. Returns the sweep, the parent
    run's id and the trial run's."""
    import optuna

    sweep = Sweep(["exp.gin"], "exp", [parse_dimension("keras.optimizers.SGD.learning_rate"
                                                       "=[0.1]", grid=True)])
    client = mlflow_client(in_tmp)
    experiment = client.create_experiment("exp", (in_tmp / "mlartifacts").as_uri())
    parent = client.create_run(experiment, run_name=f"sweep-{sweep.study_name}", tags=owner)
    child = client.create_run(experiment, run_name=sweep.trial_name(0),
                              tags={"mlflow.parentRunId": parent.info.run_id})
    client.log_metric(child.info.run_id, "val_accuracy", 0.875, step=1)
    client.set_terminated(child.info.run_id, "FINISHED")
    study = optuna.create_study(storage=f"sqlite:///{in_tmp / 'lmt_sweeps.db'}",
                                study_name=sweep.study_name, direction="maximize")
    study.set_user_attr("parent_run_id", parent.info.run_id)
    study.ask().suggest_categorical("keras.optimizers.SGD.learning_rate", ["0.1"])
    return sweep, parent.info.run_id, child.info.run_id


def test_a_trial_that_finished_while_its_sweep_was_killed_is_not_run_again(
        gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _, parent_id, child_id = _killed_sweep(in_tmp, {**owner_tags(), OWNER_PID: str(gone.pid)})
    assert main(["sweep", "exp.gin", "--grid", "keras.optimizers.SGD.learning_rate=[0.1]"]) == 0
    assert "1 trial(s) done, 0 to run" in capsys.readouterr().out
    runs = {r.info.run_id: r for r in all_runs(in_tmp)}
    assert len(runs) == 2  # no trial ran again
    parent = runs[parent_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_accuracy"] == 0.875
    assert parent.data.tags["lmt.sweep.best_run"] == child_id


def test_a_sweep_still_running_elsewhere_is_refused(gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    _, parent_id, _ = _killed_sweep(in_tmp, owner_tags())  # this process: alive
    assert main(["sweep", "exp.gin", "--grid", "keras.optimizers.SGD.learning_rate=[0.1]"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lmt: error: this sweep is running already: its run sweep-exp-") \
        and f"owned by process {os.getpid()}" in line
    assert mlflow_client(in_tmp).get_run(parent_id).info.status == "RUNNING"  # untouched


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_leaves_no_trial_running_and_resumes(
        gin_file, in_tmp: Path) -> None:
    """SIGKILL of `lmt sweep` cannot be passed on: the running trial stops by itself (it
    watches its parent) and ends KILLED; the parent run is ended by the next lmt command;
    the same sweep again runs that trial again, and not the one that had finished."""
    # The second grid point trains "forever" in the first sweep, 1 epoch in the second:
    # the command (and so the study) stays the same.
    gin_file(TINY + "LONG = 100000\n")
    command = [sys.executable, "-m", "lmt_tf.cli", "sweep", "exp.gin", "--quiet",
               "--grid", "TrainConfig.epochs=[1,%LONG]"]
    sweep = subprocess.Popen(command, cwd=in_tmp, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    client = mlflow_client(in_tmp)

    def trial_run(number: int):
        runs = [r for r in all_runs(in_tmp) if r.info.run_name.endswith(f"-trial-{number}")]
        return runs[0] if runs else None

    try:
        deadline = time.monotonic() + 300
        while trial_run(1) is None:  # trial 0 finished, trial 1 has started its run
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read()
            time.sleep(0.5)
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait(10)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while trial_run(1).info.status == "RUNNING":
        assert time.monotonic() < deadline, "the orphaned trial went on training"
        time.sleep(0.5)
    trial = trial_run(1)
    assert trial.info.status == "KILLED"  # stopped on its own, not FINISHED
    while _alive(int(trial.data.tags[OWNER_PID])):
        assert time.monotonic() < deadline, "the orphaned trial did not exit"
        time.sleep(0.5)
    (parent,) = [r for r in all_runs(in_tmp) if r.info.run_name.startswith("sweep-")]
    assert parent.info.status == "RUNNING"  # its owner could not end it ...
    assert main(["compare", "--parent", parent.info.run_id, "--output", "r"]) == 0
    ended = client.get_run(parent.info.run_id)  # ... the next lmt command did
    assert ended.info.status == "KILLED" and "no longer exists" in ended.data.tags[ENDED_BY]

    (in_tmp / "exp.gin").write_text(TINY + "LONG = 2\n")
    done = subprocess.run(command, cwd=in_tmp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = [r for r in all_runs(in_tmp) if "-trial-" in r.info.run_name]
    statuses = sorted((r.data.params["TrainConfig.epochs"], r.info.status) for r in runs)
    # Trial 0 (1 epoch) is not run again; the killed one is, as a new trial.
    assert statuses == [("%LONG", "FINISHED"), ("%LONG", "KILLED"), ("1", "FINISHED")]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_mistake_every_trial_would_share_is_found_by_a_dry_run(gin_file, in_tmp: Path,
                                                                 capsys) -> None:
    """The data is read only when the experiment is set up: the dry run with the first
    trial's bindings finds it missing before any trial starts."""
    gin_file(NPZ + "load_npz.path = 'missing.npz'\n")
    assert main(["sweep", "exp.gin", "--grid", "TrainConfig.epochs=[1,2]"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("lmt: error: the experiment fails a dry run with the first trial's "
                    "bindings (TrainConfig.epochs = 1), so every trial would: npz file not "
                    "found: missing.npz")
    assert not all_runs(in_tmp) and not (in_tmp / "lmt_sweeps").exists()


@pytest.mark.slow
def test_a_trial_that_finished_without_the_metric_stops_the_sweep(gin_file, in_tmp: Path,
                                                                  capsys) -> None:
    """A metric the experiment may log (no near miss of one it surely logs) is known only
    from a finished trial: the first that lacks it ends the sweep, FAILED, saying so."""
    gin_file(TINY)
    assert main(["sweep", "exp.gin", "--metric", "gradient_norm",
                 "--grid", "TrainConfig.epochs=[1,2,3]"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lmt: error: 1 trial(s) failed") and \
        "the run logged no metric 'gradient_norm' (it logged accuracy, " in line
    runs = all_runs(in_tmp)
    (trial,) = [r for r in runs if "-trial-" in r.info.run_name]  # not the other two
    (parent,) = [r for r in runs if r is not trial]
    assert parent.info.status == "FAILED" and "gradient_norm" in parent.data.tags["lmt.error"]
