"""A real cluster of separate processes on 127.0.0.1: one ``lmt run`` per task, each with
its own ``TF_CONFIG``, output prefixed with its role, and nothing left running after.

Multi-worker mirrored (no ps): N workers, worker 0 is the chief; the job succeeds when
every worker succeeds and fails when any fails. Parameter server (M >= 1 ps): a chief
(the coordinator), N workers and M ps; the job is the chief's: a lost worker is not fatal
(the coordinator reschedules its steps), a lost ps is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.errors import LmtError

POLL_SECONDS = 0.2
GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Task:
    task_type: str
    task_id: int

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_id}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_spec(workers: int, ps: int, ports: Sequence[int],
                 evaluator: bool = False) -> dict[str, list[str]]:
    """The cluster: ``worker`` only for mirrored training, ``chief``/``worker``/``ps``
    for parameter-server training; plus an ``evaluator`` if asked for."""
    addresses = [f"127.0.0.1:{p}" for p in ports]
    if ps == 0:
        spec = {"worker": addresses[:workers]}
    else:
        spec = {"chief": addresses[:1], "worker": addresses[1:1 + workers],
                "ps": addresses[1 + workers:1 + workers + ps]}
    if evaluator:
        spec["evaluator"] = addresses[-1:]
    return spec


class _Cluster:
    """The processes of one attempt, with their output pumps."""

    def __init__(self, spec: dict[str, list[str]], command: Sequence[str],
                 echo: Callable[[str], None]):
        self.processes: dict[Task, subprocess.Popen] = {}
        self._pumps: list[threading.Thread] = []
        # The training tasks' TF_CONFIG does not list the evaluator; its own does.
        training = {job: addresses for job, addresses in spec.items() if job != "evaluator"}
        for task_type, addresses in spec.items():
            for task_id in range(len(addresses)):
                task = Task(task_type, task_id)
                cluster = spec if task_type == "evaluator" else training
                env = {**os.environ, "GRPC_FAIL_FAST": "use_caller",
                       "TF_CONFIG": json.dumps({"cluster": cluster, "task": {
                           "type": task_type, "index": task_id}}),
                       "PYTHONUNBUFFERED": "1"}
                process = subprocess.Popen(
                    list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, text=True, start_new_session=True)
                self.processes[task] = process
                echo(f"lmt launch: started {task.name} at {addresses[task_id]} "
                     f"(pid {process.pid})")
                pump = threading.Thread(target=self._pump, args=(task, process, echo),
                                        daemon=True)
                pump.start()
                self._pumps.append(pump)

    @staticmethod
    def _pump(task: Task, process: subprocess.Popen, echo: Callable[[str], None]) -> None:
        for line in process.stdout:
            echo(f"[{task.name}] {line.rstrip()}")

    def signal_all(self, signum: int) -> None:
        signal_groups(self.processes.values(), signum)

    def stop(self) -> None:
        """Stops every task still running (see ``stop_process_groups``) and its output."""
        stop_process_groups(list(self.processes.values()))
        for pump in self._pumps:
            pump.join(timeout=5)


def signal_groups(processes: Iterable[subprocess.Popen], signum: int) -> None:
    """Sends ``signum`` to the process group of each process still running."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)


def stop_process_groups(processes: Sequence[subprocess.Popen],
                        grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to the process group of each process still running, SIGKILL after
    ``grace`` seconds; reaps them all."""
    signal_groups(processes, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(POLL_SECONDS)
    signal_groups(processes, signal.SIGKILL)
    for process in processes:
        process.wait()


def _outcome(cluster: _Cluster, parameter_server: bool,
             echo: Callable[[str], None], lost: set[Task]) -> int | None:
    """The job's exit status once decided, else None."""
    codes = {task: p.poll() for task, p in cluster.processes.items()}
    for task, code in codes.items():
        if code is None or code == 0:
            continue
        if parameter_server and task.task_type == "worker":
            if task not in lost:
                lost.add(task)
                echo(f"lmt launch: {task.name} exited with status {code}; the coordinator "
                     f"reschedules its steps on the other workers")
            continue
        echo(f"lmt launch: {task.name} exited with status {code}; stopping the cluster")
        return code
    deciders = [t for t in codes
                if t.task_type in ("chief" if parameter_server else "worker", "evaluator")]
    if all(codes[t] == 0 for t in deciders):
        return 0
    return None


def launch(run_args: Sequence[str], workers: int, ps: int = 0, restarts: int = 0,
           timeout: float = 0, echo: Callable[[str], None] = print,
           evaluator: bool = False) -> int:
    """Runs ``lmt run RUN_ARGS`` as a local cluster; returns the job's exit status.

    Args:
      run_args: arguments of ``lmt run`` (gin file, --gin_file, --gin_param, ...).
      workers: worker tasks (>= 1).
      ps: parameter-server tasks; 0 means multi-worker mirrored training.
      restarts: after a failed attempt, restart the whole cluster with ``--resume`` up
        to this many times (continuing the same MLflow run from the last checkpoint).
      timeout: seconds for each attempt; 0 means none.
      echo: where prefixed task output goes.
      evaluator: add a side-car evaluator task that validates each checkpoint.

    Raises:
      LmtError: for a bad cluster shape.
    """
    if workers < 1:
        raise LmtError(f"--workers must be at least 1, got {workers}")
    if ps < 0 or restarts < 0 or timeout < 0:
        raise LmtError("--ps, --restarts and --timeout must not be negative")
    strategy = "parameter_server_strategy" if ps else "multi_worker_mirrored_strategy"
    base = [sys.executable, "-m", "lmt_tf.cli", "run", *run_args,
            "--gin_param", f"run_experiment.strategy = @{strategy}"]
    resume = "--resume" in run_args
    status = 1
    for attempt in range(restarts + 1):
        command = [*base, "--resume"] if resume else base
        status = _attempt(command, workers, ps, timeout, echo, evaluator)
        if status in (0, 130) or attempt == restarts:
            return status
        echo(f"lmt launch: attempt {attempt + 1} failed (status {status}); restarting "
             f"({attempt + 1}/{restarts}) from the last checkpoint")
        resume = True
    return status


def _attempt(command: Sequence[str], workers: int, ps: int, timeout: float,
             echo: Callable[[str], None], evaluator: bool) -> int:
    tasks = workers + (1 + ps if ps else 0) + (1 if evaluator else 0)
    spec = cluster_spec(workers, ps, free_ports(tasks), evaluator)
    echo(f"lmt launch: cluster {json.dumps(spec)}")
    lock = threading.Lock()

    def locked_echo(line: str) -> None:
        with lock:
            echo(line)

    cluster = _Cluster(spec, command, locked_echo)
    deadline = time.monotonic() + timeout if timeout else None
    lost: set[Task] = set()
    try:
        while True:
            status = _outcome(cluster, ps > 0, locked_echo, lost)
            if status is not None:
                return status
            if deadline and time.monotonic() > deadline:
                locked_echo(f"lmt launch: no result after {timeout:g} s; stopping the cluster")
                return 124
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        # Each task ends its own run as KILLED on SIGINT, like Ctrl-C.
        cluster.signal_all(signal.SIGINT)
        time.sleep(min(GRACE_SECONDS, 3))
        return 130
    finally:
        cluster.stop()


def project_file(path: str) -> Path:
    """Checks that an experiment file exists before a cluster is started for it."""
    file = Path(path)
    if not file.is_file():
        raise LmtError(f"gin file not found: {path}")
    return file
