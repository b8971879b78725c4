"""The parent/child contract: every child lmt process is built one way, and an exception
becomes its exit status by its type, not its name."""

from __future__ import annotations

import sys

import pytest

from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.federated.deploy import Deployment, client_command, server_command
from lmt_tf.federated.transport import FlowerTLS
from lmt_tf.process import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PRUNED,
    EXIT_USER_ERROR,
    Preempted,
    Pruned,
    exit_status,
    lmt_command,
)
from lmt_tf.runtime.launcher import Job, task_command

LMT = [sys.executable, "-m", "lmt_tf.cli"]


class _EarlyStop(Pruned):
    """A kind of pruning of a caller's own."""


class Pruned2(KeyboardInterrupt):
    """Named like the pruned trial's exception, and no kind of it."""


Pruned2.__name__ = Pruned2.__qualname__ = "Pruned"


@pytest.mark.parametrize(("error", "status"), [
    (Pruned("pruned"), EXIT_PRUNED),
    (_EarlyStop("stopped early"), EXIT_PRUNED),
    (Pruned2("only the name"), EXIT_INTERRUPTED),
    (Preempted("preempted"), EXIT_INTERRUPTED),
    (KeyboardInterrupt(), EXIT_INTERRUPTED),
    (ConfigError("bad value"), EXIT_USER_ERROR),
    (LmtError("bad input"), EXIT_USER_ERROR),
    (PermissionError(13, "Permission denied", "/root/x"), EXIT_USER_ERROR),
    (RuntimeError("a bug"), EXIT_FAILED),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_exit_status_is_by_type(error: BaseException, status: int) -> None:
    assert exit_status(error) == status


@pytest.mark.parametrize(("error", "status", "line"), [
    (_EarlyStop("stopped early after epoch 2"), EXIT_PRUNED, "lmt: stopped early after epoch 2"),
    (Pruned2("not the sweep's"), EXIT_INTERRUPTED, "lmt: interrupted"),
], ids=["a kind of Pruned", "merely named Pruned"])
def test_lmt_ends_on_a_stop_by_its_type(error: BaseException, status: int, line: str,
                                        capsys, monkeypatch) -> None:
    from lmt_tf import cli, commands

    def stopped(_args) -> int:
        raise error

    monkeypatch.setattr(commands, "ui", stopped)
    assert cli.main(["ui"]) == status
    assert capsys.readouterr().err.strip() == line


def test_a_child_is_lmt_run_by_this_interpreter() -> None:
    assert lmt_command("run", "exp.gin", "--resume") == [*LMT, "run", "exp.gin", "--resume"]


def test_cluster_tasks_and_flower_processes_are_built_by_the_contract() -> None:
    job = Job(["exp.gin", "--gin_param", "TrainConfig.epochs = 1"], workers=2)
    assert task_command(job, "exp-1", resume=True) == lmt_command(
        "run", "exp.gin", "--gin_param", "TrainConfig.epochs = 1",
        "--gin_param", "run_experiment.strategy = @multi_worker_mirrored_strategy",
        "--run-name", "exp-1", "--resume")
    deployment = Deployment(["fed.gin"], clients=3, run_name="fed-1")
    clients = ["--gin_param", "PartitionConfig.clients = 3"]
    assert server_command(deployment, "127.0.0.1:5") == lmt_command(
        "run", "fed.gin", *clients, "--flower-server", "127.0.0.1:5", "--run-name", "fed-1")
    assert client_command(deployment, "127.0.0.1:5", 2) == lmt_command(
        "flower-client", "fed.gin", *clients, "--server", "127.0.0.1:5", "--client", "2")
    tls = FlowerTLS("ca.pem", "server.pem", "server.key")
    assert server_command(deployment, "127.0.0.1:5", tls) == lmt_command(
        "run", "fed.gin", *clients, "--flower-server", "127.0.0.1:5", "--tls-ca", "ca.pem",
        "--tls-cert", "server.pem", "--tls-key", "server.key", "--run-name", "fed-1")
    assert client_command(deployment, "127.0.0.1:5", 2, tls) == lmt_command(
        "flower-client", "fed.gin", *clients, "--server", "127.0.0.1:5", "--client", "2",
        "--tls-ca", "ca.pem")
