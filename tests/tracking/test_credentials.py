"""Credentials in a tracking URI are used and never shown: not in output, params, tags,
config artifacts or the run directory."""

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

from lmt_tf.tracking.credentials import redact, redact_credentials, redact_uri
from tests.conftest import TINY

LMT = str(Path(sys.executable).parent / "lmt")
SECRET = "s3cret-Pa55"


def test_redaction() -> None:
    assert redact_uri(f"http://alice:{SECRET}@host:5000/x") == "http://alice:***@host:5000/x"
    assert redact_uri("http://host:5000") == "http://host:5000"
    text = f"TrackingConfig.tracking_uri = 'https://alice:{SECRET}@mlflow:5000'"
    assert redact_credentials(text) == "TrackingConfig.tracking_uri = 'https://alice:***@mlflow:5000'"
    assert redact_credentials("postgresql://u:p@db/x, http://u@h, s3://b/k") == \
        "postgresql://u:***@db/x, http://***@h, s3://b/k"


def test_a_token_alone_is_a_secret_too() -> None:
    """User info without a colon is a token (http://TOKEN@host): hidden everywhere a
    password is."""
    uri = f"https://{SECRET}@mlflow.example:5000/"
    assert redact_uri(uri) == "https://***@mlflow.example:5000/"
    assert redact(f"401 for {SECRET}", uri) == "401 for ***"
    assert SECRET not in redact_credentials(f"uri = '{uri}'")


@pytest.mark.parametrize("character", ["/", "#", "?"])
def test_an_unencoded_character_in_a_password_is_one_line_without_it(
        character: str, in_tmp: Path, gin_file) -> None:
    """A password holding a character that ends the user info unencoded would be read as
    another host or port: refused in one line that shows the host, never the password."""
    password = f"pa{character}ss{SECRET}"
    exp = gin_file(TINY)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:{password}@127.0.0.1:9/"}
    done = subprocess.run([LMT, "run", exp], env=env, capture_output=True, text=True,
                          cwd=in_tmp, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert "must be percent-encoded" in err[0] and "127.0.0.1:9" in err[0]
    assert "pa" + character not in done.stdout + done.stderr and SECRET not in err[0]


def test_an_unreachable_server_error_shows_no_token(in_tmp: Path, gin_file) -> None:
    exp = gin_file(TINY)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://{SECRET}@127.0.0.1:{_free_port()}"}
    done = subprocess.run([LMT, "run", exp], env=env, capture_output=True, text=True,
                          cwd=in_tmp, timeout=300)
    assert done.returncode == 2 and "unreachable" in done.stderr, done.stderr
    assert SECRET not in done.stdout + done.stderr


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
