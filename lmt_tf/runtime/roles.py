"""Cluster membership: which task this process is, read from ``TF_CONFIG`` (as set by
Kubernetes training operators and most schedulers), or from a SLURM allocation."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from lmt_tf.errors import LmtError

TASK_TYPES = ("chief", "worker", "ps", "evaluator")


@dataclass(frozen=True)
class Role:
    """This process's place in the cluster; a single process is a chief of one."""

    task_type: str = "chief"
    task_id: int = 0
    workers: int = 0  # worker tasks (a chief task not counted)
    ps: int = 0  # parameter-server tasks
    has_chief: bool = True  # the cluster names a separate chief task

    @property
    def is_chief(self) -> bool:
        """The task that owns the MLflow run, checkpoints and exports: the chief, or
        worker 0 when the cluster has no chief task (multi-worker mirrored)."""
        if self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_id == 0 and not self.has_chief

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_id}"

    def tags(self) -> dict[str, int]:
        return {"lmt.cluster.workers": self.workers + (1 if self.has_chief else 0),
                "lmt.cluster.ps": self.ps}

    @classmethod
    def in_cluster(cls, cluster: Mapping[str, list[str]], task_type: str,
                   task_id: int) -> Role:
        """Task ``task_type:task_id`` of ``cluster`` (job name -> addresses)."""
        return cls(task_type, task_id, len(cluster.get("worker", [])),
                   len(cluster.get("ps", [])), "chief" in cluster)


SINGLE_PROCESS = Role(workers=0, has_chief=True)


def parse_tf_config(text: str) -> tuple[dict[str, list[str]], Role]:
    """Validates a ``TF_CONFIG`` value and returns (cluster, role).

    Raises:
      LmtError: if it is not JSON, lacks ``cluster`` or ``task``, names an unknown task
        type, or a task index outside its job.
    """
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise LmtError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from e
    if not isinstance(config, dict):
        raise LmtError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise LmtError("TF_CONFIG must hold a 'cluster' object and a 'task' object")
    for job, addresses in cluster.items():
        if job not in TASK_TYPES:
            raise LmtError(f"TF_CONFIG cluster names job {job!r}; jobs are {TASK_TYPES}")
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise LmtError(f"TF_CONFIG cluster.{job} must be a list of 'host:port' strings")
    task_type, task_id = task.get("type"), task.get("index", 0)
    if task_type not in TASK_TYPES:
        raise LmtError(f"TF_CONFIG task type {task_type!r} is not one of {TASK_TYPES}")
    if not isinstance(task_id, int) or task_id < 0:
        raise LmtError(f"TF_CONFIG task index must be a non-negative integer, got {task_id!r}")
    size = len(cluster.get(task_type, []))
    if task_type != "evaluator" and task_id >= size:
        raise LmtError(f"TF_CONFIG task {task_type}:{task_id} is out of range: the cluster "
                       f"has {size} {task_type} task(s)")
    return cluster, Role.in_cluster(cluster, task_type, task_id)


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "[::1]", "::1")


def check_own_port(environ: Mapping[str, str] | None = None) -> None:
    """Fails with a clear error if this task's own ``TF_CONFIG`` address is on this machine
    and its port is taken, instead of a gRPC abort deep inside TensorFlow.

    Raises:
      LmtError: naming the task, the address and the port.
    """
    text = _tf_config(environ)
    if not text:
        return
    cluster, role = parse_tf_config(text)
    addresses = cluster.get(role.task_type, [])
    if role.task_id >= len(addresses):
        return
    host, _, port = addresses[role.task_id].rpartition(":")
    if host not in _LOCAL_HOSTS or not port.isdigit():
        return
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1" if host != "0.0.0.0" else host, int(port)))
        except OSError as e:
            raise LmtError(f"TF_CONFIG task {role.name} listens on {addresses[role.task_id]}, "
                           f"but port {port} is in use ({e.strerror})") from e


def current_role(environ: Mapping[str, str] | None = None) -> Role:
    """The role given by ``TF_CONFIG`` in ``environ``, or a single process's."""
    text = _tf_config(environ)
    return parse_tf_config(text)[1] if text else SINGLE_PROCESS


def _tf_config(environ: Mapping[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
