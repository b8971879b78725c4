"""Every lmt command that opens a tracking store checks first that it answers: against
an unreachable server each says so in one line at once, instead of MLflow's minutes of
retries."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmt_tf.cli import main
from lmt_tf.runtime.processes import free_ports
from tests.conftest import TINY


@pytest.mark.parametrize("command", [
    ["tensorboard", "some-run", "--port", "{free}"],
    ["compare", "--experiment", "exp"],
    ["compare", "a1", "b2"],
    ["sweep", "exp.gin", "--grid", "TrainConfig.epochs=[1,2]"],
    ["run", "exp.gin"],
    ["evaluate", "some-run", "exp.gin"],
], ids=lambda command: command[0] + ("-ids" if command[1:2] == ["a1"] else ""))
def test_an_unreachable_server_is_one_line_at_once(gin_file, in_tmp: Path, capsys,
                                                   monkeypatch, command) -> None:
    gin_file(TINY)
    closed, free = free_ports(2)  # nothing listens on either
    server = f"http://127.0.0.1:{closed}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    started = time.monotonic()
    assert main([part.format(free=free) for part in command]) == 2
    assert time.monotonic() - started < 60  # MLflow's own retries take minutes
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"lmt: error: MLflow tracking server {server} is unreachable")
