"""Credentials in a tracking URI are used and never shown: not in output, params, tags,
config artifacts or the run directory."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lmt_tf.errors import LmtError
from lmt_tf.tracking import check_reachable, redact_credentials, redact_uri
from tests.conftest import TINY

LMT = str(Path(sys.executable).parent / "lmt")
SECRET = "s3cret-Pa55"


def test_redaction() -> None:
    assert redact_uri(f"http://alice:{SECRET}@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact_uri("http://host:5000") == "http://host:5000"
    text = f"TrackingConfig.tracking_uri = 'https://alice:{SECRET}@mlflow:5000'"
    assert redact_credentials(text) == "TrackingConfig.tracking_uri = 'https://alice:***@mlflow:5000'"
    assert redact_credentials("postgresql://u:p@db/x, http://u@h, s3://b/k") == \
        "postgresql://u:***@db/x, http://u@h, s3://b/k"


class _Health(http.server.BaseHTTPRequestHandler):
    seen: list[str | None] = []
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Health.seen, _Health.status = [], 200
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_credentials_in_the_uri_are_sent_and_not_shown(health_server: int,
                                                       monkeypatch) -> None:
    import base64

    uri = f"http://alice:{SECRET}@127.0.0.1:{health_server}"
    check_reachable(uri)
    assert _Health.seen == ["Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()]
    _Health.status = 503
    with pytest.raises(LmtError) as caught:
        check_reachable(uri)
    assert SECRET not in str(caught.value) and "alice:***@" in str(caught.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    _Health.status = 200
    check_reachable(f"http://127.0.0.1:{health_server}")
    assert _Health.seen[-1] == "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_run_against_a_server_with_credentials_shows_them_nowhere(in_tmp: Path) -> None:
    port = _free_port()
    server = subprocess.Popen([LMT, "ui", "--port", str(port)], cwd=in_tmp,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "no MLflow server"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
        (in_tmp / "exp.gin").write_text(TINY)
        done = subprocess.run(
            [LMT, "run", "exp.gin", "--gin_param", "TrainConfig.epochs = 1",
             "--gin_param", f"TrackingConfig.tracking_uri = '{uri}'",
             "--gin_param", "ExportConfig.mlflow_model = False"],
            cwd=in_tmp, capture_output=True, text=True, timeout=300,
            env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr
        assert f"alice:***@127.0.0.1:{port}" in done.stdout
        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.status == "FINISHED"
        recorded = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in recorded and "alice:***@" in recorded
        for path in ("config/config.gin", "config/operative_config.gin",
                     "config/given/bindings.gin"):
            text = Path(client.download_artifacts(run.info.run_id, path, str(in_tmp))).read_text()
            assert SECRET not in text, path
        for file in in_tmp.glob("lmt_work/**/*"):
            if file.is_file():
                assert SECRET.encode() not in file.read_bytes(), file
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_runs_that_create_their_experiment_at_once_share_it(in_tmp: Path, monkeypatch) -> None:
    """Two runs of a new experiment started together (a sweep, parallel seeds): the one
    whose lookup missed finds the experiment the other created."""
    import mlflow

    from lmt_tf.tracking import TrackedRun, TrackingConfig

    uri = f"sqlite:///{in_tmp / 'mlruns.db'}"
    lookup = mlflow.get_experiment_by_name
    raced: list[str] = []

    def racing(name: str):
        if not raced:  # the first lookup misses; another process creates it meanwhile
            raced.append(name)
            mlflow.MlflowClient(uri).create_experiment(name)
            return None
        return lookup(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", racing)
    run = TrackedRun(TrackingConfig(tracking_uri=uri), "raced").start("second")
    run.end("FINISHED")
    (experiment,) = [e for e in mlflow.MlflowClient(uri).search_experiments()
                     if e.name == "raced"]
    assert raced == ["raced"] and run.experiment_id == experiment.experiment_id


class _RacingLogInput:
    """``mlflow.log_input`` against a server that loses the dataset race ``losses`` times
    first (two runs creating one data set at once), as PostgreSQL reports it."""

    def __init__(self, losses: int):
        self.losses, self.logged = losses, []

    def __call__(self, dataset, context, tags) -> None:
        from mlflow.exceptions import RestException

        if self.losses:
            self.losses -= 1
            raise RestException({"error_code": "BAD_REQUEST", "message": (
                '(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                'constraint "dataset_pk"')})
        self.logged.append((dataset.name, dataset.digest, context, tags))


@pytest.mark.parametrize("losses, logged", [(0, 1), (2, 1), (3, 0)])
def test_a_dataset_lost_to_a_parallel_run_is_logged_again(in_tmp: Path, monkeypatch,
                                                        losses: int, logged: int) -> None:
    import mlflow
    from mlflow.exceptions import RestException

    from lmt_tf.tracking import DATASET_ATTEMPTS, TrackedRun, TrackingConfig

    racing = _RacingLogInput(losses)
    monkeypatch.setattr(mlflow, "log_input", racing)
    run = TrackedRun(TrackingConfig(), "exp")
    if losses >= DATASET_ATTEMPTS:
        with pytest.raises(RestException, match="UniqueViolation"):
            run.log_dataset("digits", "abc", "", {"train": 3})
    else:
        run.log_dataset("digits", "abc", "", {"train": 3})
    assert len(racing.logged) == logged
