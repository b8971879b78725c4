"""The store: its health probe sends the URI's credentials and shows them nowhere; a new
experiment is made once, whoever makes it first."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from lmt_tf.errors import LmtError
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.tracking.run import TrackedRun
from lmt_tf.tracking.store import check_reachable

SECRET = "s3cret-Pa55"


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


def test_runs_that_create_their_experiment_at_once_share_it(in_tmp: Path, monkeypatch) -> None:
    """Two runs of a new experiment started together (a sweep, parallel seeds): the one
    whose lookup missed finds the experiment the other created."""
    import mlflow

    uri = f"sqlite:///{in_tmp / 'mlruns.db'}"
    lookup = mlflow.MlflowClient.get_experiment_by_name
    raced: list[str] = []

    def racing(client, name: str):
        if not raced:  # the first lookup misses; another process creates it meanwhile
            raced.append(name)
            mlflow.MlflowClient(uri).create_experiment(name)
            return None
        return lookup(client, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", racing)
    run = TrackedRun(TrackingConfig(tracking_uri=uri), "raced").start("second")
    run.end("FINISHED")
    (experiment,) = [e for e in mlflow.MlflowClient(uri).search_experiments()
                     if e.name == "raced"]
    assert raced == ["raced"] and run.experiment_id == experiment.experiment_id


def test_first_runs_on_a_fresh_store_do_not_race_its_schema(tmp_path: Path) -> None:
    """Four processes opening a new SQLite store at once all succeed: one makes its
    tables under the lock, the others find them (MLflow alone: "duplicate column name",
    or alembic's "expected to match one row")."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    script = ("import sys, time; from lmt_tf.tracking.store import check_reachable; "
              "import mlflow; time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
              "check_reachable(sys.argv[1]); "
              "mlflow.MlflowClient(sys.argv[1]).create_experiment(f'e{sys.argv[3]}')")
    start = str(time.time() + 8)  # every process imports first, then all open at once
    processes = [subprocess.Popen([sys.executable, "-c", script, uri, start, str(i)],
                                  stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], errors
