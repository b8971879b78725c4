"""The lmt command as a process: Ctrl-C ends a run KILLED; `lmt ui` serves the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lmt_tf.process import EXIT_INTERRUPTED, EXIT_USER_ERROR
from tests.conftest import TINY, all_runs, mlflow_client

LMT = str(Path(sys.executable).parent / "lmt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_health(url: str, process: subprocess.Popen, what: str,
                    timeout: float = 120) -> None:
    """Waits until ``url``/health answers 200 (MLflow servers), while ``process`` runs."""
    def healthy() -> bool:
        assert process.poll() is None, f"{what} exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    _wait_for(healthy, timeout, what)


def _reap(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def run_state(directory: Path, key: str) -> int:
    """``key`` of the one run's state.json under ``directory`` (0 until it is there)."""
    states = list((directory / "lmt_work").glob("*/*/state.json"))
    return json.loads(states[0].read_text()).get(key, 0) if states else 0


def _epochs_done(directory: Path) -> int:
    return run_state(directory, "epochs")


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_and_keeps_its_checkpoint(in_tmp: Path) -> None:
    (in_tmp / "exp.gin").write_text(TINY)
    process = subprocess.Popen(
        [LMT, "run", "exp.gin", "--gin_param", "TrainConfig.epochs = 100000"],
        cwd=in_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
        # As from a terminal: a suite started in the background (`tox &`) hands its
        # children SIGINT ignored, and Python then installs no KeyboardInterrupt.
        preexec_fn=_interruptible)
    try:
        _wait_for(lambda: _epochs_done(in_tmp) >= 1 or process.poll() is not None, 120,
                  "the first epoch's checkpoint")
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        _reap(process)
    assert process.returncode == EXIT_INTERRUPTED
    assert err.strip().splitlines()[-1] == "lmt: interrupted"
    (run,) = all_runs(in_tmp)
    assert run.info.status == "KILLED"
    assert _epochs_done(in_tmp) >= 1  # a --resume continues from here


@pytest.mark.slow
def test_ui_serves_the_embedded_store_on_loopback(in_tmp: Path) -> None:
    client = mlflow_client(in_tmp)
    experiment_id = client.create_experiment("shown")
    port = _free_port()
    process = subprocess.Popen([LMT, "ui", "--port", str(port)], cwd=in_tmp,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    url = (f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
           f"?experiment_name=shown")

    def answers() -> bool:
        assert process.poll() is None, "lmt ui exited"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.load(response)["experiment"]["experiment_id"] == experiment_id
        except OSError:
            return False

    try:
        _wait_for(answers, 90, "the MLflow server")
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    finally:
        _reap(process)
    # The server is gone with lmt: nothing listens on the port any more. (Binding it is
    # no test: the server's closed connections leave it in TIME_WAIT for a while.)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_ui_on_a_port_in_use_is_an_error(in_tmp: Path, capsys) -> None:
    from lmt_tf.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["ui", "--port", str(busy.getsockname()[1])]) == EXIT_USER_ERROR
    assert "is in use" in capsys.readouterr().err


@pytest.mark.slow
def test_a_closed_stdout_still_makes_a_complete_run(in_tmp: Path) -> None:
    (in_tmp / "exp.gin").write_text(TINY)
    done = subprocess.run(["sh", "-c", f'exec "{LMT}" run exp.gin >&-'], cwd=in_tmp,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics


def _state(pid: int) -> str:
    """A process's state letter (Z: a zombie, gone but not reaped), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


_PARENT = """
import sys, time
from lmt_tf.runtime.processes import ProcessGroup, Task
group = ProcessGroup(print, print)
child = group.start(Task("child", 0), [sys.executable, "-c", sys.argv[1]], {},
                    log=__import__("pathlib").Path(sys.argv[2]))
print(child.pid, flush=True)
time.sleep(600)
"""
_CHILD = """
import time
from lmt_tf.process import watch_parent
watch_parent()
print("watching", flush=True)
time.sleep(600)
"""


def test_a_child_does_not_outlive_its_parent_killed_with_sigkill(tmp_path: Path) -> None:
    """Every child that `runtime.processes` starts (sweep trials, cluster tasks, Flower
    clients) watches the process that started it: SIGKILL of that process, which it
    cannot pass on, still ends the child."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(tmp_path / "log")],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        _wait_for(lambda: "watching" in (tmp_path / "log").read_text(), 60, "the child")
        assert _state(child) not in ("", "Z")
        os.kill(parent.pid, signal.SIGKILL)  # the parent only, not its children's groups
        parent.wait(10)
        _wait_for(lambda: _state(child) in ("", "Z"), 10, "the orphaned child to stop")
    finally:
        _reap(parent)
