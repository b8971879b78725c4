"""Deployment on Flower (real server and client processes on 127.0.0.1, over TLS with a
throw-away CA): after 2 rounds the global weights and every round's train loss equal
the in-process simulation's; a client that dies is reported and the run goes on or fails
cleanly, as configured; no process is left behind. Flower's server exits as stopped by a
signal only when a signal stopped it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.errors import LmtError
from lmt_tf.federated import flower
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.sampling import sample_clients
from tests.conftest import all_runs, mlflow_client
from tests.stages.test_federate import FEDERATED

LMT = [sys.executable, "-m", "lmt_tf.cli"]
CLIENTS = 3
SETTINGS = FEDERATED.replace("FederatedConfig.client_fraction = 0.5",
                             "FederatedConfig.client_fraction = 0.67  # 2 of 3 clients")


def _train_losses(work: Path) -> list[float]:
    (run,) = all_runs(work)
    history = mlflow_client(work).get_metric_history(run.info.run_id, "federate/train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _final_weights(work: Path) -> list[np.ndarray]:
    (newest, *_) = sorted(work.glob("lmt_work/*/*/stages/federate/checkpoints/round-*"),
                          reverse=True)
    with np.load(newest) as saved:
        return [saved[f"w{i}"] for i in range(len(saved.files) - 1)]


def _run(args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*LMT, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _processes_of(work: Path) -> list[str]:
    """Processes still running from this test's directory."""
    found = subprocess.run(["pgrep", "-af", "lmt_tf.cli"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if str(work) in line]


def _start(monkeypatch, start_server) -> None:
    """``flower.start_server`` with Flower's ``start_server`` replaced."""
    import flwr

    monkeypatch.setattr(flwr.server, "start_server", start_server)
    flower.start_server("127.0.0.1:5", None, None, None)


def test_flower_exiting_on_its_own_is_an_error_not_a_signal(monkeypatch) -> None:
    def refuses(**_) -> None:  # as start_server on an address it cannot bind
        sys.exit("Port in server address 127.0.0.1:5 is already in use.")

    with pytest.raises(LmtError, match="the Flower server on 127.0.0.1:5 stopped: Port in "
                                       "server address 127.0.0.1:5 is already in use"):
        _start(monkeypatch, refuses)


def test_a_signal_that_stops_flower_is_an_interruption(monkeypatch) -> None:
    before = signal.getsignal(signal.SIGTERM)

    def signalled(**_) -> None:  # as start_server's handlers do on SIGTERM
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt, match="stopped by a signal"):
        _start(monkeypatch, signalled)
    assert signal.getsignal(signal.SIGTERM) == before  # lmt's handling is back


@pytest.mark.slow
def test_deployed_rounds_equal_the_simulation(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bindings = ["--gin_param", "FederatedConfig.rounds = 2",
                "--gin_param", f"PartitionConfig.clients = {CLIENTS}"]
    simulated, deployed = tmp_path / "simulated", tmp_path / "deployed"
    for work in (simulated, deployed):
        work.mkdir()
        (work / "exp.gin").write_text(SETTINGS)
    done = _run(["run", "exp.gin", *bindings], simulated)
    assert done.returncode == 0, done.stderr[-2000:]
    done = _run(["federate", "exp.gin", "--clients", str(CLIENTS), "--timeout", "300",
                 *bindings], deployed)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "[server:0] lmt: 3 Flower client(s) connected" in done.stdout
    # The device plan gave each process its part (here: no GPU, so none sees one).
    assert ("lmt federate: devices: 0 GPU(s); server:0: CPU, client:0: CPU, client:1: CPU, "
            "client:2: CPU; all-reduce ring") in done.stdout
    assert "lmt: Flower server on 127.0.0.1:" in done.stdout and "(TLS)" in done.stdout
    for k in range(CLIENTS):  # each client process loaded its own part
        assert f"[client:{k}] lmt: client {k} (" in done.stdout
    for a, b in zip(_final_weights(simulated), _final_weights(deployed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Each client's mean over its own steps in the round, weighted by examples: the same
    # numbers in both (Keras' running loss gave 0.56, 1.12 here and 0.56, 0.49 there).
    simulated_losses = _train_losses(simulated)
    assert len(simulated_losses) == 2
    np.testing.assert_allclose(_train_losses(deployed), simulated_losses, rtol=1e-5)
    (run,) = all_runs(deployed)  # the server logged the one run
    assert run.info.status == "FINISHED" and run.data.metrics["federate/clients"] == 2
    assert _processes_of(tmp_path) == []


def _first_round_with(client: int, after: int) -> int:
    config = FederatedConfig(client_fraction=0.67)
    return next(r for r in range(after + 1, 100) if client in sample_clients(config, CLIENTS,
                                                                             0, r))


@pytest.mark.slow
@pytest.mark.parametrize("on_failure", ["continue", "fail"])
def test_a_client_that_dies_is_reported(tmp_path: Path, monkeypatch, on_failure: str) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "exp.gin").write_text(SETTINGS)
    # Client 0 is killed after round 1; the run ends with the next round that samples it.
    rounds = _first_round_with(0, after=1)
    bindings = ["--gin_param", f"FederatedConfig.rounds = {rounds}",
                "--gin_param", f"FederatedConfig.on_client_failure = '{on_failure}'",
                "--gin_param", "FederatedConfig.round_timeout = 60"]
    from lmt_tf.federated.deploy import Deployment, deploy

    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    killer = _Killer(tmp_path, lines)
    status = deploy(Deployment(["exp.gin", *bindings], CLIENTS, timeout=300),
                    echo=killer.see, echo_error=lines.append)
    output = "\n".join(lines)
    assert killer.killed, output[-3000:]
    (run,) = all_runs(tmp_path)
    if on_failure == "continue":
        assert status == 0, output[-3000:]
        assert "going on without it" in output
        assert run.info.status == "FINISHED"
    else:
        assert status == 2, output[-3000:]
        assert "FederatedConfig.on_client_failure = 'continue' goes on without it" in output
        assert run.info.status == "FAILED"
    assert _processes_of(tmp_path) == []


class _Killer:
    """Kills client 0's process as soon as the server has finished round 1."""

    def __init__(self, work: Path, lines: list[str]):
        self.work, self.lines, self.killed = work, lines, False

    def see(self, line: str) -> None:
        self.lines.append(line)
        if not self.killed and line.startswith("[server:0] lmt: round 1/"):
            found = subprocess.run(["pgrep", "-f", "flower-client.*--client 0"],
                                   capture_output=True, text=True)
            for pid in found.stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            self.killed = bool(found.stdout.split())


@pytest.mark.slow
def test_a_stopped_deployment_ends_killed_and_resumes_in_the_same_run(tmp_path: Path,
                                                                       monkeypatch) -> None:
    import os
    import signal
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "exp.gin").write_text(SETTINGS)
    log = tmp_path / "out.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*LMT, "federate", "exp.gin", "--clients", "2", "--run-name", "deployed",
             "--gin_param", "FederatedConfig.rounds = 100000"], cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "lmt: round 3/" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # as a scheduler or Ctrl-C stops it
        assert process.wait(60) == 130, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert "[server:0] lmt: interrupted" in log.read_text()
    assert _processes_of(tmp_path) == []
    (run,) = all_runs(tmp_path)
    assert run.info.status == "KILLED"
    (newest, *_) = sorted(tmp_path.glob("lmt_work/*/deployed/stages/federate/checkpoints/*"),
                          reverse=True)
    done_rounds = int(newest.name.split("-")[1].split(".")[0])
    resumed = _run(["federate", "exp.gin", "--clients", "2", "--run-name", "deployed",
                    "--resume", "--allow-changes", "--gin_param",
                    f"FederatedConfig.rounds = {done_rounds + 2}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"[server:0] lmt: federate: resuming at round {done_rounds + 1}" in resumed.stdout
    (run,) = all_runs(tmp_path)  # the same run, finished
    assert run.info.status == "FINISHED"
    assert _processes_of(tmp_path) == []
