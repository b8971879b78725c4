"""A team's tracking server: lmt logs to a real `mlflow server` over HTTP, with proxied
artifacts, exactly as to the local store; a 2-worker `lmt launch` job logs its one run
there; trials of a parallel sweep logging at once lose no metric. The server is backed by
a throw-away PostgreSQL cluster where Debian's PostgreSQL binaries are installed
(`.ci/run` installs them), else by SQLite. One cluster and one server serve the module."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmt_tf.runtime.processes import free_ports, stop_process_groups
from tests.conftest import TINY
from tests.test_processes import wait_for_health


def _as_postgres(command: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: as the postgres user, then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> Iterator[str | None]:
    """A PostgreSQL cluster on a free loopback port: its SQLAlchemy URI, or None where the
    binaries (or, as root, the postgres user) are absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or (os.geteuid() == 0 and shutil.which("runuser") is None):
        yield None
        return
    bin_dir = Path(found[-1]).parent
    # Not under pytest's temporary root: it is private to root, and the server runs as
    # the postgres user.
    base = Path(tempfile.mkdtemp(prefix="lmt-pg-"))
    base.chmod(0o755)
    data, sockets = base / "data", base / "sockets"
    for directory in (data, sockets):
        directory.mkdir()
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust",
                                 "-U", "lmt"]), check=True, capture_output=True, timeout=120)
    (port,) = free_ports(1)
    subprocess.run(_as_postgres([
        str(bin_dir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "server.log"),
        "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1", "start"]),
        check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "lmt", "mlflow"], check=True, capture_output=True, timeout=60)
        yield f"postgresql+psycopg://lmt@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                     "immediate", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def mlflow_server(server_root: Path, postgres: str | None) -> Iterator[str]:
    """`mlflow server` on a free loopback port, serving (proxying) artifacts itself."""
    tmp_path = server_root
    backend = postgres or f"sqlite:///{tmp_path / 'server.db'}"
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, server, "mlflow server")
        yield url
    finally:
        stop_process_groups([server], grace=3)


@pytest.mark.slow
def test_runs_log_to_a_tracking_server_as_to_the_local_store(
        mlflow_server: str, postgres: str | None, server_root: Path, tmp_path: Path,
        monkeypatch) -> None:
    import mlflow

    from lmt_tf.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    (work / "exp.gin").write_text(TINY)
    assert main(["run", "exp.gin"]) == 0
    assert main(["launch", "--workers", "2", "--network", "host", "--timeout", "240",
                 "exp.gin", "--gin_param", "run_experiment.name = 'launched'"]) == 0
    client = mlflow.MlflowClient(mlflow_server)
    for name in ("exp", "launched"):
        experiment = client.get_experiment_by_name(name)
        (run,) = client.search_runs([experiment.experiment_id])  # one run per job
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
        assert "SGD.momentum" in run.data.params and run.inputs.dataset_inputs
        logged = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
        assert "config/operative_config.gin" in logged
    # Artifacts went through the server to its own store, none to a local one.
    assert list((server_root / "server-artifacts").rglob("operative_config.gin"))
    assert not (work / "mlartifacts").exists() and not (work / "mlruns.db").exists()
    if postgres is None:
        warnings.warn("PostgreSQL's binaries are not installed: the server ran on SQLite",
                      stacklevel=1)


@pytest.mark.slow
def test_parallel_sweep_trials_logging_at_once_lose_no_metric(
        mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    import mlflow

    from lmt_tf.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    epochs = 4
    (tmp_path / "swept.gin").write_text(TINY + f"TrainConfig.epochs = {epochs}\n")
    status = main(["sweep", "swept.gin", "--parallel", "2", "--quiet",
                   "--grid", "keras.optimizers.SGD.learning_rate=[0.05,0.1,0.2,0.4]"])
    logs = "\n".join(f"{log}:\n{log.read_text()[-3000:]}"
                     for log in sorted(tmp_path.glob("lmt_sweeps/*/trial-*.log")))
    assert status == 0, logs
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("swept")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name.startswith("sweep-")]
    trials = [r for r in runs if r is not parent]
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.params["SGD.learning_rate"] for r in trials} == {"0.05", "0.1", "0.2", "0.4"}
    # Every trial holds every epoch of every per-epoch metric, and the same set of metrics
    # and params as the others: nothing one trial wrote was lost to another's writes.
    per_epoch = ("loss", "accuracy", "val_loss", "val_accuracy")
    for run in trials:
        for key in per_epoch:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, epochs + 1)), (run.info.run_name, key, steps)
    assert len({frozenset(r.data.metrics) for r in trials}) == 1
    assert len({frozenset(r.data.params) for r in trials}) == 1
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
        max(r.data.metrics["val_accuracy"] for r in trials))


@pytest.mark.slow
def test_a_sweep_against_a_server_with_a_password_never_shows_it(
        mlflow_server: str, tmp_path: Path) -> None:
    """The server takes any userinfo (it has no auth): the password is used, and appears
    nowhere lmt writes: not on stdout or stderr of `lmt sweep` (MLflow's own "View run
    ... at" link included), not in the trials' logs, not in any param or tag, also where
    a failing trial's own error line names it."""
    import mlflow
    import numpy as np

    from lmt_tf.data.sources import load_digits

    secret = "pa55-W0rd"
    uri = mlflow_server.replace("http://", f"http://alice:{secret}@")
    train = load_digits().train
    np.savez(tmp_path / "a.npz", x=train.x, y=train.y)
    (tmp_path / "secret.gin").write_text(TINY.replace("include 'gin/data/digits.gin'",
                                                      "run_experiment.data = @load_npz")
                                         + "TrainConfig.epochs = 1\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-m", "lmt_tf.cli", "sweep", "secret.gin",
         "--grid", f"load_npz.path=['a.npz', '{uri}/b.npz']"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    logs = {log: log.read_text() for log in tmp_path.glob("lmt_sweeps/*/trial-*.log")}
    assert done.returncode == 1, done.stderr  # the trial of b.npz fails
    assert "lmt: error: 1 trial(s) failed" in done.stderr and len(logs) == 2
    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
    assert len(runs) == 2  # the parent and the trial of a.npz
    recorded = [str(r.data.params) + str(r.data.tags) for r in runs]
    for text in [done.stdout, done.stderr, *logs.values(), *recorded]:
        assert secret not in text
    assert "View run" not in done.stdout
    assert "alice:***@" in done.stderr  # the failure names the value, password hidden
