"""A real cluster of separate processes on 127.0.0.1: one ``lmt run`` per task, each with
its own ``TF_CONFIG``, output prefixed with its role, and nothing left running after.

Multi-worker mirrored (no ps): N workers, worker 0 is the chief; the job succeeds when
every worker succeeds and fails when any fails. Parameter server (M >= 1 ps): a chief
(the coordinator), N workers and M ps; the job is the chief's: a lost worker is not fatal
(the coordinator reschedules its steps) unless it was the last, a lost ps is: its shards
of the variables are gone, so the other tasks are killed at once (nothing is left to
save, and a coordinator that lost a ps hangs in TensorFlow's teardown until killed) and
a restart continues from the last checkpoint.

With ``--task-memory`` every task is told its cap (its pre-flight size check compares its
share of the model against it) and, where the launcher may write the kernel's memory
cgroups, kept to it (``task_memory``); each task's peak memory is printed at the end and
logged into the job's run.

A job names its run (``--run-name``), so a restart resumes exactly the run this job
made, never another run of the same experiment. When the job is stopped (timeout,
Ctrl-C, a failed task) the launcher ends the job's MLflow run if no task could.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.errors import LmtError
from lmt_tf.process import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    JOB_FILE_ENV,
    JOB_NETWORK_ENV,
    lmt_command,
)
from lmt_tf.runtime.devices import DevicePlan, plan_cluster, visible_gpus
from lmt_tf.runtime.netns import JobNamespace
from lmt_tf.runtime.processes import ProcessGroup, Task, free_ports
from lmt_tf.runtime.task_memory import TaskMemory
from lmt_tf.tracking.credentials import redact_uri
from lmt_tf.tracking.store import end_orphaned_runs

NETWORKS = ("isolated", "host")


@dataclass(frozen=True)
class Job:
    """What ``lmt launch`` runs: ``lmt run RUN_ARGS`` on a cluster of this shape."""

    run_args: Sequence[str]  # arguments of ``lmt run`` (gin file, --gin_param, ...)
    workers: int  # worker tasks (>= 1)
    ps: int = 0  # parameter-server tasks; 0 means multi-worker mirrored training
    restarts: int = 0  # restart a failed cluster with --resume up to this many times
    timeout: float = 0  # seconds for each attempt; 0 means none
    evaluator: bool = False  # add a side-car evaluator that validates each checkpoint
    resume: bool = False  # the first attempt continues a run too
    run_name: str | None = None  # the run to make or resume; None: a new name
    # "isolated": the tasks run in a network namespace of their own with only loopback,
    # unreachable from other hosts (and unable to reach them); "host": this machine's.
    network: str = "isolated"
    gpus_per_worker: int | None = None  # None: the visible GPUs split evenly (devices.py)
    share_gpus: bool = False  # let more workers than GPUs share them
    task_memory: int | None = None  # bytes each task may use (--task-memory); None: no cap

    def devices(self) -> DevicePlan:
        """Each task's GPUs on this host (see ``devices.plan_cluster``).

        Raises:
          ConfigError: for more workers than GPUs without a sharing choice.
        """
        return plan_cluster(visible_gpus(), self.workers, self.ps, self.evaluator,
                            self.gpus_per_worker, self.share_gpus)


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


def start_cluster(spec: dict[str, list[str]], command: Sequence[str],
                   echo: Callable[[str], None], echo_error: Callable[[str], None],
                   environment: dict[str, str], devices: DevicePlan,
                   wrap: Callable[[str, Sequence[str]], list[str]] | None = None
                   ) -> ProcessGroup:
    """One ``command`` per task of ``spec``, each with its ``TF_CONFIG`` and its part of
    the host's GPUs (``devices``), as ``wrap(task name, command)`` runs it (its memory
    cgroup) if given."""
    group = ProcessGroup(echo, echo_error)
    # The training tasks' TF_CONFIG does not list the evaluator; its own does.
    training = {job: addresses for job, addresses in spec.items() if job != "evaluator"}
    for task_type, addresses in spec.items():
        for task_id in range(len(addresses)):
            cluster = spec if task_type == "evaluator" else training
            task = Task(task_type, task_id)
            group.start(task, wrap(task.name, command) if wrap else command, {
                **environment, **devices.task(f"{task_type}:{task_id}").environment(),
                "GRPC_FAIL_FAST": "use_caller",
                "TF_CONFIG": json.dumps({"cluster": cluster, "task": {
                    "type": task_type, "index": task_id}})}, addresses[task_id])
    return group


def _outcome(cluster: ProcessGroup, parameter_server: bool,
             echo: Callable[[str], None], lost: set[Task],
             killed_by_cap: Callable[[str, int], str | None] = lambda task, code: None
             ) -> int | None:
    """The job's exit status once decided, else None. A task the memory cap killed is
    said so (``killed_by_cap``) before what follows from its end."""
    codes = {task: p.poll() for task, p in cluster.processes.items()}
    for task, code in codes.items():
        if code is None or code == 0:
            continue
        if task not in lost:
            cause = killed_by_cap(task.name, code)
            if cause:
                echo(cause)
        if parameter_server and task.task_type == "worker":
            if task not in lost:
                lost.add(task)
                echo(f"lmt launch: {task.name} exited with status {code}; the coordinator "
                     f"reschedules its steps on the other workers")
            if all(t in lost for t in codes if t.task_type == "worker"):
                # Nothing restarts a lost worker: with none left no step can run.
                echo("lmt launch: no worker is left to run steps; stopping the cluster")
                return code
            continue
        echo(f"lmt launch: {task.name} exited with status {code}; stopping the cluster")
        if parameter_server and task.task_type == "ps" and code != EXIT_USER_ERROR:
            cluster.signal_all(signal.SIGKILL)  # its variables are gone: nothing to save
        return code
    deciders = [t for t in codes
                if t.task_type in ("chief" if parameter_server else "worker", "evaluator")]
    if all(codes[t] == 0 for t in deciders):
        return 0
    return None


def task_command(job: Job, run_name: str | None, resume: bool) -> list[str]:
    """Every task's process: ``lmt run`` of the job's arguments under the job's strategy,
    making (or with ``resume``, continuing) the run ``run_name``."""
    strategy = "parameter_server_strategy" if job.ps else "multi_worker_mirrored_strategy"
    return lmt_command("run", *job.run_args,
                       "--gin_param", f"run_experiment.strategy = @{strategy}",
                       *(["--run-name", run_name] if run_name else []),
                       *(["--resume"] if resume else []))


def launch(job: Job, echo: Callable[[str], None] = print,
           echo_error: Callable[[str], None] | None = None) -> int:
    """Runs ``job`` as a local cluster; returns the job's exit status.

    A failed attempt is restarted with ``--resume`` of the same named run, up to
    ``job.restarts`` times, unless a task failed on a configuration or input error (exit
    status 2), which a restart would only repeat.

    Args:
      job: the run arguments and the cluster's shape.
      echo: where prefixed task output goes.
      echo_error: where prefixed task errors go (default: ``echo``).

    Raises:
      LmtError: for a bad cluster shape.
    """
    if job.workers < 1:
        raise LmtError(f"--workers must be at least 1, got {job.workers}")
    if job.ps < 0 or job.restarts < 0 or job.timeout < 0:
        raise LmtError("--ps, --restarts and --timeout must not be negative")
    if job.network not in NETWORKS:
        raise LmtError(f"--network must be one of {NETWORKS}, got {job.network!r}")
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    if job.network == "isolated" and server.startswith(("http://", "https://")):
        raise LmtError(f"the job's tasks run in a network namespace of their own, where the "
                       f"tracking server {redact_uri(server)} cannot be reached; add "
                       f"--network host (the tasks' servers are then reachable from "
                       f"other hosts: see the README's security section)")
    devices = job.devices()
    echo(f"lmt launch: devices: {devices.describe()}")
    if job.task_memory is not None and job.task_memory <= 0:
        raise LmtError(f"--task-memory must be a positive size, got {job.task_memory}")
    run_name = job.run_name
    if run_name is None and not job.resume:
        run_name = f"{Path(job.run_args[0]).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    memory = TaskMemory(job.task_memory, echo)
    try:
        return _attempts(job, run_name, devices, memory, echo, echo_error or echo)
    finally:
        memory.close()  # its tasks are gone: every attempt reaps them
        if memory.peaks:
            echo(memory.table())


def _attempts(job: Job, run_name: str | None, devices: DevicePlan, memory: TaskMemory,
              echo: Callable[[str], None], echo_error: Callable[[str], None]) -> int:
    """The job's attempts: the first, then a restart (``--resume``) after each failure
    a restart can help, up to ``job.restarts``; returns the last one's status."""
    resume = job.resume
    status = 1
    with tempfile.TemporaryDirectory(prefix="lmt-launch-") as scratch:
        report = Path(scratch) / "run.json"
        for attempt in range(job.restarts + 1):
            command = task_command(job, run_name, resume)
            environment = {JOB_FILE_ENV: str(report), JOB_NETWORK_ENV: job.network,
                           **memory.environment()}
            memory.start_attempt()
            if job.network == "isolated":
                with JobNamespace() as namespace:
                    status = _attempt(namespace.command(command), job, echo,
                                      echo_error, environment, devices, memory)
            else:
                status = _attempt(command, job, echo, echo_error, environment, devices,
                                  memory)
            made = json.loads(report.read_text()) if report.is_file() else None
            if status != 0 and made:
                _end_orphaned_run(made, echo)
            memory.log(made, memory.end_attempt(), attempt + 1, echo)
            if run_name is None and made:  # resumed the latest: keep to it
                run_name = made["run_name"]
            if status in (0, EXIT_INTERRUPTED) or attempt == job.restarts:
                return status
            if status == EXIT_USER_ERROR:
                echo("lmt launch: a task failed on a configuration or input error "
                     "(status 2); not restarting")
                return status
            echo(f"lmt launch: attempt {attempt + 1} failed (status {status}); restarting "
                 f"({attempt + 1}/{job.restarts}) from the last checkpoint")
            resume = True
    return status


def _end_orphaned_run(made: dict[str, str], echo: Callable[[str], None]) -> None:
    """After a stopped attempt every task is gone; the run its chief reported (``made``),
    if still RUNNING, has lost its owner and is ended KILLED (``liveness.end_orphans``)."""
    with contextlib.suppress(LmtError):
        end_orphaned_runs(made["tracking_uri"], f"lmt launch (pid {os.getpid()})", echo)


def _attempt(command: Sequence[str], job: Job, echo: Callable[[str], None],
             echo_error: Callable[[str], None], environment: dict[str, str],
             devices: DevicePlan, memory: TaskMemory) -> int:
    tasks = job.workers + (1 + job.ps if job.ps else 0) + (1 if job.evaluator else 0)
    spec = cluster_spec(job.workers, job.ps, free_ports(tasks), job.evaluator)
    echo(f"lmt launch: cluster {json.dumps(spec)}")
    cluster = start_cluster(spec, command, echo, echo_error, environment, devices,
                            memory.command)
    lost: set[Task] = set()

    def outcome() -> int | None:
        memory.sample(cluster.processes)
        status = _outcome(cluster, job.ps > 0, cluster.echo, lost, memory.killed_by_cap)
        if status is not None:  # the last look before the cluster is stopped
            memory.sample(cluster.processes, force=True)
        return status

    return cluster.supervise(outcome, job.timeout, f"lmt launch: no result after "
                                                   f"{job.timeout:g} s; stopping the cluster")


def project_file(path: str) -> Path:
    """Checks that an experiment file exists before a cluster is started for it."""
    file = Path(path)
    if not file.is_file():
        raise LmtError(f"gin file not found: {path}")
    return file
