"""Real local clusters: multi-worker mirrored and parameter-server training through
`lmt launch`, failures of a task, and bad cluster input. Every process is reaped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf import config
from lmt_tf.cli import main
from lmt_tf.config import run_parsed
from lmt_tf.invocation import RunOptions
from lmt_tf.process import EXIT_USER_ERROR
from tests.conftest import TINY, all_runs, mlflow_client

LMT = str(Path(sys.executable).parent / "lmt")
pytestmark = pytest.mark.slow


class Launch:
    """`lmt launch` in its own process group, its output collected line by line."""

    def __init__(self, args: list[str], cwd: Path):
        self.lines: list[str] = []
        self.process = subprocess.Popen([LMT, "launch", *args], cwd=cwd, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    def pids(self) -> dict[str, int]:
        found = (re.search(r"started (\S+) at \S+ \(pid (\d+)\)", line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in found if m}

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self._reader.join(10)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def _assert_all_gone(pids) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
            f"/proc/{pid}/stat").read_text().split()[2], f"process {pid} left behind"


def _wait_for_epochs(directory: Path, epochs: int, launch: Launch, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for state in directory.glob("lmt_work/*/*/state.json"):
            if json.loads(state.read_text()).get("epochs", 0) >= epochs:
                return
        assert launch.process.poll() is None, launch.output
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of epoch {epochs} after {timeout} s\n{launch.output}")


def _exported_weights(directory: Path) -> list[np.ndarray]:
    (saved,) = directory.glob("*/*/export/saved_model")
    return keras.models.load_model(str(saved), compile=False).get_weights()


def _assert_cluster_matches_local(exp: str, directory: Path, cluster_args: list[str],
                                  local_bindings: list[str]) -> tuple[Launch, list]:
    """Runs ``exp`` on a launched cluster, then in this process with ``local_bindings``,
    and checks that both end with the same weights and the same test metrics. Returns
    the launch and the MLflow runs the cluster made."""
    launch = Launch([*cluster_args, "--timeout", "240", exp,
                     "--gin_param", "run_experiment.work_dir = 'cluster'"], directory)
    assert launch.wait(300) == 0, launch.output
    runs = all_runs(directory)
    config.parse([exp], ["run_experiment.work_dir = 'local'", *local_bindings])
    local = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    for a, b in zip(_exported_weights(directory / "cluster"), local.model.get_weights(),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Metrics aggregated over the workers, not summed (accuracy stays a fraction).
    (cluster_run,) = runs
    for name, value in local.test_metrics.items():
        assert cluster_run.data.metrics[f"test_{name}"] == pytest.approx(value, rel=1e-4)
    return launch, runs


def test_two_workers_match_two_local_mirrored_replicas(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY)
    launch, runs = _assert_cluster_matches_local(
        exp, in_tmp, ["--workers", "2"], ["run_experiment.strategy = @mirrored_strategy"])
    (run,) = runs  # exactly one run for the whole cluster job
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmt.strategy"] == "MultiWorkerMirroredStrategy"
    assert run.data.tags["lmt.replicas"] == "2" and run.data.tags["lmt.cluster.workers"] == "2"
    losses = mlflow_client(in_tmp).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2] and losses[1].value < losses[0].value
    assert "[worker:1]" in launch.output and "[worker:0]" in launch.output
    _assert_all_gone(launch.pids().values())


def test_parameter_server_cluster_trains_and_logs(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY)
    launch = Launch(["--workers", "2", "--ps", "1", "--timeout", "240", exp], in_tmp)
    assert launch.wait(300) == 0, launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmt.strategy"] == "ParameterServerStrategy"
    assert run.data.tags["lmt.cluster.ps"] == "1" and run.data.tags["lmt.cluster.workers"] == "3"
    history = mlflow_client(in_tmp).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2]
    assert 0 < run.data.metrics["test_accuracy"] <= 1
    assert set(launch.pids()) == {"chief:0", "worker:0", "worker:1", "ps:0"}
    _assert_all_gone(launch.pids().values())


def test_killed_worker_is_restarted_into_the_same_run(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 12\n")
    launch = Launch(["--workers", "2", "--restarts", "1", "--timeout", "240", exp], in_tmp)
    _wait_for_epochs(in_tmp, 3, launch, 180)
    first = launch.pids()
    os.kill(first["worker:1"], signal.SIGKILL)
    assert launch.wait(300) == 0, launch.output
    assert "restarting (1/1) from the last checkpoint" in launch.output
    assert "resuming" in launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in mlflow_client(in_tmp).get_metric_history(run.info.run_id, "loss")}
    assert steps == set(range(1, 13))
    _assert_all_gone(first.values())


def test_parameter_server_job_survives_a_killed_worker(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 12\n")
    launch = Launch(["--workers", "2", "--ps", "1", "--timeout", "240", exp], in_tmp)
    _wait_for_epochs(in_tmp, 2, launch, 180)
    os.kill(launch.pids()["worker:1"], signal.SIGKILL)
    assert launch.wait(300) == 0, launch.output
    assert "reschedules its steps" in launch.output and "restarting" not in launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow_client(in_tmp).get_metric_history(run.info.run_id, "loss")]
    assert steps == list(range(1, 13))


def test_zero_workers_is_an_error(gin_file, capsys) -> None:
    exp = gin_file(TINY)
    assert main(["launch", "--workers", "0", exp]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == "lmt: error: --workers must be at least 1, got 0"


@pytest.mark.parametrize("tf_config, message", [
    ("{oops", "TF_CONFIG is not valid JSON"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker",
                                                                  "index": 3}}),
     "worker:3 is out of range"),
])
@pytest.mark.parametrize("strategy", ["multi_worker_mirrored_strategy",
                                      "parameter_server_strategy"])
def test_bad_tf_config_is_one_line(gin_file, in_tmp: Path, monkeypatch, capsys,
                                   tf_config: str, message: str, strategy: str) -> None:
    exp = gin_file(TINY)
    monkeypatch.setenv("TF_CONFIG", tf_config)
    assert main(["run", exp, "--gin_param", f"run_experiment.strategy = @{strategy}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert all_runs(in_tmp) == []


def test_port_in_use_is_one_line(gin_file, in_tmp: Path, monkeypatch, capsys) -> None:
    import socket

    exp = gin_file(TINY)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        monkeypatch.setenv("TF_CONFIG", json.dumps(
            {"cluster": {"worker": [address, "127.0.0.1:1"]},
             "task": {"type": "worker", "index": 0}}))
        status = main(["run", exp, "--gin_param",
                       "run_experiment.strategy = @multi_worker_mirrored_strategy"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "is in use" in err[0], err


def test_embedding_tables_are_partitioned_over_two_ps(in_tmp: Path) -> None:
    from tests.conftest import PROJECT_ROOT

    launch = Launch(["--workers", "2", "--ps", "2", "--timeout", "300",
                     str(PROJECT_ROOT / "experiments" / "movielens_ps.gin"),
                     "--gin_param", "TrainConfig.steps_per_epoch = 20",
                     "--gin_param", "TrainConfig.epochs = 1",
                     "--gin_param", "ExportConfig.mlflow_model = False"], in_tmp)
    assert launch.wait(360) == 0, launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED" and run.data.tags["lmt.cluster.ps"] == "2"
    client = mlflow_client(in_tmp)
    placement = json.loads(Path(client.download_artifacts(
        run.info.run_id, "placement.json", str(in_tmp))).read_text())
    for table in ("user_embedding", "item_embedding"):
        shards = {name: devices for name, devices in placement.items()
                  if name.startswith(f"{table}/embeddings/part_")}
        hosts = sorted(d.split("/device:")[0] for devices in shards.values() for d in devices)
        assert hosts == ["/job:ps/replica:0/task:0", "/job:ps/replica:0/task:1"], placement
    assert 0 < run.data.metrics["test_mae"] < 4  # ratings are 1 to 5 stars


def test_side_car_evaluator_validates_every_checkpoint(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 3\n")
    launch = Launch(["--workers", "2", "--evaluator", "--timeout", "240", exp], in_tmp)
    assert launch.wait(300) == 0, launch.output
    evaluated = re.findall(r"\[evaluator:0\] lmt: evaluated epoch (\d+): val_loss", launch.output)
    assert evaluated and evaluated[-1] == "3"  # it saw the final checkpoint
    assert [int(e) for e in evaluated] == sorted(int(e) for e in evaluated)
    (run,) = all_runs(in_tmp)  # the evaluator does not make a run of its own
    assert run.info.status == "FINISHED"


def test_a_failing_task_stops_the_cluster_and_leaves_no_process(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY)
    launch = Launch(["--workers", "2", "--ps", "1", "--timeout", "120", exp,
                     "--gin_param", "TrainConfig.epochs = 0"], in_tmp)
    assert launch.wait(180) == EXIT_USER_ERROR, launch.output
    # Every task fails on the binding; whichever exits first stops the cluster (the
    # chief, or under load the ps or a worker).
    first = re.search(r"lmt launch: (\w+:\d) exited with status 2; stopping the cluster",
                      launch.output)
    assert first, launch.output
    assert (f"[{first.group(1)}] lmt: error: TrainConfig.epochs must be >= 1, got 0"
            in launch.output)
    assert set(launch.pids()) == {"chief:0", "worker:0", "worker:1", "ps:0"}
    _assert_all_gone(launch.pids().values())


def test_accumulation_on_two_workers_equals_one_big_batch(gin_file, in_tmp: Path) -> None:
    """k=4 micro-batches per replica on 2 workers, clipped by global norm then AGC (the
    factors multiplied inside the compiled update): the same weights as one device taking
    the whole global batch at once."""
    exp = gin_file(TINY + "TrainConfig.gradient_transforms = "
                          "(@ClipByGlobalNorm(), @AdaptiveGradientClipping())\n"
                          "ClipByGlobalNorm.limit = 0.5\n"
                          "AdaptiveGradientClipping.clip = 0.01\n")
    _assert_cluster_matches_local(
        exp, in_tmp, ["--workers", "2", "--gin_param", "TrainConfig.micro_batches = 4"], [])


def test_accumulation_under_parameter_servers_equals_one_big_batch(gin_file,
                                                                   in_tmp: Path) -> None:
    """One worker, so steps run in order: k=4 micro-batches with clipping under a
    parameter server give the weights of one device taking the whole batch."""
    exp = gin_file(TINY + "TrainConfig.gradient_transforms = (@ClipByGlobalNorm(),)\n"
                          "ClipByGlobalNorm.limit = 0.5\n")
    _assert_cluster_matches_local(
        exp, in_tmp, ["--workers", "1", "--ps", "1",
                      "--gin_param", "TrainConfig.micro_batches = 4"], [])


def test_local_sgd_on_two_workers_with_one_local_step_is_synchronous(gin_file,
                                                                     in_tmp: Path) -> None:
    """H=1 local SGD across 2 worker processes: one weight averaging per step, and the
    weights and metrics of synchronous training on 2 local replicas."""
    exp = gin_file(TINY)
    _, (run,) = _assert_cluster_matches_local(
        exp, in_tmp, ["--workers", "2", "--gin_param", "TrainConfig.local_steps = 1"],
        ["run_experiment.strategy = @mirrored_strategy"])
    history = mlflow_client(in_tmp).get_metric_history(run.info.run_id,
                                                       "weight_synchronisations")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [18.0, 36.0]


def test_local_sgd_on_two_workers_averages_every_h_steps(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.local_steps = 4\nTrainConfig.steps_per_epoch = 16\n")
    launch = Launch(["--workers", "2", "--timeout", "240", exp], in_tmp)
    assert launch.wait(300) == 0, launch.output
    (run,) = all_runs(in_tmp)
    assert run.data.metrics["weight_synchronisations"] == 8.0  # 32 steps / H=4
    assert 0.3 < run.data.metrics["test_accuracy"] <= 1.0


def test_restart_after_an_early_kill_resumes_the_jobs_own_run(gin_file, in_tmp: Path) -> None:
    """A worker killed before the first checkpoint: the restart continues the run this
    job made, not an earlier finished run of the same experiment, which stays untouched."""
    exp = gin_file(TINY + "TrainConfig.epochs = 3\n")
    config.parse([exp], [])
    earlier = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    before = mlflow_client(in_tmp).get_run(earlier.run_id)
    launch = Launch(["--workers", "2", "--restarts", "1", "--timeout", "240", exp], in_tmp)
    deadline = time.monotonic() + 180
    while not any("MLflow run" in line for line in launch.lines):
        assert time.monotonic() < deadline and launch.process.poll() is None, launch.output
        time.sleep(0.1)
    os.kill(launch.pids()["worker:1"], signal.SIGKILL)  # before any checkpoint of this job
    assert launch.wait(300) == 0, launch.output
    assert "restarting (1/1)" in launch.output
    after = mlflow_client(in_tmp).get_run(earlier.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.metrics == before.data.metrics
    runs = {r.info.run_id: r for r in all_runs(in_tmp)}
    runs.pop(earlier.run_id)
    (job_run,) = runs.values()  # one run for the job, through both attempts
    assert job_run.info.status == "FINISHED"
    steps = {m.step for m in mlflow_client(in_tmp).get_metric_history(job_run.info.run_id,
                                                                       "loss")}
    assert steps == {1, 2, 3}


def test_a_configuration_error_is_not_restarted_and_reaches_stderr(gin_file,
                                                                   in_tmp: Path) -> None:
    exp = gin_file(TINY)
    done = subprocess.run([LMT, "launch", "--workers", "2", "--restarts", "2", "--timeout",
                           "120", exp, "--gin_param", "TrainConfig.epochs = 0"], cwd=in_tmp,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == EXIT_USER_ERROR
    assert "[worker:0] lmt: error: TrainConfig.epochs must be >= 1, got 0" in done.stderr
    assert "not restarting" in done.stdout and "restarting (1/2)" not in done.stdout
    assert all_runs(in_tmp) == []


def test_a_timeout_leaves_no_running_run(gin_file, in_tmp: Path) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 100000\n")
    launch = Launch(["--workers", "2", "--timeout", "25", exp], in_tmp)
    assert launch.wait(120) == 124, launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "KILLED", launch.output
    _assert_all_gone(launch.pids().values())


def test_sigterm_to_a_multi_worker_job_checkpoints_and_resume_matches(gin_file,
                                                                      in_tmp: Path) -> None:
    """What Kubernetes and SLURM do: SIGTERM to every task. The workers save at a step
    they agree on and the run ends KILLED; --resume finishes it with the weights of an
    uninterrupted run (two local mirrored replicas)."""
    exp = gin_file(TINY + "TrainConfig.epochs = 12\n")
    args = ["--workers", "2", "--run-name", "job", "--timeout", "240", exp,
            "--gin_param", "run_experiment.work_dir = 'cluster'"]
    launch = Launch(args, in_tmp)
    deadline = time.monotonic() + 180
    while not list(in_tmp.glob("cluster/*/job/checkpoints/ckpt-2.index")):
        assert time.monotonic() < deadline and launch.process.poll() is None, launch.output
        time.sleep(0.05)
    for task in ("worker:0", "worker:1"):
        os.kill(launch.pids()[task], signal.SIGTERM)
    assert launch.wait(120) == 130, launch.output
    assert "preempted (SIGTERM): checkpoint saved after step" in launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "KILLED"
    (saved,) = in_tmp.glob("cluster/*/job/checkpoints/preempted/ckpt-*.index")
    step = int(saved.name.split("-")[1].split(".")[0])
    assert step > 2 * 18  # after the second epoch's checkpoint (18 steps per epoch)
    _assert_all_gone(launch.pids().values())

    resumed = Launch([*args, "--resume"], in_tmp)
    assert resumed.wait(300) == 0, resumed.output
    assert "[worker:0] lmt: resuming" in resumed.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    config.parse([exp], ["run_experiment.work_dir = 'local'",
                         "run_experiment.strategy = @mirrored_strategy"])
    local = run_parsed(options=RunOptions(config_files=[exp], echo=lambda _: None))
    for a, b in zip(_exported_weights(in_tmp / "cluster"), local.model.get_weights(),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pruning_on_two_workers(gin_file, in_tmp: Path) -> None:
    """The prune stage under multi-worker mirrored: every worker prunes the same weights
    (the masks follow the all-reduced weights), and the run holds the target sparsity."""
    exp = gin_file(TINY + "run_experiment.stages = [@train(), @prune(), @export()]\n"
                          "prune.final_sparsity = 0.5\nprune.epochs = 1\nprune.frequency = 1\n"
                          "ExportConfig.mlflow_model = False\n")
    launch = Launch(["--workers", "2", "--timeout", "240", exp], in_tmp)
    assert launch.wait(300) == 0, launch.output
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    for layer in ("dense_0", "predictions"):
        assert run.data.metrics[f"prune/sparsity/{layer}"] == pytest.approx(0.5, abs=0.01)
    kernels = [w for w in _exported_weights(in_tmp / "lmt_work") if w.ndim == 2]
    assert kernels and all(abs(np.mean(k == 0) - 0.5) < 0.01 for k in kernels)


def test_pruning_under_parameter_servers_is_refused_before_training(gin_file,
                                                                    in_tmp: Path) -> None:
    exp = gin_file(TINY + "run_experiment.stages = [@train(), @prune()]\n")
    done = subprocess.run([LMT, "launch", "--workers", "1", "--ps", "1", "--timeout", "120",
                           exp], cwd=in_tmp, capture_output=True, text=True, timeout=240)
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    assert "[chief:0] lmt: error: prune cannot run under ParameterServerStrategy" in done.stderr
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED" and "loss" not in run.data.metrics  # nothing trained
