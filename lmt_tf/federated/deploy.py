"""``lmt federate``: a Flower server and its client processes on 127.0.0.1, output
prefixed per process, and nothing left running when the job ends, the server fails, or
on Ctrl-C (as ``lmt launch`` does for a tf.distribute cluster).

The server is ``lmt run FILE --flower-server ADDRESS`` (it logs the MLflow run); client
k is ``lmt flower-client FILE --server ADDRESS --client k`` (it loads only its own part
of the data). The same two commands run the clients on other machines.

They talk TLS: the job makes a throw-away CA and a certificate for 127.0.0.1 in a
scratch directory of its own, removed when it ends; the CA's key is never written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.errors import LmtError
from lmt_tf.federated.transport import FlowerTLS, throwaway_tls
from lmt_tf.process import lmt_command
from lmt_tf.runtime.devices import plan_federation, visible_gpus
from lmt_tf.runtime.processes import ProcessGroup, Task, free_ports


@dataclass(frozen=True)
class Deployment:
    """What ``lmt federate`` runs."""

    gin_args: Sequence[str]  # the gin file, then --gin_file/--gin_param arguments
    clients: int  # client processes; sets PartitionConfig.clients
    timeout: float = 0  # seconds before the job is stopped; 0: none
    run_name: str | None = None  # the server's run (directory) name
    resume: bool = False  # continue the run at its last round
    allow_changes: bool = False  # with resume: accept changed bindings


def _gin(job: Deployment) -> list[str]:
    return [*job.gin_args, "--gin_param", f"PartitionConfig.clients = {job.clients}"]


def server_command(job: Deployment, address: str, tls: FlowerTLS | None = None
                   ) -> list[str]:
    """The server's process: ``lmt run FILE --flower-server ADDRESS`` (with ``tls``'s
    files), which logs the MLflow run."""
    return lmt_command("run", *_gin(job), "--flower-server", address,
                       *(["--tls-ca", tls.ca_certificate, "--tls-cert", tls.server_certificate,
                          "--tls-key", tls.server_key] if tls else []),
                       *(["--run-name", job.run_name] if job.run_name else []),
                       *(["--resume"] if job.resume else []),
                       *(["--allow-changes"] if job.allow_changes else []))


def client_command(job: Deployment, address: str, client: int,
                   tls: FlowerTLS | None = None) -> list[str]:
    """Client ``client``'s process: ``lmt flower-client FILE --server ADDRESS
    --client K`` (trusting ``tls``'s CA)."""
    return lmt_command("flower-client", *_gin(job), "--server", address,
                       "--client", str(client),
                       *(["--tls-ca", tls.ca_certificate] if tls else []))


def deploy(job: Deployment, echo: Callable[[str], None] = print,
           echo_error: Callable[[str], None] | None = None) -> int:
    """Runs ``job``; returns the server's exit status (124 on timeout, 130 on Ctrl-C).

    A client that exits early is reported; the server decides what its missing results
    mean (``FederatedConfig.on_client_failure``), within ``round_timeout``.

    Raises:
      LmtError: for fewer than one client or a negative timeout.
    """
    if job.clients < 1:
        raise LmtError(f"--clients must be at least 1, got {job.clients}")
    if job.timeout < 0:
        raise LmtError(f"--timeout must not be negative, got {job.timeout:g}")
    with tempfile.TemporaryDirectory(prefix="lmt-federate-") as scratch:
        return _supervise(job, throwaway_tls(Path(scratch)), echo, echo_error or echo)


def _supervise(job: Deployment, tls: FlowerTLS, echo: Callable[[str], None],
               echo_error: Callable[[str], None]) -> int:
    address = f"127.0.0.1:{free_ports(1)[0]}"
    group = ProcessGroup(echo, echo_error)
    say = group.echo
    devices = plan_federation(visible_gpus(), job.clients)
    say(f"lmt federate: devices: {devices.describe()}")
    group.start(Task("server", 0), server_command(job, address, tls),
                devices.task("server:0").environment(), address)
    for k in range(job.clients):
        group.start(Task("client", k), client_command(job, address, k, tls),
                    devices.task(f"client:{k}").environment(), f"-> {address}")
    reported: set[Task] = set()

    def outcome() -> int | None:
        """The server's status once it exits; a client that fails is reported once."""
        for task, process in group.processes.items():
            code = process.poll()
            if task.task_type == "server" and code is not None:
                say(f"lmt federate: the server exited with status {code}")
                return code
            if code not in (None, 0) and task not in reported:
                reported.add(task)
                say(f"lmt federate: {task.name} exited with status {code}")
        return None

    return group.supervise(outcome, job.timeout,
                           f"lmt federate: no result after {job.timeout:g} s; stopping")
